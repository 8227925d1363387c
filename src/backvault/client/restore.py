"""Restoring a snapshot into a folder.

Each file is written under a temporary name and renamed into place once complete, so a
crash or a damaged blob never leaves a half-written file under its real name. A file whose
data is damaged or missing is named in the result and skipped; every other file is
restored. The target must be empty unless ``overwrite`` is set.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fnmatch
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..repo import format as fmt
from ..repo.errors import DamagedObject, RepositoryError
from ..repo.format import Node, Snapshot
from ..repo.repository import BlobLocation, Repository
from ..repo.timefmt import parse_ns
from .progress import NoProgress, Progress

_PREFETCH_BLOBS = 8
_RUN_BYTES = 8 * 1024 * 1024


class TargetNotEmpty(RepositoryError):
    pass


class DiskFull(RepositoryError):
    pass


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "bytes": self.bytes,
            "damaged": [{"path": p, "error": e} for p, e in self.damaged],
            "warnings": [{"path": p, "warning": w} for p, w in self.warnings],
        }


def matches(path: str, patterns: list[str]) -> bool:
    """restic-style include: a pattern with a leading / is anchored at the snapshot root;
    one without matches any trailing run of path components. A match on a directory
    selects everything below it."""
    parts = path.strip("/").split("/")
    for pattern in patterns:
        anchored = pattern.startswith("/")
        pparts = pattern.strip("/").split("/")
        for end in range(1, len(parts) + 1):  # the path or one of its ancestors
            candidate = parts[:end]
            starts = [0] if anchored else range(0, len(candidate) - len(pparts) + 1)
            for start in starts:
                window = candidate[start : start + len(pparts)]
                if (
                    len(window) == len(pparts)
                    and start + len(pparts) == len(candidate)
                    and all(fnmatch.fnmatchcase(c, p) for c, p in zip(window, pparts, strict=True))
                ):
                    return True
    return False


def could_contain_match(path: str, patterns: list[str]) -> bool:
    """Whether a directory may hold selected entries (so it must be walked)."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    for pattern in patterns:
        if not pattern.startswith("/"):
            return True
        pparts = pattern.strip("/").split("/")
        prefix = pparts[: len(parts)]
        if all(fnmatch.fnmatchcase(c, p) for c, p in zip(parts, prefix, strict=False)):
            return True
    return False


class Restorer:
    def __init__(
        self,
        repo: Repository,
        target: str | os.PathLike[str],
        includes: list[str] | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
        workers: int = 4,
    ) -> None:
        self.repo = repo
        self.target = Path(target).absolute()
        self.includes = includes or []
        self.overwrite = overwrite
        self.progress = progress or NoProgress()
        self.result = RestoreResult()
        self.is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._hardlinks: dict[tuple[int, int], Path] = {}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="backvault-restore")

    def check_target(self) -> None:
        if self.target.exists():
            if not self.target.is_dir():
                raise RepositoryError(f"the target {self.target} exists and is not a folder")
            if not self.overwrite and any(self.target.iterdir()):
                raise TargetNotEmpty(
                    f"the target {self.target} is not empty; choose an empty folder, or "
                    "pass --overwrite to replace what is there"
                )

    def run(self, snapshot: Snapshot) -> RestoreResult:
        self.check_target()
        self.repo.ensure_index()
        self.target.mkdir(parents=True, exist_ok=True)
        total = self._selected_size(snapshot.tree, "")
        self.progress.start(total, "restore")
        try:
            self._restore_tree(snapshot.tree, self.target, "", selected=not self.includes)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self.progress.finish()
        return self.result

    def _selected_size(self, tree_id: bytes, rel: str) -> int:
        total = 0
        try:
            nodes = self.repo.load_tree(tree_id)
        except DamagedObject:
            return 0
        for node in nodes:
            path = f"{rel}/{node.name}"
            if node.type == "dir" and node.subtree is not None:
                if (
                    not self.includes
                    or matches(path, self.includes)
                    or could_contain_match(path, self.includes)
                ):
                    total += self._selected_size(node.subtree, path)
            elif node.type == "file" and (not self.includes or matches(path, self.includes)):
                total += node.size
        return total

    def _restore_tree(self, tree_id: bytes, directory: Path, rel: str, selected: bool) -> bool:
        """Restore a tree's selected entries into ``directory``; True if anything was."""
        try:
            nodes = self.repo.load_tree(tree_id)
        except DamagedObject as exc:
            self.result.damaged.append((rel or "/", str(exc)))
            return False
        restored_any = False
        for node in nodes:
            path = f"{rel}/{node.name}"
            chosen = selected or matches(path, self.includes)
            dest = directory / node.name
            if node.type == "dir":
                if not chosen and not could_contain_match(path, self.includes):
                    continue
                self._make_dir(dest)
                assert node.subtree is not None
                inner = self._restore_tree(node.subtree, dest, path, chosen)
                if inner or chosen:
                    self._apply_metadata(dest, node)
                    self.result.dirs += 1
                    restored_any = True
                else:
                    with contextlib.suppress(OSError):
                        dest.rmdir()
                continue
            if not chosen:
                continue
            if self._restore_leaf(node, dest, path):
                restored_any = True
        return restored_any

    def _make_dir(self, dest: Path) -> None:
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            self._remove_existing(dest)
        dest.mkdir(mode=0o700, exist_ok=True)

    def _remove_existing(self, dest: Path) -> None:
        if not self.overwrite:
            raise TargetNotEmpty(f"{dest} already exists; pass --overwrite to replace it")
        if dest.is_dir() and not dest.is_symlink():
            import shutil

            shutil.rmtree(dest)
        else:
            dest.unlink()

    def _restore_leaf(self, node: Node, dest: Path, path: str) -> bool:
        if os.path.lexists(dest):
            self._remove_existing(dest)
        try:
            if node.type == "file":
                if not self._restore_file(node, dest, path):
                    return False
            elif node.type == "symlink":
                os.symlink(node.linktarget, dest)
                self.result.symlinks += 1
            elif node.type == "fifo":
                os.mkfifo(dest, 0o600)
            elif node.type in ("dev", "chardev"):
                if not self.is_root:
                    self.result.warnings.append((path, "device nodes need root; skipped"))
                    return False
                kind = 0o020000 if node.type == "chardev" else 0o060000
                os.mknod(dest, kind | 0o600, node.device)
            else:
                self.result.warnings.append((path, f"{node.type} entries are not restored"))
                return False
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(
                    f"the disk of {self.target} is full after restoring {self.result.files} "
                    f"files; free some space and run the restore again with --overwrite"
                ) from exc
            raise
        self._apply_metadata(dest, node)
        return True

    def _restore_file(self, node: Node, dest: Path, path: str) -> bool:
        if node.links > 1 and node.inode:
            key = (node.device_id, node.inode)
            first = self._hardlinks.get(key)
            if first is not None and first.exists():
                os.link(first, dest)
                self.result.files += 1
                return True
        tmp = dest.with_name(f".{dest.name}.backvault-{secrets.token_hex(4)}")
        content = node.content or []
        written = 0
        try:
            runs = self._runs(content)
            with open(tmp, "wb") as handle:
                window: collections.deque[Future[list[bytes]]] = collections.deque()
                pending = iter(runs)
                for run in pending:
                    window.append(self._pool.submit(self.repo.load_run, run))
                    if len(window) >= _PREFETCH_BLOBS:
                        break
                while window:
                    blobs = window.popleft().result()
                    nxt = next(pending, None)
                    if nxt is not None:
                        window.append(self._pool.submit(self.repo.load_run, nxt))
                    for data in blobs:
                        handle.write(data)
                        written += len(data)
                        self.progress.advance(len(data))
            if written != node.size:
                raise DamagedObject(path, f"restored {written} bytes, expected {node.size}")
            os.replace(tmp, dest)
        except DamagedObject as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.result.damaged.append((path, str(exc)))
            self.progress.note(f"damaged: {path}: {exc}")
            return False
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self.result.files += 1
        self.result.bytes += written
        if node.links > 1 and node.inode:
            self._hardlinks[(node.device_id, node.inode)] = dest
        return True

    def _runs(self, content: list[bytes]) -> list[list[BlobLocation]]:
        """Group a file's blobs into runs stored back to back in one pack (up to 8 MiB), so
        each run is one read: small SQLite chunks would otherwise cost a request each."""
        runs: list[list[BlobLocation]] = []
        size = 0
        for blob_id in content:
            location = self.repo.locate(blob_id)
            if runs:
                prev = runs[-1][-1]
                if (
                    prev.pack_id == location.pack_id
                    and prev.blob.offset + prev.blob.length == location.blob.offset
                    and size + location.blob.length <= _RUN_BYTES
                ):
                    runs[-1].append(location)
                    size += location.blob.length
                    continue
            runs.append([location])
            size = location.blob.length
        return runs

    def _apply_metadata(self, dest: Path, node: Node) -> None:
        try:
            if self.is_root:
                os.lchown(dest, node.uid, node.gid)
            if node.type != "symlink":
                os.chmod(dest, fmt.unix_permissions_from_go(node.mode))
            mtime = parse_ns(node.mtime) if node.mtime else None
            if mtime is not None:
                atime = parse_ns(node.atime) if node.atime else mtime
                os.utime(dest, ns=(atime, mtime), follow_symlinks=False)
        except (OSError, ValueError) as exc:
            self.result.warnings.append((str(dest), f"metadata not restored: {exc}"))
