"""Restoring a snapshot into a folder.

Every entry but a folder is made in a staging folder of the restore's own (mode 0700, a
random name, inside the target: see ``target_folders``), given its owner, mode and times
there, and only then renamed into place; a file once all its data is written and
verified. So a crash or a damaged blob never leaves a half-written file under its real
name, ``--overwrite`` replaces an old file (or symlink) only with a complete new one, in
one rename, and another user who can write into a folder of the target never sees a name
the restore will still act on. A file whose data is damaged or missing, or an entry the
target refuses (a name too long, a folder that is not writable...), is named in the result
and skipped; every other entry is restored. The target must be empty unless ``overwrite``
is set.

The main thread walks the snapshot, makes folders and cuts every file into runs (blobs
stored back to back in one pack); workers (processes for a repository on a local disk,
threads otherwise: see ``repo.workers``) read, decrypt and verify a run and write it at its
offset with ``pwrite`` into the file the main thread created, so many files, and the parts
of one large file, are restored at once. Whoever writes a file's last run puts it in place.
A folder is made in the staging folder too and renamed into place empty (mode 0700 until it
is finished); it gets its own owner, mode and times, through its descriptor, as soon as
everything in it is in place.

A snapshot is data from whoever holds the master key, so the restore never writes by
path: every folder is reached from the target's descriptor without following a symlink
and checked to be the folder the restore made or found. A symlink in the snapshot is
restored as a symlink wherever it points; nothing is written through one. Trees with
duplicate or unsafe names, or numbers out of range, are refused when read (see
``repo.format.decode_tree``) and reported as damaged. With ``overwrite``, what is in the
way is replaced as it is (a symlink, not what it points to), never what this restore made
itself, and never before its replacement is complete.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
import re
import secrets
import shlex
import stat as stat_module
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backvault.engine.parallel import Batcher, WorkerPool, reader_pool
from backvault.engine.progress import NoProgress, Progress, human_bytes
from backvault.engine.target_folders import (
    FOLDER_FLAGS,
    FolderRef,
    NotPrivate,
    StagedFile,
    StagingRef,
    TargetFolders,
    UnsafeTarget,
    empty_folder,
    make_private,
    open_staged,
    open_target,
    others_can_change,
    resolve_target,
    share_staging,
    unshare_staging,
)
from backvault.engine.walk import TooManyEntries, walk
from backvault.repo import format as fmt
from backvault.repo.blobs import BlobLocation, BlobReader
from backvault.repo.errors import DamagedObject, RepositoryError
from backvault.repo.format import Node, Snapshot
from backvault.repo.repository import Repository
from backvault.repo.timefmt import parse_ns

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

STAGING_PREFIX = ".backvault-restore-"
_LEFTOVER = re.compile(re.escape(STAGING_PREFIX) + "[0-9a-f]{16}")
_SETID_BITS = stat_module.S_ISUID | stat_module.S_ISGID
# The damaged entries and warnings a result lists (the rest are counted), and the longest
# path it lists whole: a hostile snapshot nests folders 16,000 deep with 255-character
# names (4 MB paths), and gives every entry a warning.
MAX_LISTED = 1000
MAX_LISTED_PATH = 4096

# Where an entry is, for messages: its path, or how to build it (built only if a message
# needs it: a folder keeps no path of its own, see ``_FolderJob.path``).
Where = str | Callable[[], str]


class TargetNotEmpty(RepositoryError):
    pass


class DiskFull(RepositoryError):
    pass


class NotEnoughSpace(RepositoryError):
    pass


class EntryRefused(RepositoryError):
    """An entry cannot take its name (something else has it): reported, not restored."""


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # the first MAX_LISTED
    warnings: list[tuple[str, str]] = field(default_factory=list)  # the first MAX_LISTED
    damaged_unlisted: int = 0  # damaged entries beyond those listed
    warnings_unlisted: int = 0

    @property
    def damaged_count(self) -> int:
        return len(self.damaged) + self.damaged_unlisted

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "bytes": self.bytes,
            "damaged": [{"path": p, "error": e} for p, e in self.damaged],
            "warnings": [{"path": p, "warning": w} for p, w in self.warnings],
            "damaged_unlisted": self.damaged_unlisted,
            "warnings_unlisted": self.warnings_unlisted,
        }


def _listed(where: Where) -> str:
    """A path as a result lists it: whole up to MAX_LISTED_PATH characters, else its
    start and its end."""
    path = where if isinstance(where, str) else where()
    if len(path) <= MAX_LISTED_PATH:
        return path
    return f"{path[:1024]}/…({len(path):,} characters)…/{path[-(MAX_LISTED_PATH - 1100) :]}"


def matches(path: str, patterns: list[str], *, ancestors: bool = True) -> bool:
    """restic-style include: a pattern with a leading / is anchored at the snapshot root;
    one without matches any trailing run of path components. A match on a directory
    selects everything below it. With ``ancestors=False`` only the path itself is tried
    (the walk knows that no folder above it matched): a snapshot nests folders thousands
    deep, and trying every ancestor of every entry cost the cube of the depth."""
    parts = path.strip("/").split("/")
    for pattern in patterns:
        anchored = pattern.startswith("/")
        pparts = pattern.strip("/").split("/")
        size = len(pparts)
        if anchored:
            ends: range | list[int] = [size] if ancestors or size == len(parts) else []
        else:
            ends = range(size, len(parts) + 1) if ancestors else [len(parts)]
        for end in ends:  # the path or one of its ancestors: its last ``size`` components
            if end < size or end > len(parts):
                continue
            window = parts[end - size : end]
            if all(fnmatch.fnmatchcase(c, p) for c, p in zip(window, pparts, strict=True)):
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


@dataclass(eq=False)
class _Staging:
    """A staging folder: where it is (its parent is the folder it was made in), its
    descriptor, and how workers find it."""

    ref: FolderRef
    fd: int
    shared: StagingRef
    folder: _FolderJob  # the folder it was made in


@dataclass(eq=False)
class _FolderJob:
    """A folder of the snapshot being restored (or the target itself, with no node).
    ``pending`` counts what must be done before its own owner, mode and times are set:
    its walk, its files still being written, its hard links still to make, its folders
    not yet finished. Its path is not kept (``ref`` links it to its parent): a chain of
    folders 16,000 deep with 255-character names would hold 32 GB of paths."""

    ref: FolderRef
    node: Node | None
    parent: _FolderJob | None
    made: bool  # this restore made it (else it was there: the target, or kept by --overwrite)
    aside: str | None = None  # what had its name, moved into the staging folder
    pending: int = 1
    keep: bool = True  # False once its walk found nothing selected in it: it is removed

    @property
    def path(self) -> str:
        """Its path in the snapshot ("" for the target), built from the names on the way
        (for messages only)."""
        return "".join(f"/{name}" for name in self.ref.names())


class _FileJob:
    """One file being restored: the folder it goes into, its temporary copy in a staging
    folder, and the runs still to write."""

    def __init__(
        self,
        node: Node,
        folder: _FolderJob,
        staging: _Staging,
        staged: StagedFile,
        runs: int,
        anchor: bool,
    ) -> None:
        self.node = node
        self.folder = folder
        self.staging = staging
        self.staged = staged
        self.remaining = runs
        # The first of a hard-link group: its temporary copy stays in the staging folder,
        # where the others are linked from (never from a name someone else could replace).
        self.anchor = anchor
        self.written = 0
        self.error: str | None = None
        self.succeeded = False
        self.lock = threading.Lock()

    @property
    def path(self) -> str:
        """Built when a message needs it (not kept: see ``_FolderJob``)."""
        return f"{self.folder.path}/{self.node.name}"


@dataclass
class _Walk:
    """A folder of the snapshot being walked: where it goes, and what of it is restored."""

    folder: _FolderJob
    selected: bool
    restored_any: bool = False


# Errors that concern one entry (its name is too long for this file system, something
# took its place, the folder it goes into refuses it...): it is reported and the restore
# goes on.
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
        errno.EPERM,
        errno.EACCES,
        errno.EFBIG,
        errno.EXDEV,
        errno.EOPNOTSUPP,
        errno.EMLINK,
        errno.EBUSY,
        errno.EROFS,
    }
)
# Errors that concern the whole restore: it stops.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class Restorer:
    def __init__(
        self,
        repo: Repository,
        target: str | os.PathLike[str],
        includes: list[str] | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
        workers: int | None = None,
        *,
        special_files: bool = False,
        keep_setuid: bool = False,
        max_entries: int = fmt.MAX_RESTORE_ENTRIES,
        ignore_free_space: bool = False,
    ) -> None:
        self.repo = repo
        self.target = Path(target).absolute()
        self.includes = includes or []
        self.overwrite = overwrite
        self.progress = progress or NoProgress()
        # A chat history holds no device nodes and no setuid programs; a hostile snapshot
        # restored by root could plant both: they come back only when asked for.
        self.special_files = special_files
        self.keep_setuid = keep_setuid
        self.max_entries = max_entries
        self.ignore_free_space = ignore_free_space
        self.result = RestoreResult()
        self.euid = os.geteuid()
        self.is_root = self.euid == 0
        self._threads = workers or 4
        self._pool: WorkerPool | None = None
        self._folders: TargetFolders | None = None
        self._root: _FolderJob | None = None
        self._resolved = ""
        self._stagings: dict[int, _Staging] = {}  # by device
        # The top folder within the target of each file system met there (the target's
        # own, and a mount point's): where its staging folder is made.
        self._device_tops: dict[int, _FolderJob] = {}
        self._batcher: Batcher[_RunPayload, _FileJob, list[int | RepositoryError]] | None = None
        self._lock = threading.Lock()  # guards result, pending counts and _fatal
        self._fatal: BaseException | None = None
        self._hardlinks: dict[tuple[int, int], _FileJob] = {}
        self._deferred_links: list[tuple[_FileJob, Node, _FolderJob]] = []
        # Folders this restore made or took over (device, inode): never replaced by it.
        self._own_folders: set[tuple[int, int]] = set()
        # Folders that took the name of an entry --overwrite moved aside (put back if the
        # restore stops before they are finished).
        self._replacing: list[_FolderJob] = []
        self._totals: dict[bytes, tuple[int, int]] = {}  # entries and bytes, by tree

    def run(self, snapshot: Snapshot, name: str | None = None) -> RestoreResult:
        """Restore ``snapshot`` (``name``: its ID, for messages)."""
        self._open_target()
        try:
            self.repo.ensure_index()
            total = self._plan(snapshot.tree, f"snapshot {name[:8]}" if name else "the snapshot")
            self._check_free_space(total)
            completed = False
            try:
                self._first_staging()
                self._pool = reader_pool(self.repo.backend, self.repo.key, self._threads)
                self._batcher = Batcher(
                    self._pool,
                    restore_runs,
                    self._batch_done,
                    budget_bytes=_IN_FLIGHT_BYTES,
                    batch_bytes=_BATCH_BYTES,
                    batch_items=_BATCH_RUNS,
                )
                self.progress.start(total, "restore")
                self._restore_tree(snapshot.tree)
                self._batcher.submit()
                self._batcher.wait_idle()
                self._raise_fatal()
                self._make_deferred_links()
                completed = True
            finally:
                if self._pool is not None:
                    self._pool.shutdown(cancel=True)
                if not completed:
                    self._put_back_replaced()
                self._remove_stagings()
                self.progress.finish()
        finally:
            self._target_folders.close()
        self.result.damaged.sort()
        return self.result

    @property
    def _target_folders(self) -> TargetFolders:
        assert self._folders is not None
        return self._folders

    # --- the target ----------------------------------------------------------------------

    def _open_target(self) -> None:
        """Resolve the target's path once (a symlink on the way is followed only if it
        belongs to root or to this user: see ``resolve_target``), open it one component
        at a time without following anything (making what is missing), and from then on
        use only that descriptor: the
        emptiness check is made on it, so a target swapped for a symlink after it was
        checked is never written into (worker processes, which open it by path, find out
        and stop)."""
        self._resolved = resolve_target(str(self.target), self.euid)
        fd, on_the_way = open_target(self._resolved)
        try:
            names = os.listdir(fd)
            # Private folders of restores that were killed (or are still running): not
            # content of the target, never touched (one may be in use), but named.
            leftovers = sorted(name for name in names if _LEFTOVER.fullmatch(name))
            left = self._leftover_note(leftovers)
            if len(names) > len(leftovers) and not self.overwrite:
                raise TargetNotEmpty(
                    f"the target {self.target} is not empty; choose an empty folder, or pass "
                    f"--overwrite to replace what is there{f' ({left})' if left else ''}"
                )
        except BaseException:
            os.close(fd)
            raise
        st = on_the_way[-1][1]
        root = FolderRef(None, "", st.st_dev, st.st_ino)
        self._folders = TargetFolders(root, fd)
        self._root = _FolderJob(root, None, None, made=False)
        self._device_tops[st.st_dev] = self._root
        if left:
            self._add_warning(str(self.target), left)
        # Whoever restores (not only root): another user who can change a folder on the
        # way can move the restored data elsewhere, or swap in her own.
        for where, folder in on_the_way:
            why = others_can_change(folder, self.euid)
            if why is not None:
                self._add_warning(
                    where,
                    f"other users can change this folder on the way to the target ({why}): "
                    "they can move or replace what is restored there",
                )
                break

    def _leftover_note(self, names: list[str]) -> str:
        """What to say about private folders left in the target by other restores."""
        if not names:
            return ""
        paths = " ".join(shlex.quote(f"{self._resolved.rstrip('/')}/{name}") for name in names)
        what = f"{names[0]} is" if len(names) == 1 else f"{', '.join(names)} are"
        them = "it" if len(names) == 1 else "them"
        return (
            f"{what} left by a restore that was interrupted (or is still running), not part "
            f"of the target; once no restore into it is running, remove {them} with: "
            f"rm -rf -- {paths}"
        )

    def _check_free_space(self, needed: int) -> None:
        """Refuse, before anything is written or moved aside, a restore whose files do not
        fit in the free space of the target's file system (what ``--overwrite`` replaces
        is freed only once its replacement is complete)."""
        if self.ignore_free_space:
            return
        st = os.statvfs(self._target_folders.root_fd)
        # Root may fill the blocks kept back for it; other users may not.
        free = (st.f_bfree if self.is_root else st.f_bavail) * st.f_frsize
        if needed > free:
            raise NotEnoughSpace(
                f"the restore needs {human_bytes(needed)}, the target {self.target} has "
                f"{human_bytes(free)} free; free space or use --ignore-free-space"
            )

    def _first_staging(self) -> None:
        """The staging folder in the target: made first, so that a target this user
        cannot write into is one clear error."""
        assert self._root is not None
        try:
            self._staging_for(self._root)
        except OSError as exc:
            raise RepositoryError(
                f"cannot write into the target {self.target}: {exc.strerror or exc}"
            ) from exc

    def _staging_for(self, folder: _FolderJob) -> _Staging:
        """The staging folder on ``folder``'s device (so renames from it into ``folder``
        stay on one file system: a mount point inside the target has its own), made on
        first need in that file system's top folder within the target."""
        staging = self._stagings.get(folder.ref.device)
        if staging is not None:
            return staging
        folder = self._device_tops.get(folder.ref.device, folder)
        name = f"{STAGING_PREFIX}{secrets.token_hex(8)}"
        path = "/".join([self._resolved.rstrip("/"), *folder.ref.names(), name])
        with self._target_folders.folder(folder.ref) as parent:
            os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, FOLDER_FLAGS, dir_fd=parent)
            # Between mkdir and open someone who can write the folder could put another in
            # its place: only this user (or root) can own one, and it must be empty. A
            # default ACL of the target, or a file system that ignores the create mode,
            # could let others in: it is made 0700 without ACLs, and checked to be.
            try:
                if os.listdir(fd):
                    raise NotPrivate(
                        f"the restore's private folder {path} is not empty: another user "
                        "replaced it"
                    )
                make_private(fd, self.euid, path)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=parent)
                raise
        st = os.fstat(fd)
        shared = StagingRef(path, st.st_dev, st.st_ino)
        staging = _Staging(FolderRef(folder.ref, name, st.st_dev, st.st_ino), fd, shared, folder)
        share_staging(shared, fd)
        self._stagings[st.st_dev] = staging
        return staging

    def _put_back_replaced(self) -> None:
        """The restore stopped (interrupted, a full disk, a fatal error): a folder that took
        the name of an entry ``--overwrite`` moved aside, and is not finished, is no
        complete replacement. It goes into the private folder (removed with it), and what
        it replaced comes back under its name."""
        for folder in reversed(self._replacing):
            if folder.aside is None or folder.pending == 0 or folder.parent is None:
                continue
            try:
                staging = self._staging_for(folder.parent)
                with self._target_folders.folder(folder.parent.ref) as parent:
                    st = os.stat(folder.ref.name, dir_fd=parent, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) != (folder.ref.device, folder.ref.inode):
                        raise UnsafeTarget("another entry took its name")
                    self._target_folders.forget(folder.ref)
                    os.rename(
                        folder.ref.name,
                        secrets.token_hex(8),
                        src_dir_fd=parent,
                        dst_dir_fd=staging.fd,
                    )
                    os.rename(
                        folder.aside, folder.ref.name, src_dir_fd=staging.fd, dst_dir_fd=parent
                    )
                    folder.aside = None
            except (OSError, UnsafeTarget) as exc:
                self._add_warning(
                    folder.path, f"what this folder replaced could not be put back: {exc}"
                )

    def _remove_stagings(self) -> None:
        """Remove the staging folders with what is left in them: temporary copies of
        unfinished or damaged files, hard-link anchors, entries that --overwrite moved
        aside."""
        for staging in self._stagings.values():
            unshare_staging(staging.shared)
            try:
                # Not shutil.rmtree: it recurses (a folder nested 1200 deep ended the
                # restore in RecursionError) and opens what it meets as a folder without
                # O_DIRECTORY or O_NOFOLLOW (a fifo or a device swapped in by whoever can
                # still change what was moved aside).
                empty_folder(staging.fd)
                assert staging.ref.parent is not None
                with self._target_folders.folder(staging.ref.parent) as parent:
                    st = os.stat(staging.ref.name, dir_fd=parent, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == (staging.ref.device, staging.ref.inode):
                        os.rmdir(staging.ref.name, dir_fd=parent)
                        self._restore_times(staging.folder, parent)
            except (OSError, UnsafeTarget) as exc:
                self._add_warning(
                    staging.shared.path, f"the restore's private folder was not removed: {exc}"
                )
            finally:
                os.close(staging.fd)
        self._stagings.clear()

    def _restore_times(self, folder: _FolderJob, fd: int) -> None:
        """Removing a staging folder changed the times of the folder it was in (a mount
        point's top folder, restored from the snapshot): give it its own again."""
        node = folder.node
        if node is None or not folder.keep or folder.pending:
            return  # the target itself, or a folder that was not finished
        problems: list[str] = []
        times = _times(node, problems)
        if times is not None:
            _attempt(problems, os.utime, fd, ns=times)
        if problems:
            self._add_warning(lambda: folder.path, f"metadata not restored: {'; '.join(problems)}")

    # --- what to restore -----------------------------------------------------------------

    def _plan(self, tree_id: bytes, label: str) -> int:
        """The bytes the restore will write; refuses a snapshot that expands to more
        entries than ``max_entries`` (folders sharing subtrees), before writing anything."""
        entries, size = fmt.expanded_totals(tree_id, self._tree_shape, self._totals)
        if entries > self.max_entries:
            raise TooManyEntries(
                f"{label} expands to {entries:,} entries (its folders share subtrees), more "
                f"than the {self.max_entries:,} a restore makes; nothing was restored"
            )
        return self._selected_size(tree_id) if self.includes else size

    def _tree_shape(self, tree_id: bytes) -> fmt.TreeShape | None:
        try:
            return fmt.TreeShape.of(self.repo.load_tree(tree_id))
        except DamagedObject:
            return None

    def _selected_size(self, tree_id: bytes) -> int:
        """The bytes of the files ``includes`` select: a selected folder's from the
        totals, the rest walked (bounded by the snapshot's expansion, checked first)."""
        includes = self.includes

        def selected_folder(path: str, node: Node) -> bool:
            return node.type == "dir" and matches(path, includes, ancestors=False)

        def descend(path: str, node: Node) -> bool:
            return (
                node.type == "dir"
                and not matches(path, includes, ancestors=False)
                and could_contain_match(path, includes)
            )

        total = 0
        for path, node in walk(
            self.repo, tree_id, descend=descend, on_damaged=_ignore, max_entries=None
        ):
            if node.subtree is not None and selected_folder(path, node):
                total += fmt.expanded_totals(node.subtree, self._tree_shape, self._totals)[1]
            elif node.type == "file" and matches(path, includes, ancestors=False):
                total += fmt.restorable_size(node)
        return total

    # --- the walk ------------------------------------------------------------------------

    def _restore_tree(self, tree_id: bytes) -> None:
        """Restore the selected entries of the snapshot, folder by folder, depth first
        (``engine.walk``: a stack of its own, the snapshot's expansion checked by
        ``_plan``). ``stack`` holds the folders being walked, the deepest last."""
        assert self._root is not None
        stack = [_Walk(self._root, not self.includes)]
        entering: list[bool] = []  # whether the folder being entered was chosen

        def descend(path: str, node: Node) -> bool:
            if node.type != "dir":
                return False
            chosen = stack[-1].selected or matches(path, self.includes, ancestors=False)
            entering[:] = [chosen]
            return chosen or could_contain_match(path, self.includes)

        def enter(path: str, node: Node) -> bool:
            # Its tree was read: a damaged folder is reported before anything is made or
            # replaced (what --overwrite finds under its name stays as it is).
            folder = self._make_folder(stack[-1].folder, node, path)
            if folder is None:
                return False
            stack.append(_Walk(folder, entering[0]))
            return True

        def leave(path: str) -> None:
            done = stack.pop()
            self._leave_folder(done, stack[-1] if stack else None)

        def damaged(path: str, exc: DamagedObject) -> None:
            self._add_damaged(path or "/", str(exc))

        for path, node in walk(
            self.repo,
            tree_id,
            descend=descend,
            enter=enter,
            leave=leave,
            on_damaged=damaged,
            max_entries=None,
        ):
            self._raise_fatal()
            if node.type == "dir":
                continue
            here = stack[-1]
            chosen = here.selected or matches(path, self.includes, ancestors=False)
            if chosen and self._restore_leaf(node, here.folder, path):
                here.restored_any = True

    def _leave_folder(self, walk: _Walk, parent: _Walk | None) -> None:
        """A folder's entries are all under way: keep it if anything in it was restored
        or it was chosen itself (else it is removed, if this restore made it); its
        metadata is set once everything in it is in place."""
        folder = walk.folder
        if parent is not None:
            folder.keep = walk.restored_any or walk.selected
            if folder.keep:
                with self._lock:
                    self.result.dirs += 1
                parent.restored_any = True
        self._release(folder)

    def _release(self, folder: _FolderJob | None) -> None:
        """One thing ``folder`` waited for is done; finish it (and then its parent, and
        so on up) when nothing is left."""
        while folder is not None:
            with self._lock:
                folder.pending -= 1
                done = folder.pending == 0
            if not done:
                return
            self._finish_folder(folder)
            folder = folder.parent

    def _hold(self, folder: _FolderJob) -> None:
        with self._lock:
            folder.pending += 1

    def _finish_folder(self, folder: _FolderJob) -> None:
        """Everything in ``folder`` is in place: set its owner, mode and times through its
        descriptor (or remove it: made, and nothing selected in it)."""
        if folder.node is None:
            return  # the target itself
        try:
            if not folder.keep:
                if folder.made and folder.parent is not None:
                    # Walked only because it might hold a selected entry: it goes, and what
                    # had its name comes back.
                    self._target_folders.forget(folder.ref)
                    with self._target_folders.folder(folder.parent.ref) as parent:
                        os.rmdir(folder.ref.name, dir_fd=parent)
                        if folder.aside is not None:
                            staging = self._staging_for(folder.parent)
                            os.rename(
                                folder.aside,
                                folder.ref.name,
                                src_dir_fd=staging.fd,
                                dst_dir_fd=parent,
                            )
                return
            with self._target_folders.folder(folder.ref) as fd:
                self._set_metadata(fd, folder.node, lambda: folder.path, is_folder=True)
        except (UnsafeTarget, OSError) as exc:
            self._add_warning(lambda: folder.path, f"metadata not restored: {exc}")

    def _make_folder(self, parent: _FolderJob, node: Node, path: str) -> _FolderJob | None:
        """Folder ``node`` in ``parent``: made in the staging folder and renamed into
        place, or kept if a folder is there (with --overwrite); None if it cannot be
        (reported)."""
        name = node.name
        try:
            with self._target_folders.folder(parent.ref) as parent_fd:
                existing = _lstat(name, parent_fd)
                if existing is not None:
                    self._check_in_the_way(existing)
                    if stat_module.S_ISDIR(existing.st_mode):
                        return self._keep_folder(parent, parent_fd, node)
                staging = self._staging_for(parent)
                tmp = secrets.token_hex(8)
                os.mkdir(tmp, 0o700, dir_fd=staging.fd)
                fd = os.open(tmp, FOLDER_FLAGS, dir_fd=staging.fd)
                try:
                    # 0700 and no ACL until everything in it is in place (its own mode
                    # is set then).
                    make_private(fd, self.euid, f"{staging.shared.path}/{tmp}")
                    aside = self._move_in(staging, tmp, parent_fd, name, existing is not None)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.rmdir(tmp, dir_fd=staging.fd)
                    raise
        except (UnsafeTarget, EntryRefused, OSError, OverflowError) as exc:
            self._entry_failed(path, exc)
            return None
        st = os.fstat(fd)
        ref = FolderRef(parent.ref, name, st.st_dev, st.st_ino)
        self._target_folders.add(ref, fd)
        self._own_folders.add((st.st_dev, st.st_ino))
        self._hold(parent)
        job = _FolderJob(ref, node, parent, made=True, aside=aside)
        if aside is not None:
            self._replacing.append(job)
        return job

    def _keep_folder(self, parent: _FolderJob, parent_fd: int, node: Node) -> _FolderJob:
        """With --overwrite, a folder already has this name: restore into it."""
        fd = os.open(node.name, FOLDER_FLAGS, dir_fd=parent_fd)
        st = os.fstat(fd)
        ref = FolderRef(parent.ref, node.name, st.st_dev, st.st_ino)
        self._target_folders.add(ref, fd)
        self._own_folders.add((st.st_dev, st.st_ino))
        self._hold(parent)
        job = _FolderJob(ref, node, parent, made=False)
        if st.st_dev != parent.ref.device:  # a mount point: the top of its file system
            self._device_tops.setdefault(st.st_dev, job)
        return job

    def _check_in_the_way(self, existing: os.stat_result) -> None:
        """Something has the entry's name: it may be replaced (or restored into) only
        with --overwrite, and never if this restore made it."""
        if (
            stat_module.S_ISDIR(existing.st_mode)
            and (existing.st_dev, existing.st_ino) in self._own_folders
        ):
            # Two entries of the snapshot landed on one name (a file system that ignores
            # case): the folder restored first may have files being written into it.
            raise EntryRefused(
                "another entry of the snapshot was restored under this name (does the "
                "target's file system ignore case?); not restored"
            )
        if not self.overwrite:
            raise _name_taken()

    def _move_in(
        self, staging: _Staging, tmp: str, fd: int, name: str, aside: bool = False
    ) -> str | None:
        """Rename ``tmp`` from the staging folder to ``name`` in folder ``fd``. With
        ``aside``, what has the name (not a folder this restore made) is first moved into
        the staging folder (removed with it at the end), and put back if the rename
        fails; gives its name there."""
        if not aside:
            os.rename(tmp, name, src_dir_fd=staging.fd, dst_dir_fd=fd)
            return None
        moved = secrets.token_hex(8)
        os.rename(name, moved, src_dir_fd=fd, dst_dir_fd=staging.fd)
        try:
            os.rename(tmp, name, src_dir_fd=staging.fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(moved, name, src_dir_fd=staging.fd, dst_dir_fd=fd)
            raise
        return moved

    def _place(self, staging: _Staging, tmp: str, folder: _FolderJob, name: str) -> None:
        """Put the finished entry ``tmp`` (not a folder) in place. In a folder this
        restore made, nothing but its own entries can be there; elsewhere, without
        --overwrite, an existing name is never replaced (a hard link fails if it exists);
        with it, a file or symlink is replaced in one rename and a folder in the way is
        moved aside first."""
        with self._target_folders.folder(folder.ref) as fd:
            if not folder.made and not self.overwrite:
                try:
                    os.link(tmp, name, src_dir_fd=staging.fd, dst_dir_fd=fd, follow_symlinks=False)
                except FileExistsError as exc:
                    raise _name_taken() from exc
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                        raise
                    # No hard links on this file system: look, then rename.
                    if _lstat(name, fd) is not None:
                        raise _name_taken() from exc
                    os.rename(tmp, name, src_dir_fd=staging.fd, dst_dir_fd=fd)
                    return
                os.unlink(tmp, dir_fd=staging.fd)
                return
            try:
                os.rename(tmp, name, src_dir_fd=staging.fd, dst_dir_fd=fd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                existing = _lstat(name, fd)
                if existing is None or not stat_module.S_ISDIR(existing.st_mode):
                    raise
                self._check_in_the_way(existing)
            self._move_in(staging, tmp, fd, name, aside=True)

    def _entry_failed(self, path: Where, exc: BaseException) -> bool:
        """Report an entry that could not be restored and go on (False); a full disk and
        other errors that concern the whole restore stop it."""
        if isinstance(exc, UnsafeTarget | EntryRefused):
            self._add_damaged(path, str(exc))
            return False
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            raise self._disk_full() from exc
        if isinstance(exc, OSError) and exc.errno in _ENTRY_ERRNOS:
            self._add_damaged(path, f"cannot be created in the target: {exc.strerror}")
            return False
        if isinstance(exc, OverflowError):
            self._add_damaged(path, f"cannot be created in the target: {exc}")
            return False
        raise exc

    def _disk_full(self) -> DiskFull:
        return DiskFull(
            f"the disk of {self.target} is full after restoring {self.result.files} "
            f"files; free some space and run the restore again with --overwrite"
        )

    def _restore_leaf(self, node: Node, folder: _FolderJob, path: str) -> bool:
        name = node.name
        try:
            if not folder.made:
                # Known early in a folder this restore did not make: no data is read for
                # an entry that cannot take its name.
                with self._target_folders.folder(folder.ref) as fd:
                    existing = _lstat(name, fd)
                if existing is not None:
                    self._check_in_the_way(existing)
            if node.type == "file":
                return self._start_file(node, folder, path)
            if node.type in ("dev", "chardev"):
                if not self.is_root:
                    self._add_warning(path, "device nodes need root; skipped")
                    return False
                if not self.special_files:
                    self._add_warning(
                        path, "device node not restored (pass --special-files to restore them)"
                    )
                    return False
            elif node.type not in ("symlink", "fifo"):
                self._add_warning(path, f"{node.type} entries are not restored")
                return False
            staging = self._staging_for(folder)
            tmp = secrets.token_hex(8)
            if node.type == "symlink":
                # Where it points is data (it may well point outside the target); nothing
                # is ever written through it.
                kind = stat_module.S_IFLNK
                os.symlink(node.linktarget, tmp, dir_fd=staging.fd)
            elif node.type == "fifo":
                kind = stat_module.S_IFIFO
                os.mkfifo(tmp, 0o600, dir_fd=staging.fd)
            else:
                kind = stat_module.S_IFCHR if node.type == "chardev" else stat_module.S_IFBLK
                os.mknod(tmp, kind | 0o600, node.device, dir_fd=staging.fd)
            try:
                created = self._check_created(staging.fd, tmp, kind, node)
                self._set_staged_metadata(staging.fd, tmp, node, path, created)
                self._place(staging, tmp, folder, name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=staging.fd)
                raise
        except (UnsafeTarget, EntryRefused, OSError, OverflowError) as exc:
            return self._entry_failed(path, exc)
        if node.type == "symlink":
            with self._lock:
                self.result.symlinks += 1
        return True

    # --- files ---------------------------------------------------------------------------

    def _start_file(self, node: Node, folder: _FolderJob, path: str) -> bool:
        """Create the file's temporary copy in the staging folder (once: O_EXCL) and hand
        its runs to the workers."""
        link_key = (node.device_id, node.inode) if node.links > 1 and node.inode else None
        if link_key is not None and link_key in self._hardlinks:
            self._hold(folder)
            self._deferred_links.append((self._hardlinks[link_key], node, folder))
            return True
        try:
            runs = self._runs(node.content or [])
        except DamagedObject as exc:
            self._add_damaged(path, str(exc))
            return False
        # The index gives every blob's length: a file whose blobs do not add up to its
        # size is damaged (an index that lies about one would have the workers write past
        # the end of the file, at offsets up to 2^63).
        expected = sum(loc.blob.plaintext_length for run in runs for loc in run)
        if expected != node.size:
            self._add_damaged(
                path, f"its blobs hold {expected} bytes by the index, its entry says {node.size}"
            )
            return False
        staging = self._staging_for(folder)
        tmp = secrets.token_hex(8)
        fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=staging.fd)
        try:
            st = os.fstat(fd)
            staged = StagedFile(staging.shared, tmp, st.st_dev, st.st_ino)
            job = _FileJob(node, folder, staging, staged, len(runs), link_key is not None)
            self._hold(folder)
            if link_key is not None:
                self._hardlinks[link_key] = job
            if not runs:
                self._finish_file(job, fd)  # nothing to write: finished with this descriptor
                return True
        finally:
            os.close(fd)
        assert self._batcher is not None
        offset = 0
        for run in runs:
            stored = run[-1].blob.offset + run[-1].blob.length - run[0].blob.offset
            self._batcher.add((run, job.staged, offset), job, stored)
            offset += sum(loc.blob.plaintext_length for loc in run)
        return True

    def _batch_done(
        self,
        jobs: list[_FileJob],
        future: Future[list[int | RepositoryError]],
        release: Callable[[], None],
    ) -> None:
        """Runs were written (or failed): count them, and finish each file after its last."""
        try:
            if future.cancelled():
                return  # interrupted: the staging folders are removed with what is in them
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
            release()

    def _finish_file(self, job: _FileJob, fd: int | None = None) -> None:
        """Give the finished temporary copy its owner, mode and times (through a
        descriptor of the very inode this restore created) and put it in place; or
        remove it, if it is damaged."""
        if self._fatal is None and job.error is None and job.written != job.node.size:
            job.error = f"restored {job.written} bytes, expected {job.node.size}"
        staging = job.staging
        try:
            if job.error is not None or self._fatal is not None:
                # After a fatal error (a full disk) the restore stops: its unfinished
                # files are removed, not reported as damaged.
                with contextlib.suppress(OSError):
                    os.unlink(job.staged.name, dir_fd=staging.fd)
                if job.error is not None and self._fatal is None:
                    path = job.path
                    self._add_damaged(path, job.error)
                    self.progress.note(f"damaged: {_listed(path)}: {job.error}")
                return
            self._set_file_metadata(staging, job.staged, job.node, lambda: job.path, fd)
            placed = job.staged.name
            if job.anchor:
                placed = secrets.token_hex(8)
                os.link(job.staged.name, placed, src_dir_fd=staging.fd, dst_dir_fd=staging.fd)
            try:
                self._place(staging, placed, job.folder, job.node.name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(placed, dir_fd=staging.fd)
                raise
        except (UnsafeTarget, EntryRefused, OSError, OverflowError) as exc:
            self._entry_failed(lambda: job.path, exc)
            return
        finally:
            self._release(job.folder)
        with self._lock:
            self.result.files += 1
            self.result.bytes += job.written
        job.succeeded = True

    def _set_file_metadata(
        self, staging: _Staging, staged: StagedFile, node: Node, path: Where, fd: int | None
    ) -> None:
        """Owner, mode and times of a staged file, through a descriptor of it, checked to
        be the inode this restore created (``fd``: one already open)."""
        own = fd is None
        if fd is None:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(staged.name, flags, dir_fd=staging.fd)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (staged.device, staged.inode):
                raise _copy_replaced()
            self._set_metadata(fd, node, path)
        finally:
            if own:
                os.close(fd)

    def _make_deferred_links(self) -> None:
        """Hard links to files restored earlier in this run: linked in the staging folder
        from the first file's own temporary copy (kept there for this), then renamed into
        place like any entry."""
        for first, node, folder in self._deferred_links:
            path = functools.partial(_entry_path, folder, node)
            try:
                if not first.succeeded:
                    self._add_damaged(
                        path, f"hard link to {_listed(first.path)}, which was not restored"
                    )
                    continue
                staging = first.staging
                tmp = secrets.token_hex(8)
                os.link(first.staged.name, tmp, src_dir_fd=staging.fd, dst_dir_fd=staging.fd)
                try:
                    # By name: the staging folder is private, and the inode may already
                    # have a mode this user cannot open it with.
                    identity = (first.staged.device, first.staged.inode)
                    self._set_staged_metadata(staging.fd, tmp, node, path, identity)
                    self._place(staging, tmp, folder, node.name)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=staging.fd)
                    raise
            except (UnsafeTarget, EntryRefused, OSError, OverflowError) as exc:
                self._entry_failed(path, exc)
                continue
            finally:
                self._release(folder)
            with self._lock:
                self.result.files += 1

    def _set_fatal(self, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
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

    def _add_damaged(self, path: Where, error: str) -> None:
        """List a damaged entry (the first MAX_LISTED; the rest are counted)."""
        if not self._list_capped(self.result.damaged, path, error):
            with self._lock:
                self.result.damaged_unlisted += 1

    def _add_warning(self, path: Where, warning: str) -> None:
        """List a warning (the first MAX_LISTED; the rest are counted)."""
        if not self._list_capped(self.result.warnings, path, warning):
            with self._lock:
                self.result.warnings_unlisted += 1

    def _list_capped(self, listing: list[tuple[str, str]], path: Where, text: str) -> bool:
        """Append ``(path, text)`` to ``listing`` unless it holds MAX_LISTED entries
        already (then False). The path is built outside the lock, and only if listed."""
        with self._lock:
            if len(listing) >= MAX_LISTED:
                return False
        listed = _listed(path)
        with self._lock:
            if len(listing) >= MAX_LISTED:
                return False
            listing.append((listed, text))
            return True

    def _runs(self, content: list[bytes]) -> list[list[BlobLocation]]:
        """Group a file's blobs into runs that lie close together in one pack, so each run
        is one read (skipping what lies between): small SQLite chunks would otherwise cost
        a request each, and after an incremental backup a database's chunks sit in the
        older packs with gaps where the changed ones were."""
        runs: list[list[BlobLocation]] = []
        for blob_id in content:
            location = self.repo.locate(blob_id, fmt.BlobType.DATA)
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

    # --- metadata ------------------------------------------------------------------------

    def _mode(self, node: Node, path: Where, is_folder: bool) -> int:
        mode = fmt.unix_permissions_from_go(node.mode)
        # A folder's setgid bit only passes its group on (and setuid means nothing there).
        if not is_folder and mode & _SETID_BITS and not self.keep_setuid:
            mode &= ~_SETID_BITS
            self._add_warning(
                path, "setuid/setgid bits not restored (pass --keep-setuid to restore them)"
            )
        return mode

    def _set_metadata(self, fd: int, node: Node, path: Where, is_folder: bool = False) -> None:
        """Owner, mode and times of the file or folder open as ``fd`` (owner first:
        chown clears setuid bits). What fails is a warning."""
        problems: list[str] = []
        if self.is_root:
            _attempt(problems, os.chown, fd, node.uid, node.gid)
        _attempt(problems, os.chmod, fd, self._mode(node, path, is_folder))
        times = _times(node, problems)
        if times is not None:
            _attempt(problems, os.utime, fd, ns=times)
        if problems:
            self._add_warning(path, f"metadata not restored: {'; '.join(problems)}")

    def _check_created(self, staging_fd: int, name: str, kind: int, node: Node) -> tuple[int, int]:
        """The identity of the symlink, fifo or device node just made as ``name``, checked
        to be a new one of this restore: of its type (and device number), this user's,
        with no other link. Something else in its place (however it got into the private
        folder) is refused and never given the snapshot's owner and mode."""
        st = os.stat(name, dir_fd=staging_fd, follow_symlinks=False)
        if (
            stat_module.S_IFMT(st.st_mode) != kind
            or st.st_nlink != 1
            or st.st_uid != self.euid
            or (kind in (stat_module.S_IFCHR, stat_module.S_IFBLK) and st.st_rdev != node.device)
        ):
            raise _copy_replaced()
        return st.st_dev, st.st_ino

    def _set_staged_metadata(
        self, staging_fd: int, name: str, node: Node, path: Where, identity: tuple[int, int]
    ) -> None:
        """Owner, mode and times of a symlink, fifo, device node or hard link in the
        staging folder, through an ``O_PATH`` descriptor checked to be the inode
        ``identity`` (``/proc/self/fd``: a fifo or device node is never opened, which
        could block or act on a device). A symlink has no mode on Linux; its owner and
        times are set by name, without following it, once its descriptor passed the
        check (no one else can reach the private folder)."""
        if _O_PATH is None:  # not Linux: checked, then by name in the private folder
            self._set_staged_metadata_by_name(staging_fd, name, node, path, identity)
            return
        fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging_fd)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != identity:
                raise _copy_replaced()
            symlink = stat_module.S_ISLNK(st.st_mode)
            proc = f"/proc/self/fd/{fd}"
            problems: list[str] = []
            if self.is_root:
                if symlink:
                    _attempt(
                        problems, os.chown, name, node.uid, node.gid,
                        dir_fd=staging_fd, follow_symlinks=False,
                    )  # fmt: skip
                else:
                    _attempt(problems, os.chown, proc, node.uid, node.gid)
            if not symlink:
                _attempt(problems, os.chmod, proc, self._mode(node, path, False))
            times = _times(node, problems)
            if times is not None:
                if symlink:
                    _attempt(
                        problems, os.utime, name, ns=times, dir_fd=staging_fd,
                        follow_symlinks=False,
                    )  # fmt: skip
                else:
                    _attempt(problems, os.utime, proc, ns=times)
            if problems:
                self._add_warning(path, f"metadata not restored: {'; '.join(problems)}")
        finally:
            os.close(fd)

    def _set_staged_metadata_by_name(
        self, staging_fd: int, name: str, node: Node, path: Where, identity: tuple[int, int]
    ) -> None:
        """Where there is no ``O_PATH``: the entry is checked to be ``identity``, then its
        metadata is set by name, without following it (only this user can reach the
        private folder)."""
        st = os.stat(name, dir_fd=staging_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != identity:
            raise _copy_replaced()
        problems: list[str] = []
        if self.is_root:
            _attempt(
                problems, os.chown, name, node.uid, node.gid,
                dir_fd=staging_fd, follow_symlinks=False,
            )  # fmt: skip
        if not stat_module.S_ISLNK(st.st_mode):
            _attempt(problems, os.chmod, name, self._mode(node, path, False), dir_fd=staging_fd)
        times = _times(node, problems)
        if times is not None:
            _attempt(problems, os.utime, name, ns=times, dir_fd=staging_fd, follow_symlinks=False)
        if problems:
            self._add_warning(path, f"metadata not restored: {'; '.join(problems)}")


def _ignore(path: str, exc: DamagedObject) -> None:
    """A damaged tree, met while adding up sizes: the restore reports it when it gets there."""


def _entry_path(folder: _FolderJob, node: Node) -> str:
    return f"{folder.path}/{node.name}"


# Linux: a descriptor of an entry that opens nothing (a fifo, a device node, a symlink).
_O_PATH: int | None = getattr(os, "O_PATH", None)


def _attempt(problems: list[str], call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except (OSError, ValueError, OverflowError, NotImplementedError) as exc:
        problems.append(f"{call.__name__}: {exc}")


def _times(node: Node, problems: list[str]) -> tuple[int, int] | None:
    try:
        mtime = parse_ns(node.mtime) if node.mtime else None
        if mtime is None:
            return None
        return (parse_ns(node.atime) if node.atime else mtime), mtime
    except (ValueError, OverflowError) as exc:
        problems.append(f"times: {exc}")
        return None


def _name_taken() -> EntryRefused:
    return EntryRefused(
        "something already has this name in the target; pass --overwrite to replace it"
    )


def _copy_replaced() -> UnsafeTarget:
    return UnsafeTarget(
        "its temporary copy was replaced by something else during the restore; not restored"
    )


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# Created once, by the main thread: never opened if it exists, never through a symlink.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# A run of blobs to restore: where they are, the file, and the offset in it.
_RunPayload = tuple[list[BlobLocation], StagedFile, int]


class RunNotWritten(RepositoryError):
    pass


def restore_runs(
    reader: BlobReader, runs: list[tuple[list[BlobLocation], StagedFile, int]]
) -> list[int | RepositoryError]:
    """Runs in a worker: read, verify and write each run at its offset of its file (the
    temporary copy the main thread created, opened without creating or following anything
    and checked to be that inode). Gives each run's bytes written, or what stopped it; a
    full disk, or a staging folder that was moved or replaced, stops the whole batch."""
    outcomes: list[int | RepositoryError] = []
    files: dict[StagedFile, int] = {}  # a file's runs often come one after another: open it once
    try:
        for run, staged, offset in runs:
            try:
                fd = files.get(staged)
                if fd is None:
                    fd = files[staged] = open_staged(staged)
                outcomes.append(reader.write_run(run, fd, offset))
            except (UnsafeTarget, DamagedObject) as exc:
                outcomes.append(exc)
            except OverflowError as exc:
                outcomes.append(RunNotWritten(f"cannot be written: {exc}"))
            except OSError as exc:
                if exc.errno in _FULL_ERRNOS:
                    raise
                outcomes.append(RunNotWritten(f"cannot be written: {exc.strerror or exc}"))
    finally:
        for fd in files.values():
            os.close(fd)
    return outcomes
