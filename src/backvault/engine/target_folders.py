"""Folders of a restore target, reached without following a symlink and checked to be
the very folders the restore made or found there.

A snapshot is data from whoever holds the master key, a target restored with
``--overwrite`` holds whatever was there before, and another local user may be able to
write into the target (her home, restored by root) and race the restore. So nothing is
written by path, and nothing by a name that someone else could have replaced:

- Every folder is opened from its parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``,
  and its device and inode must be those recorded when the restore made it or first
  found it; a folder that was moved, or replaced by a symlink or another folder, stops
  with :class:`UnsafeTarget` and nothing is written there.
- Every entry other than a folder is made in a *staging folder*: a folder of the restore's
  own in the target (mode 0700, a random name, checked to be the one it made), where no
  one else can reach it. Its owner, mode and times are set there, a file's through a
  descriptor of the inode the restore created, and only then is it renamed into place.
  In a folder others can write, the final rename is the only thing done by name.

Worker processes cannot share the parent's descriptors: they get a :class:`StagedFile`
(the staging folder's path and identity, the file's name and identity), open both by
path, and refuse either if it is not the one the parent made (a path that now leads
elsewhere is harmless if the identity check follows it).

Over 500 lines on purpose: every way the restore reaches the target's folders is here, in
one place to audit (opening, checking, staging, emptying), and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from backvault.repo.errors import RepositoryError

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What opening a component yields when it is not a real folder (any more).
_NOT_A_FOLDER = (errno.ELOOP, errno.ENOTDIR, errno.ENOENT)
KEEP_OPEN = 64


class UnsafeTarget(RepositoryError):
    """A folder of the target, or a file the restore made, is not the one it made or
    found (moved, or replaced by a symlink, a file or another folder): nothing is
    written there."""


@dataclass(eq=False)
class FolderRef:
    """A folder of the target: where it is (its parent and name; the target itself has no
    parent) and what it is (device and inode, recorded when the restore made or found it).
    Compared by identity: a key for the descriptors kept open."""

    parent: FolderRef | None
    name: str
    device: int
    inode: int

    def names(self) -> list[str]:
        """The components from the target to this folder."""
        names: list[str] = []
        ref: FolderRef | None = self
        while ref is not None and ref.parent is not None:
            names.append(ref.name)
            ref = ref.parent
        return names[::-1]


@dataclass
class _OpenFolder:
    fd: int
    users: int = 0  # an fd in use is never closed under its user


class TargetFolders:
    """Descriptors of the folders of one target, each opened from its parent and checked
    against its recorded identity; the most recently used are kept open. Safe to share
    between threads."""

    def __init__(self, root: FolderRef, root_fd: int, keep_open: int = KEEP_OPEN) -> None:
        self.root = root
        self._root_fd = root_fd
        self._keep_open = keep_open
        # Least recently used first. Not a cachetools cache: an entry in use is never
        # evicted (its descriptor is being used) and eviction closes a descriptor, while
        # a cachetools LRUCache evicts whatever is oldest as soon as it is full.
        self._open: OrderedDict[FolderRef, _OpenFolder] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def folder(self, ref: FolderRef) -> Iterator[int]:
        """A descriptor of ``ref``, valid inside the ``with`` block. Raises
        :class:`UnsafeTarget` if the folder (or one on the way to it) was moved or
        replaced."""
        if ref is self.root:
            yield self._root_fd
            return
        with self._lock:
            entry = self._open.get(ref)
            if entry is None:
                entry = self._reach(ref)
            else:
                self._open.move_to_end(ref)
            entry.users += 1
        try:
            yield entry.fd
        finally:
            with self._lock:
                entry.users -= 1

    @property
    def root_fd(self) -> int:
        """The target's own descriptor (valid until :meth:`close`)."""
        return self._root_fd

    def add(self, ref: FolderRef, fd: int) -> None:
        """Keep ``fd``, just opened and checked by the caller, as ``ref``'s descriptor."""
        with self._lock:
            old = self._open.pop(ref, None)
            if old is not None:  # pragma: no cover - a folder is made once
                os.close(old.fd)
            entry = self._open[ref] = _OpenFolder(fd)
            self._close_unused(keep=entry)

    def _reach(self, ref: FolderRef) -> _OpenFolder:
        """Open ``ref`` (holding the lock): through ``..`` of an open folder inside it
        (the way back up a walk: one step however deep), else down from its nearest open
        ancestor, one checked component at a time."""
        inside = next((entry for child, entry in self._open.items() if child.parent is ref), None)
        if inside is not None:
            with contextlib.suppress(OSError):  # no search permission (mode 0): go down
                fd = os.open("..", FOLDER_FLAGS, dir_fd=inside.fd)
                if _identity(fd) == (ref.device, ref.inode):
                    return self._keep(ref, fd)
                os.close(fd)  # that folder was moved elsewhere: go down
        path: list[FolderRef] = []
        step: FolderRef | None = ref
        while step is not None and step is not self.root and step not in self._open:
            path.append(step)
            step = step.parent
        if step is None:  # pragma: no cover - every folder is below the target
            raise moved()
        parent = self._root_fd if step is self.root else self._open[step].fd
        for folder in reversed(path):
            try:
                fd = os.open(folder.name, FOLDER_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in _NOT_A_FOLDER:
                    raise moved() from exc
                raise
            if _identity(fd) != (folder.device, folder.inode):
                os.close(fd)
                raise moved()
            entry = self._keep(folder, fd)
            parent = fd
        return entry

    def _keep(self, ref: FolderRef, fd: int) -> _OpenFolder:
        entry = self._open[ref] = _OpenFolder(fd)
        # Close the least recently used as we go: a walk thousands of levels deep must not
        # hold thousands of descriptors.
        self._close_unused(keep=entry)
        return entry

    def _close_unused(self, keep: _OpenFolder) -> None:
        excess = len(self._open) - self._keep_open
        if excess <= 0:
            return
        for key, entry in list(self._open.items()):
            if entry.users == 0 and entry is not keep:
                os.close(entry.fd)
                del self._open[key]
                excess -= 1
                if not excess:
                    return

    def forget(self, ref: FolderRef) -> None:
        """``ref`` was removed: close its descriptor."""
        with self._lock:
            entry = self._open.get(ref)
            if entry is not None and entry.users == 0:
                os.close(entry.fd)
                del self._open[ref]

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                os.close(entry.fd)
            self._open.clear()
            os.close(self._root_fd)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def moved() -> UnsafeTarget:
    return UnsafeTarget(
        "a folder on its way is no longer the one this restore made or found there (it was "
        "moved, or replaced by a symlink or another folder); nothing was written there"
    )


# Symlinks followed while the target's path is resolved (Linux's own limit).
_MAX_SYMLINKS = 40


def resolve_target(path: str, euid: int) -> str:
    """The target's path, absolute and with no symlink or ``..`` in it, resolved once.
    A symlink on the way is followed only if it belongs to root or to ``euid``, as the
    kernel's ``fs.protected_symlinks`` does in sticky folders: another user's symlink
    (``/home/alice/restored`` -> ``/etc``, made by alice) could be pointed anywhere, so
    the restore stops, naming it. Nor is one followed in a folder another user can change:
    she could have moved a symlink of root's there (one a root restore put in her home). What does not exist yet is kept as given (it is made
    later, one component at a time)."""
    todo = [part for part in path.split("/") if part][::-1]  # a stack: next part last
    resolved: list[str] = []
    followed = 0
    missing = False
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            missing = False  # what follows may exist again: look
            continue
        where = "/" + "/".join([*resolved, part])
        st = None
        if not missing:
            try:
                st = os.lstat(where)
            except FileNotFoundError:
                missing = True
            except NotADirectoryError as exc:
                raise RepositoryError(
                    f"the target {path} cannot be made: {os.path.dirname(where)} is not a folder"
                ) from exc
        if st is not None and stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, euid):
                raise RepositoryError(
                    f"the target's path goes through {where}, a symlink that belongs to uid "
                    f"{st.st_uid}, who could point it anywhere; give the target's path "
                    "without it"
                )
            # Root's own symlink, but in a folder another user can change: she may have
            # moved it there (one a root restore gave back to root in her home).
            folder = "/" + "/".join(resolved)
            why = others_can_change(os.lstat(folder), euid)
            if why is not None:
                raise RepositoryError(
                    f"the target's path goes through {where}, a symlink in {folder}, where "
                    f"other users can put a symlink of their choice ({why}); give the "
                    "target's path without it"
                )
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise RepositoryError(f"the target {path} has too many levels of symlinks")
            link = os.readlink(where)
            if link.startswith("/"):
                resolved = []
            todo.extend(part for part in reversed(link.split("/")) if part)
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def open_target(path: str) -> tuple[int, list[tuple[str, os.stat_result]]]:
    """Open the folder at ``path`` (absolute, with no symlink in it: see
    :func:`resolve_target`) one component at a time from ``/`` without following a
    symlink, making the folders that do not exist: a symlink met now was put there since
    the path was resolved. Gives the descriptor and the status of each folder on the
    way, the target last."""
    parts = [part for part in path.split("/") if part]
    fd = os.open("/", FOLDER_FLAGS)
    on_the_way = [("/", os.fstat(fd))]
    where = ""
    try:
        for part in parts:
            where = f"{where}/{part}"
            try:
                inner = _open_or_make(part, fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    st = _lstat_or_none(part, fd)
                    if (
                        st is not None
                        and not stat.S_ISDIR(st.st_mode)
                        and not stat.S_ISLNK(st.st_mode)
                    ):
                        raise RepositoryError(
                            f"the target {path} cannot be used: {where} exists and is not a folder"
                        ) from exc
                    raise RepositoryError(
                        f"the target {path} changed while it was opened ({where} was moved "
                        "or replaced); run the restore again"
                    ) from exc
                raise
            os.close(fd)
            fd = inner
            on_the_way.append((where, os.fstat(fd)))
    except BaseException:
        os.close(fd)
        raise
    return fd, on_the_way


def _open_or_make(name: str, parent: int) -> int:
    try:
        return os.open(name, FOLDER_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=parent)  # as makedirs: the umask applies
        return os.open(name, FOLDER_FLAGS, dir_fd=parent)


def _lstat_or_none(name: str, parent: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return None


def others_can_change(st: os.stat_result, euid: int) -> str | None:
    """Why users other than ``euid`` (and root) can rename or replace entries of the
    folder ``st``, or None."""
    if st.st_uid not in (0, euid):
        return f"it belongs to uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"its mode is {stat.S_IMODE(st.st_mode):o}"
    return None


# POSIX ACLs a folder may carry: an access ACL can grant other users what the mode
# denies (on file systems whose inheritance ignores the create mode: ZFS with
# aclinherit=passthrough, some network and FUSE file systems), a default ACL is passed on
# to everything made inside.
_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_NO_ACL_ERRNOS = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


class NotPrivate(RepositoryError):
    """A folder the restore made for itself is reachable by other users."""


def make_private(fd: int, euid: int, where: str) -> None:
    """Make the folder the restore just made and opened as ``fd`` its own: mode 0700 and
    no ACL (neither one granting access nor one passed on to what is made inside), then
    check that it is: it belongs to ``euid`` and no one else has any permission bit.
    Raises :class:`NotPrivate` naming ``where`` otherwise (a file system that does not
    keep owners or modes: vfat, some network file systems)."""
    with contextlib.suppress(PermissionError):  # vfat: the check below says what it keeps
        os.fchmod(fd, 0o700)
    for name in _ACL_XATTRS if hasattr(os, "removexattr") else ():  # Linux
        try:
            os.removexattr(fd, name)
        except OSError as exc:
            if exc.errno not in _NO_ACL_ERRNOS:
                raise
    st = os.fstat(fd)
    if st.st_uid != euid:
        raise NotPrivate(
            f"the restore's private folder {where} belongs to uid {st.st_uid}, not to this "
            "user: another user replaced it, or the file system does not keep owners "
            "(then restore as the user that owns the target)"
        )
    if st.st_mode & 0o077:
        raise NotPrivate(
            f"the restore's private folder {where} keeps mode {stat.S_IMODE(st.st_mode):o} "
            "(other users could reach what is restored before it is in place): the file "
            "system does not keep modes; restore into another file system"
        )


@dataclass(frozen=True)
class StagingRef:
    """How a worker process finds a staging folder: its path, and its device and inode
    to check it found the same folder."""

    path: str
    device: int
    inode: int


@dataclass(frozen=True)
class StagedFile:
    """A file the restore created (once, with ``O_EXCL``) in a staging folder: the worker
    writing it checks it opened that very inode."""

    staging: StagingRef
    name: str
    device: int
    inode: int


# Staging folders by identity: in the parent, the descriptors its worker threads share;
# in a worker process, the ones it opened (and checked).
_stagings: dict[tuple[int, int], int] = {}
_stagings_lock = threading.Lock()


def share_staging(ref: StagingRef, fd: int) -> None:
    with _stagings_lock:
        _stagings[(ref.device, ref.inode)] = fd


def unshare_staging(ref: StagingRef) -> None:
    with _stagings_lock:
        _stagings.pop((ref.device, ref.inode), None)


def staging_fd(ref: StagingRef) -> int:
    """This process's descriptor of the staging folder ``ref``: in a worker process,
    opened on first use and checked to be the parent's."""
    key = (ref.device, ref.inode)
    with _stagings_lock:
        fd = _stagings.get(key)
        if fd is not None:
            return fd
        try:
            fd = os.open(ref.path, FOLDER_FLAGS)
        except OSError as exc:
            raise _staging_moved(ref) from exc
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key:
            os.close(fd)
            raise _staging_moved(ref)
        _stagings[key] = fd
        return fd


def _staging_moved(ref: StagingRef) -> RepositoryError:
    return RepositoryError(
        f"the restore's private folder {ref.path} was moved or replaced during the "
        "restore; run the restore again"
    )


def open_staged(staged: StagedFile) -> int:
    """Open a staged file for writing: without creating it, without following a symlink,
    and only if it is the inode the restore created (a hard link planted under its name,
    or renamed over it, is refused)."""
    folder = staging_fd(staged.staging)
    try:
        # O_NONBLOCK: a fifo put in its place must not hang the worker (it is refused).
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(staged.name, flags, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT, errno.EISDIR, errno.ENXIO):
            raise _replaced() from exc
        raise
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (staged.device, staged.inode) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _replaced()
    return fd


def _replaced() -> UnsafeTarget:
    return UnsafeTarget(
        "its temporary copy was replaced by something else during the restore; nothing was "
        "written into it"
    )


_LISTINGS = 4


def empty_folder(fd: int) -> None:
    """Remove everything in the folder ``fd`` (as ``remove_tree`` removes a folder's
    content)."""
    for name in _clear_folder(fd):
        remove_tree(name, fd)


def remove_tree(name: str, parent: int) -> None:
    """Remove the entry ``name`` of folder ``parent`` with everything below it: what
    ``--overwrite`` moved aside into the private folder, which may belong to another user
    who can still change it through a descriptor she kept. Nothing is followed and nothing
    but a folder is opened (``O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK``: a symlink to a
    device, or a fifo, swapped in for a folder is unlinked, never opened); each folder is
    listed again when emptied (a few times at most); one descriptor is open at a time (the way up is ``..``, checked by device
    and inode), so nesting thousands deep costs no recursion and no descriptors."""
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent)
        return
    fd = _open_to_remove(name, parent)
    if fd is None:
        return
    # Each folder: its name, identity, folders still to empty, and listings left (what
    # appeared since it was listed is found by listing it again, a few times at most).
    frames = [(name, _identity(fd), _clear_folder(fd), [_LISTINGS])]
    try:
        while True:
            todo, listings = frames[-1][2], frames[-1][3]
            if not todo and listings[0] > 1:
                listings[0] -= 1
                todo.extend(_clear_folder(fd))
            if todo:
                sub = todo.pop()
                inner = _open_to_remove(sub, fd)
                if inner is not None:
                    os.close(fd)
                    fd = inner
                    frames.append((sub, _identity(fd), _clear_folder(fd), [_LISTINGS]))
                continue
            done = frames.pop()[0]
            if not frames:
                os.close(fd)
                fd = -1
                os.rmdir(done, dir_fd=parent)
                return
            up = os.open("..", FOLDER_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _identity(fd) != frames[-1][1]:
                raise moved()
            os.rmdir(done, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _open_to_remove(name: str, parent: int) -> int | None:
    """Folder ``name`` of ``parent``, opened to be emptied; None if it is gone, or is no
    folder any more (then it is unlinked as it is)."""
    try:
        return os.open(name, FOLDER_FLAGS | os.O_NONBLOCK, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            os.unlink(name, dir_fd=parent)
            return None
        if exc.errno == errno.ENOENT:
            return None
        raise


def _clear_folder(fd: int) -> list[str]:
    """Unlink what is not a folder in the folder ``fd`` (as listed now); gives the names
    of its folders."""
    folders: list[str] = []
    with os.scandir(fd) as entries:
        listed = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_folder in listed:
        if is_folder:
            folders.append(name)
            continue
        try:
            os.unlink(name, dir_fd=fd)
        except IsADirectoryError:  # a folder now: emptied as one
            folders.append(name)
        except FileNotFoundError:
            pass
    return folders
