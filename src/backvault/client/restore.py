"""Restoring a snapshot into a folder.

Each file is written under a temporary name and renamed into place once complete, so a
crash or a damaged blob never leaves a half-written file under its real name. A file whose
data is damaged or missing is named in the result and skipped; every other file is
restored. The target must be empty unless ``overwrite`` is set.

The main thread walks the snapshot, creates folders and cuts every file into runs (blobs
stored back to back in one pack); workers (processes for a repository on a local disk,
threads otherwise: see ``repo.workers``) read, decrypt and verify a run and write it at its
offset with ``pwrite``, so many files, and the parts of one large file, are restored at
once. Whoever writes a file's last run renames it into place. Folder metadata
is applied last, deepest first, once nothing more is written inside.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
import secrets
import shutil
import threading
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..repo import format as fmt
from ..repo.blobs import BlobLocation, BlobReader, reader_pool
from ..repo.errors import DamagedObject, RepositoryError
from ..repo.format import Node, Snapshot
from ..repo.repository import Repository
from ..repo.timefmt import parse_ns
from ..repo.workers import WorkerPool
from .budget import ByteBudget
from .progress import NoProgress, Progress

# A run is read with one request; small runs of small SQLite chunks would cost a request
# (and a task) each, large ones would hold much memory per worker.
_RUN_BYTES = 4 * 1024 * 1024
# Blobs of a run may be this far apart in their pack: reading the gap costs less than
# another request.
_RUN_GAP_BYTES = 256 * 1024
_IN_FLIGHT_BYTES = 32 * 1024 * 1024
# Runs go to the workers in batches of about this many bytes (or _BATCH_RUNS runs): one
# task per small file would spend more time passing tasks between processes than working.
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_RUNS = 64


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


class _FileJob:
    """One file being restored: its temporary name and the runs still to write."""

    def __init__(self, node: Node, dest: Path, path: str, tmp: Path, runs: int) -> None:
        self.node = node
        self.dest = dest
        self.path = path
        self.tmp = tmp
        self.remaining = runs
        self.written = 0
        self.error: str | None = None
        self.succeeded = False
        self.lock = threading.Lock()


class Restorer:
    def __init__(
        self,
        repo: Repository,
        target: str | os.PathLike[str],
        includes: list[str] | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
        workers: int | None = None,
    ) -> None:
        self.repo = repo
        self.target = Path(target).absolute()
        self.includes = includes or []
        self.overwrite = overwrite
        self.progress = progress or NoProgress()
        self.result = RestoreResult()
        self.is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._threads = workers or 4
        self._pool: WorkerPool | None = None
        self._budget = ByteBudget(_IN_FLIGHT_BYTES)
        self._batch: list[tuple[_FileJob, list[BlobLocation], int]] = []
        self._batch_bytes = 0
        self._lock = threading.Lock()  # guards result, _open_jobs and _fatal
        self._open_jobs: set[_FileJob] = set()
        self._fatal: BaseException | None = None
        self._hardlinks: dict[tuple[int, int], _FileJob] = {}
        self._deferred_links: list[tuple[_FileJob, Node, Path, str]] = []
        self._dir_metadata: list[tuple[Path, Node]] = []

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
        self._pool = reader_pool(self.repo.backend, self.repo.key, self._threads)
        self.progress.start(total, "restore")
        try:
            self._restore_tree(snapshot.tree, self.target, "", selected=not self.includes)
            self._submit_batch()
            self._budget.wait_idle()
            self._raise_fatal()
            self._make_deferred_links()
            for dest, node in self._dir_metadata:  # children were listed before parents
                self._apply_metadata(dest, node)
        finally:
            self._pool.shutdown(cancel=True)
            self._discard_unfinished()
            self.progress.finish()
        self.result.damaged.sort()
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
        """Restore a tree's selected entries into ``directory``; True if anything was
        (files count once their restore is under way)."""
        try:
            nodes = self.repo.load_tree(tree_id)
        except DamagedObject as exc:
            self._add_damaged(rel or "/", str(exc))
            return False
        restored_any = False
        for node in nodes:
            self._raise_fatal()
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
                    self._dir_metadata.append((dest, node))
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
            shutil.rmtree(dest)
        else:
            dest.unlink()

    def _disk_full(self) -> DiskFull:
        return DiskFull(
            f"the disk of {self.target} is full after restoring {self.result.files} "
            f"files; free some space and run the restore again with --overwrite"
        )

    def _restore_leaf(self, node: Node, dest: Path, path: str) -> bool:
        if os.path.lexists(dest):
            self._remove_existing(dest)
        try:
            if node.type == "file":
                # Metadata is applied when the last run is written.
                return self._start_file(node, dest, path)
            if node.type == "symlink":
                os.symlink(node.linktarget, dest)
                with self._lock:
                    self.result.symlinks += 1
            elif node.type == "fifo":
                os.mkfifo(dest, 0o600)
            elif node.type in ("dev", "chardev"):
                if not self.is_root:
                    self._add_warning(path, "device nodes need root; skipped")
                    return False
                kind = 0o020000 if node.type == "chardev" else 0o060000
                os.mknod(dest, kind | 0o600, node.device)
            else:
                self._add_warning(path, f"{node.type} entries are not restored")
                return False
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full() from exc
            raise
        self._apply_metadata(dest, node)
        return True

    # --- files ---------------------------------------------------------------------------

    def _start_file(self, node: Node, dest: Path, path: str) -> bool:
        """Open the file's temporary copy and hand its runs to the workers."""
        link_key = (node.device_id, node.inode) if node.links > 1 and node.inode else None
        if link_key is not None and link_key in self._hardlinks:
            self._deferred_links.append((self._hardlinks[link_key], node, dest, path))
            return True
        try:
            runs = self._runs(node.content or [])
        except DamagedObject as exc:
            self._add_damaged(path, str(exc))
            return False
        # The worker that writes the first run creates the file (one system call less for
        # this busy thread); an empty file is created here.
        tmp = dest.with_name(f".{dest.name}.backvault-{secrets.token_hex(4)}")
        if not runs:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        job = _FileJob(node, dest, path, tmp, len(runs))
        with self._lock:
            self._open_jobs.add(job)
        if link_key is not None:
            self._hardlinks[link_key] = job
        if not runs:
            self._finish_file(job)
            return True
        offset = 0
        for run in runs:
            self._batch.append((job, run, offset))
            self._batch_bytes += run[-1].blob.offset + run[-1].blob.length - run[0].blob.offset
            offset += sum(loc.blob.plaintext_length for loc in run)
            if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_RUNS:
                self._submit_batch()
        return True

    def _submit_batch(self) -> None:
        batch, charge = self._batch, self._batch_bytes
        if not batch:
            return
        self._batch, self._batch_bytes = [], 0
        assert self._pool is not None
        self._budget.take(charge)
        try:
            future = self._pool.submit(
                restore_runs,
                [(run, str(job.tmp), offset) for job, run, offset in batch],
                work_bytes=charge,
            )
        except BaseException:
            self._budget.give(charge)
            raise
        future.add_done_callback(
            functools.partial(self._batch_done, [job for job, _, _ in batch], charge)
        )

    def _batch_done(
        self, jobs: list[_FileJob], charge: int, future: Future[list[int | DamagedObject]]
    ) -> None:
        """Runs were written (or failed): count them, and finish each file after its last."""
        try:
            if future.cancelled():
                return  # interrupted: the files are removed by _discard_unfinished
            exc = future.exception()
            if exc is not None:
                self._set_fatal(exc)
                outcomes: list[int | DamagedObject] = [0] * len(jobs)
            else:
                outcomes = future.result()
            for job, outcome in zip(jobs, outcomes, strict=True):
                with job.lock:
                    if isinstance(outcome, DamagedObject):
                        job.error = job.error or str(outcome)
                    else:
                        job.written += outcome
                    job.remaining -= 1
                    last = job.remaining == 0
                if not isinstance(outcome, DamagedObject):
                    self.progress.advance(outcome)
                if last:
                    self._finish_file(job)
        except BaseException as exc:
            self._set_fatal(exc)
        finally:
            self._budget.give(charge)

    def _finish_file(self, job: _FileJob) -> None:
        """Rename the temporary copy into place, or remove it if it is damaged."""
        with self._lock:
            self._open_jobs.discard(job)  # from now on this takes care of its file
        if self._fatal is None and job.error is None and job.written != job.node.size:
            job.error = f"restored {job.written} bytes, expected {job.node.size}"
        if job.error is not None or self._fatal is not None:
            # After a fatal error (a full disk) the restore stops: its unfinished files are
            # removed, not reported as damaged.
            with contextlib.suppress(OSError):
                job.tmp.unlink()
            if job.error is not None and self._fatal is None:
                self._add_damaged(job.path, job.error)
                self.progress.note(f"damaged: {job.path}: {job.error}")
            return
        try:
            os.replace(job.tmp, job.dest)
        except BaseException:
            with contextlib.suppress(OSError):
                job.tmp.unlink()
            raise
        with self._lock:
            self.result.files += 1
            self.result.bytes += job.written
        job.succeeded = True
        self._apply_metadata(job.dest, job.node)

    def _make_deferred_links(self) -> None:
        for first, node, dest, path in self._deferred_links:
            if first.succeeded:
                os.link(first.dest, dest)
                self._apply_metadata(dest, node)
                self.result.files += 1
            else:
                self._add_damaged(path, f"hard link to {first.path}, which was not restored")

    def _discard_unfinished(self) -> None:
        """After an interruption or a fatal error: remove temporary copies left open."""
        with self._lock:
            unfinished = list(self._open_jobs)
            self._open_jobs.clear()
        for job in unfinished:
            with contextlib.suppress(OSError):
                job.tmp.unlink()

    def _set_fatal(self, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            exc = self._disk_full()
        elif isinstance(exc, BrokenProcessPool):
            exc = RepositoryError(
                "a restore worker process stopped unexpectedly (out of memory?); run the "
                "restore again with --overwrite"
            )
        with self._lock:
            if self._fatal is None:
                self._fatal = exc

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _add_damaged(self, path: str, error: str) -> None:
        with self._lock:
            self.result.damaged.append((path, error))

    def _add_warning(self, path: str, warning: str) -> None:
        with self._lock:
            self.result.warnings.append((path, warning))

    def _runs(self, content: list[bytes]) -> list[list[BlobLocation]]:
        """Group a file's blobs into runs that lie close together in one pack, so each run
        is one read (skipping what lies between): small SQLite chunks would otherwise cost
        a request each, and after an incremental backup a database's chunks sit in the
        older packs with gaps where the changed ones were."""
        runs: list[list[BlobLocation]] = []
        for blob_id in content:
            location = self.repo.locate(blob_id)
            if runs:
                first, prev = runs[-1][0].blob, runs[-1][-1].blob
                gap = location.blob.offset - (prev.offset + prev.length)
                if (
                    runs[-1][-1].pack_id == location.pack_id
                    and 0 <= gap <= _RUN_GAP_BYTES
                    and location.blob.offset + location.blob.length - first.offset <= _RUN_BYTES
                ):
                    runs[-1].append(location)
                    continue
            runs.append([location])
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
            self._add_warning(str(dest), f"metadata not restored: {exc}")


def restore_runs(
    reader: BlobReader, runs: list[tuple[list[BlobLocation], str, int]]
) -> list[int | DamagedObject]:
    """Runs in a worker: read, verify and write each run at its offset of its file. Gives
    each run's bytes written, or the damage that stopped it."""
    outcomes: list[int | DamagedObject] = []
    files: dict[str, int] = {}  # a file's runs often come one after another: open it once
    try:
        for run, path, offset in runs:
            fd = files.get(path)
            if fd is None:
                fd = files[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                outcomes.append(reader.write_run(run, fd, offset))
            except DamagedObject as exc:
                outcomes.append(exc)
    finally:
        for fd in files.values():
            os.close(fd)
    return outcomes
