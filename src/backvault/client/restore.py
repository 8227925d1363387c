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

A snapshot is data from whoever holds the master key, so the restore never writes by
path: every folder is reached from the target's descriptor without following a symlink
(``target_folders``), and everything is created, renamed, linked and changed relative to
it. A symlink in the snapshot is restored as a symlink wherever it points; nothing is
written through one. Trees with duplicate or unsafe names are refused when read (see
``repo.format.decode_tree``) and reported as damaged. With ``overwrite``, what is in the
way is removed as it is (a symlink, not what it points to), and never what this restore
made itself.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import itertools
import os
import secrets
import shutil
import stat as stat_module
import threading
from collections.abc import Iterator
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
from .target_folders import (
    Folder,
    RestoreTarget,
    TargetFolders,
    UnsafeTarget,
    close_target,
    folders_of,
    open_target,
)

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
    """One file being restored: the folder it goes into, its temporary name there, and
    the runs still to write."""

    def __init__(self, node: Node, folder: Folder, path: str, tmp: str, runs: int) -> None:
        self.node = node
        self.folder = folder
        self.path = path
        self.tmp = tmp
        self.remaining = runs
        self.written = 0
        self.error: str | None = None
        self.succeeded = False
        self.lock = threading.Lock()


@dataclass
class _Walk:
    """A folder of the snapshot being walked: what is left of its entries."""

    nodes: Iterator[Node]
    folder: Folder
    path: str
    selected: bool
    node: Node | None  # the folder's own entry (None for the snapshot's root)
    restored_any: bool = False


# Errors that concern one entry (its name is too long for this file system, something
# took its place...): it is reported and the restore goes on.
_ENTRY_ERRNOS = frozenset(
    {
        errno.ENAMETOOLONG,
        errno.EILSEQ,
        errno.EINVAL,
        errno.EEXIST,
        errno.ELOOP,
        errno.ENOTDIR,
        errno.ENOENT,
        errno.EISDIR,
        errno.ENOTEMPTY,
    }
)


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
        self._folders: TargetFolders | None = None
        self._target_ref: RestoreTarget | None = None
        self._budget = ByteBudget(_IN_FLIGHT_BYTES)
        self._batch: list[tuple[_FileJob, list[BlobLocation], int]] = []
        self._batch_bytes = 0
        self._lock = threading.Lock()  # guards result, _open_jobs and _fatal
        self._open_jobs: set[_FileJob] = set()
        self._fatal: BaseException | None = None
        self._hardlinks: dict[tuple[int, int], _FileJob] = {}
        self._deferred_links: list[tuple[_FileJob, Node, Folder, str]] = []
        self._dir_metadata: list[tuple[Folder, Node, str]] = []
        # Folders this restore made or took over (device, inode): never removed by it.
        self._own_folders: set[tuple[int, int]] = set()
        # Temporary names no snapshot can know (so none of its entries can take their
        # place): a random prefix for this restore and a counter.
        self._tmp_prefix = f".backvault-{secrets.token_hex(12)}-"
        self._tmp_count = itertools.count()

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
        total = self._selected_size(snapshot.tree)
        self._target_ref, self._folders = open_target(self.target)
        try:
            self._pool = reader_pool(self.repo.backend, self.repo.key, self._threads)
            self.progress.start(total, "restore")
            try:
                self._restore_tree(snapshot.tree)
                self._submit_batch()
                self._budget.wait_idle()
                self._raise_fatal()
                self._make_deferred_links()
                for folder, node, path in self._dir_metadata:  # children before parents
                    self._apply_folder_metadata(folder, node, path)
            finally:
                self._pool.shutdown(cancel=True)
                self._discard_unfinished()
                self.progress.finish()
        finally:
            close_target(self._target_ref)
        self.result.damaged.sort()
        return self.result

    @property
    def _target_folders(self) -> TargetFolders:
        assert self._folders is not None
        return self._folders

    def _selected_size(self, tree_id: bytes) -> int:
        total = 0
        todo = [(tree_id, "")]
        while todo:  # not recursive: a snapshot may nest folders thousands deep
            tree, rel = todo.pop()
            try:
                nodes = self.repo.load_tree(tree)
            except DamagedObject:
                continue
            for node in nodes:
                path = f"{rel}/{node.name}"
                if node.type == "dir" and node.subtree is not None:
                    if (
                        not self.includes
                        or matches(path, self.includes)
                        or could_contain_match(path, self.includes)
                    ):
                        todo.append((node.subtree, path))
                elif node.type == "file" and (not self.includes or matches(path, self.includes)):
                    total += node.size
        return total

    def _load_nodes(self, tree_id: bytes, path: str) -> list[Node]:
        """A folder's entries; none if its tree is damaged (or breaks the format: names
        that are not one path component, duplicates), which is reported."""
        try:
            return self.repo.load_tree(tree_id)
        except DamagedObject as exc:
            self._add_damaged(path or "/", str(exc))
            return []

    def _restore_tree(self, tree_id: bytes) -> None:
        """Restore the selected entries of the snapshot, folder by folder, depth first
        (with a stack of its own: a snapshot may nest folders thousands deep)."""
        root = _Walk(iter(self._load_nodes(tree_id, "")), (), "", not self.includes, None)
        stack = [root]
        while stack:
            walk = stack[-1]
            node = next(walk.nodes, None)
            if node is None:
                stack.pop()
                if stack:
                    self._leave_folder(walk, stack[-1])
                continue
            self._raise_fatal()
            path = f"{walk.path}/{node.name}"
            chosen = walk.selected or matches(path, self.includes)
            if node.type == "dir":
                if not chosen and not could_contain_match(path, self.includes):
                    continue
                if self._make_folder(walk.folder, node.name, path):
                    assert node.subtree is not None
                    nodes = self._load_nodes(node.subtree, path)
                    stack.append(_Walk(iter(nodes), (*walk.folder, node.name), path, chosen, node))
            elif chosen and self._restore_leaf(node, walk.folder, path):
                walk.restored_any = True

    def _leave_folder(self, walk: _Walk, parent: _Walk) -> None:
        """A folder's entries are all under way: keep it (its metadata is applied at the
        end) if anything in it was restored or it was chosen itself, else remove it."""
        assert walk.node is not None
        if walk.restored_any or walk.selected:
            self._dir_metadata.append((walk.folder, walk.node, walk.path))
            self.result.dirs += 1
            parent.restored_any = True
            return
        with (
            contextlib.suppress(OSError, UnsafeTarget),
            self._target_folders.folder(parent.folder) as fd,
        ):
            os.rmdir(walk.node.name, dir_fd=fd)

    def _make_folder(self, parent: Folder, name: str, path: str) -> bool:
        """Create folder ``name`` in ``parent`` (or keep the folder already there); False
        if it could not be (reported)."""
        try:
            with self._target_folders.folder(parent) as fd:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    if not self._make_room(fd, name, path, for_folder=True):
                        return False
                    with contextlib.suppress(FileExistsError):  # a folder kept
                        os.mkdir(name, 0o700, dir_fd=fd)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (UnsafeTarget, OSError) as exc:
            return self._entry_failed(path, exc)
        if not stat_module.S_ISDIR(st.st_mode):
            self._add_damaged(path, "something else took this folder's place during the restore")
            return False
        self._own_folders.add((st.st_dev, st.st_ino))
        return True

    def _make_room(self, fd: int, name: str, path: str, for_folder: bool) -> bool:
        """Before entry ``name`` is created in the folder ``fd``: remove what is there
        (only with --overwrite, and only what this restore did not make), or keep it if
        it is a folder and a folder is wanted. Nothing is followed: a symlink is removed
        as a symlink, a folder with everything in it but what its symlinks point to."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        is_folder = stat_module.S_ISDIR(st.st_mode)
        if is_folder and (st.st_dev, st.st_ino) in self._own_folders:
            # Two entries of the snapshot landed on one name (a file system that ignores
            # case): the folder restored first may have files still being written.
            self._add_damaged(
                path,
                "another entry of the snapshot was restored under this name (does the "
                "target's file system ignore case?); not restored",
            )
            return False
        if not self.overwrite:
            self._add_damaged(
                path,
                "something already has this name in the target; pass --overwrite to replace it",
            )
            return False
        if is_folder and for_folder:
            return True
        if is_folder:
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
        return True

    def _entry_failed(self, path: str, exc: BaseException) -> bool:
        """Report an entry that could not be restored and go on (False); a full disk and
        other errors that concern the whole restore stop it."""
        if isinstance(exc, UnsafeTarget):
            self._add_damaged(path, str(exc))
            return False
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise self._disk_full() from exc
        if isinstance(exc, OSError) and exc.errno in _ENTRY_ERRNOS:
            self._add_damaged(path, f"cannot be created in the target: {exc.strerror}")
            return False
        raise exc

    def _disk_full(self) -> DiskFull:
        return DiskFull(
            f"the disk of {self.target} is full after restoring {self.result.files} "
            f"files; free some space and run the restore again with --overwrite"
        )

    def _restore_leaf(self, node: Node, folder: Folder, path: str) -> bool:
        name = node.name
        try:
            with self._target_folders.folder(folder) as fd:
                if not self._make_room(fd, name, path, for_folder=False):
                    return False
                if node.type == "file":
                    # Metadata is applied when the last run is written.
                    return self._start_file(node, folder, fd, path)
                if node.type == "symlink":
                    # Where it points is data (it may well point outside the target);
                    # nothing is ever written through it.
                    os.symlink(node.linktarget, name, dir_fd=fd)
                    with self._lock:
                        self.result.symlinks += 1
                elif node.type == "fifo":
                    os.mkfifo(name, 0o600, dir_fd=fd)
                elif node.type in ("dev", "chardev"):
                    if not self.is_root:
                        self._add_warning(path, "device nodes need root; skipped")
                        return False
                    kind = stat_module.S_IFCHR if node.type == "chardev" else stat_module.S_IFBLK
                    os.mknod(name, kind | 0o600, node.device, dir_fd=fd)
                else:
                    self._add_warning(path, f"{node.type} entries are not restored")
                    return False
                self._apply_metadata(fd, name, node, path)
        except (UnsafeTarget, OSError) as exc:
            return self._entry_failed(path, exc)
        return True

    # --- files ---------------------------------------------------------------------------

    def _start_file(self, node: Node, folder: Folder, fd: int, path: str) -> bool:
        """Create the file's temporary copy (or let a worker do it) and hand its runs to
        the workers."""
        link_key = (node.device_id, node.inode) if node.links > 1 and node.inode else None
        if link_key is not None and link_key in self._hardlinks:
            self._deferred_links.append((self._hardlinks[link_key], node, folder, path))
            return True
        try:
            runs = self._runs(node.content or [])
        except DamagedObject as exc:
            self._add_damaged(path, str(exc))
            return False
        # The worker that writes the first run creates the file (one system call less for
        # this busy thread); an empty file is created here.
        tmp = f"{self._tmp_prefix}{next(self._tmp_count)}"
        if not runs:
            os.close(os.open(tmp, _CREATE_FLAGS | os.O_EXCL, 0o600, dir_fd=fd))
        job = _FileJob(node, folder, path, tmp, len(runs))
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
                self._target_ref,
                [(run, job.folder, job.tmp, offset) for job, run, offset in batch],
                work_bytes=charge,
            )
        except BaseException:
            self._budget.give(charge)
            raise
        future.add_done_callback(
            functools.partial(self._batch_done, [job for job, _, _ in batch], charge)
        )

    def _batch_done(
        self, jobs: list[_FileJob], charge: int, future: Future[list[int | RepositoryError]]
    ) -> None:
        """Runs were written (or failed): count them, and finish each file after its last."""
        try:
            if future.cancelled():
                return  # interrupted: the files are removed by _discard_unfinished
            exc = future.exception()
            if exc is not None:
                self._set_fatal(exc)
                outcomes: list[int | RepositoryError] = [0] * len(jobs)
            else:
                outcomes = future.result()
            for job, outcome in zip(jobs, outcomes, strict=True):
                with job.lock:
                    if isinstance(outcome, RepositoryError):
                        job.error = job.error or str(outcome)
                    else:
                        job.written += outcome
                    job.remaining -= 1
                    last = job.remaining == 0
                if not isinstance(outcome, RepositoryError):
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
        try:
            with self._target_folders.folder(job.folder) as fd:
                if job.error is not None or self._fatal is not None:
                    # After a fatal error (a full disk) the restore stops: its unfinished
                    # files are removed, not reported as damaged.
                    with contextlib.suppress(OSError):
                        os.unlink(job.tmp, dir_fd=fd)
                    if job.error is not None and self._fatal is None:
                        self._add_damaged(job.path, job.error)
                        self.progress.note(f"damaged: {job.path}: {job.error}")
                    return
                # The temporary copy gets its metadata before it takes its name.
                self._apply_metadata(fd, job.tmp, job.node, job.path, own_file=True)
                try:
                    os.replace(job.tmp, job.node.name, src_dir_fd=fd, dst_dir_fd=fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(job.tmp, dir_fd=fd)
                    raise
        except (UnsafeTarget, OSError) as exc:
            self._entry_failed(job.path, exc)
            return
        with self._lock:
            self.result.files += 1
            self.result.bytes += job.written
        job.succeeded = True

    def _make_deferred_links(self) -> None:
        """Hard links to files restored earlier in this run; a link is made to the entry
        itself (never through a symlink), in folders opened without following any."""
        for first, node, folder, path in self._deferred_links:
            if not first.succeeded:
                self._add_damaged(path, f"hard link to {first.path}, which was not restored")
                continue
            try:
                with (
                    self._target_folders.folder(first.folder) as source,
                    self._target_folders.folder(folder) as fd,
                ):
                    os.link(
                        first.node.name,
                        node.name,
                        src_dir_fd=source,
                        dst_dir_fd=fd,
                        follow_symlinks=False,
                    )
                    self._apply_metadata(fd, node.name, node, path)
            except (UnsafeTarget, OSError) as exc:
                self._entry_failed(path, exc)
                continue
            self.result.files += 1

    def _discard_unfinished(self) -> None:
        """After an interruption or a fatal error: remove temporary copies left open."""
        with self._lock:
            unfinished = list(self._open_jobs)
            self._open_jobs.clear()
        for job in unfinished:
            with (
                contextlib.suppress(OSError, UnsafeTarget),
                self._target_folders.folder(job.folder) as fd,
            ):
                os.unlink(job.tmp, dir_fd=fd)

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

    def _apply_metadata(
        self, fd: int, name: str, node: Node, path: str, own_file: bool = False
    ) -> None:
        """Owner, mode and times of entry ``name`` of folder ``fd``, none through a
        symlink. ``own_file``: a temporary copy this restore made (O_NOFOLLOW, under a
        name no snapshot knows), which no symlink can have replaced: its mode is set with
        one call, where the no-follow form costs four (glibc emulates it through /proc)."""
        try:
            if self.is_root:
                os.chown(name, node.uid, node.gid, dir_fd=fd, follow_symlinks=False)
            if node.type != "symlink":
                mode = fmt.unix_permissions_from_go(node.mode)
                if own_file:
                    os.chmod(name, mode, dir_fd=fd)
                else:
                    os.chmod(name, mode, dir_fd=fd, follow_symlinks=False)
            mtime = parse_ns(node.mtime) if node.mtime else None
            if mtime is not None:
                atime = parse_ns(node.atime) if node.atime else mtime
                os.utime(name, ns=(atime, mtime), dir_fd=fd, follow_symlinks=False)
        except (OSError, ValueError, NotImplementedError) as exc:
            self._add_warning(path, f"metadata not restored: {exc}")

    def _apply_folder_metadata(self, folder: Folder, node: Node, path: str) -> None:
        """A folder's owner, mode and times, set on the folder's own descriptor."""
        try:
            with self._target_folders.folder(folder) as fd:
                if self.is_root:
                    os.chown(fd, node.uid, node.gid)
                os.chmod(fd, fmt.unix_permissions_from_go(node.mode))
                mtime = parse_ns(node.mtime) if node.mtime else None
                if mtime is not None:
                    atime = parse_ns(node.atime) if node.atime else mtime
                    os.utime(fd, ns=(atime, mtime))
        except (UnsafeTarget, OSError, ValueError) as exc:
            self._add_warning(path, f"metadata not restored: {exc}")


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def restore_runs(
    reader: BlobReader,
    target: RestoreTarget,
    runs: list[tuple[list[BlobLocation], Folder, str, int]],
) -> list[int | RepositoryError]:
    """Runs in a worker: read, verify and write each run at its offset of its file (the
    temporary copy named in its folder, opened from the target without following a
    symlink). Gives each run's bytes written, or what stopped it."""
    folders = folders_of(target)
    outcomes: list[int | RepositoryError] = []
    files: dict[str, int] = {}  # a file's runs often come one after another: open it once
    try:
        for run, folder, tmp, offset in runs:
            fd = files.get(tmp)
            if fd is None:
                try:
                    with folders.folder(folder) as folder_fd:
                        fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=folder_fd)
                except UnsafeTarget as exc:
                    outcomes.append(exc)
                    continue
                files[tmp] = fd
            try:
                outcomes.append(reader.write_run(run, fd, offset))
            except DamagedObject as exc:
                outcomes.append(exc)
    finally:
        for fd in files.values():
            os.close(fd)
    return outcomes
