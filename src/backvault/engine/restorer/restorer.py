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
stored back to back in one pack); workers (processes for a backend with direct file I/O,
threads otherwise: see ``engine.parallel``) read, decrypt and verify a run and write it at its
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
import os
import secrets
import stat as stat_module
import threading
from pathlib import Path

from backvault.engine.errors import NotEnoughSpace, TargetNotEmpty
from backvault.engine.parallel import Batcher, WorkerPool, reader_pool
from backvault.engine.progress import NoProgress, Progress, human_bytes
from backvault.engine.restorer.common import (
    EntryRefused,
    RestoreResult,
    _FileJob,
    _FolderJob,
    _lstat,
    _Staging,
    _Walk,
)
from backvault.engine.restorer.files import (
    _BATCH_BYTES,
    _BATCH_RUNS,
    _IN_FLIGHT_BYTES,
    _MIN_BATCH_CHARGE,
    FilesMixin,
    _RunPayload,
    restore_runs,
)
from backvault.engine.restorer.metadata import MetadataMixin
from backvault.engine.restorer.selection import could_contain_match, matches
from backvault.engine.restorer.staging import _LEFTOVER, StagingMixin
from backvault.engine.target_folders import (
    FOLDER_FLAGS,
    FolderRef,
    TargetFolders,
    UnsafeTarget,
    make_private,
    open_target,
    others_can_change,
    resolve_target,
)
from backvault.engine.walk import TooManyEntries, walk
from backvault.repo import format as fmt
from backvault.repo.errors import DamagedObject, RepositoryError
from backvault.repo.format import Node, Snapshot
from backvault.repo.repository import Repository


class Restorer(FilesMixin, StagingMixin, MetadataMixin):
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
                    min_charge=_MIN_BATCH_CHARGE,
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


def _ignore(path: str, exc: DamagedObject) -> None:
    """A damaged tree, met while adding up sizes: the restore reports it when it gets there."""
