"""Folders below a restore target, reached without following a symlink.

A snapshot is data from whoever holds the master key, and a target restored with
``--overwrite`` holds whatever was there before: either may put a symlink where the
restore expects a folder. So nothing is written by path. Each folder is opened from its
parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``, one name at a time from the
target's own descriptor, and everything in it is created, renamed, changed or removed
relative to that descriptor (``dir_fd=``). A component that is a symlink, a file or gone
stops the walk with :class:`UnsafeTarget`: the entry is reported, nothing is written.

Worker processes cannot share the parent's descriptors, so they get a
:class:`RestoreTarget` (the target's path and identity) and open the same folders the
same way; a worker whose target is not the parent's (same device and inode) stops.
Each process keeps a bounded number of folders open (the most recently used), so a
folder is opened about once per process, not once per file.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..repo.errors import RepositoryError

# A folder below the target, as the names of its components (the target itself is ()).
Folder = tuple[str, ...]

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What opening a component yields when it is not a real folder (any more).
_NOT_A_FOLDER = (errno.ELOOP, errno.ENOTDIR, errno.ENOENT)
KEEP_OPEN = 64


class UnsafeTarget(RepositoryError):
    """A folder of the target is not a real folder below it (a symlink or a file took its
    place): nothing is written there."""


@dataclass(frozen=True)
class RestoreTarget:
    """How a worker process finds a restore's target: its path, and its device and inode
    to check it found the same folder."""

    path: str
    device: int
    inode: int
    restore_id: str


@dataclass
class _OpenFolder:
    fd: int
    users: int = 0  # an fd in use is never closed under its user


class TargetFolders:
    """Descriptors of folders below one target; safe to share between threads."""

    def __init__(self, root_fd: int, keep_open: int = KEEP_OPEN) -> None:
        self._root = root_fd
        self._keep_open = keep_open
        self._open: OrderedDict[Folder, _OpenFolder] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def folder(self, folder: Folder) -> Iterator[int]:
        """A descriptor of ``folder``, valid inside the ``with`` block. Raises
        :class:`UnsafeTarget` if a component is not a real folder."""
        if not folder:
            yield self._root
            return
        with self._lock:
            entry = self._open.get(folder)
            if entry is None:
                entry = self._walk(folder)
            else:
                self._open.move_to_end(folder)
            entry.users += 1
        try:
            yield entry.fd
        finally:
            with self._lock:
                entry.users -= 1

    def _walk(self, folder: Folder) -> _OpenFolder:
        """Open ``folder`` from its nearest open ancestor, one component at a time
        (holding the lock)."""
        known = len(folder) - 1
        while known and folder[:known] not in self._open:
            known -= 1
        parent = self._open[folder[:known]].fd if known else self._root
        entry = None
        for depth in range(known, len(folder)):
            name = folder[depth]
            where = "/".join(folder[: depth + 1])
            if not name or name in (".", "..") or "/" in name or "\x00" in name:
                raise UnsafeTarget(f"{where!r} is not a name inside the target")
            try:
                fd = os.open(name, _FOLDER_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in _NOT_A_FOLDER:
                    raise UnsafeTarget(
                        f"{where} is no longer a folder of this restore (a symlink or a file "
                        "took its place); nothing was written through it"
                    ) from exc
                raise
            entry = _OpenFolder(fd)
            self._open[folder[: depth + 1]] = entry
            # Close the least recently used as we go: a walk hundreds of levels deep
            # must not hold hundreds of descriptors.
            self._close_unused(keep=entry)
            parent = fd
        assert entry is not None
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

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                os.close(entry.fd)
            self._open.clear()
            os.close(self._root)


# The targets this process restores into, by restore: in the parent, the one its main
# thread and its worker threads share; in a worker process, the one it opened.
_targets: dict[str, TargetFolders] = {}
_targets_lock = threading.Lock()


def open_target(path: Path) -> tuple[RestoreTarget, TargetFolders]:
    """Open a restore's target folder (following a symlink the user gave as the target
    is the user's choice) and register it for this process's worker threads."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    st = os.fstat(fd)
    target = RestoreTarget(str(path), st.st_dev, st.st_ino, secrets.token_hex(16))
    folders = TargetFolders(fd)
    with _targets_lock:
        _targets[target.restore_id] = folders
    return target, folders


def close_target(target: RestoreTarget) -> None:
    with _targets_lock:
        folders = _targets.pop(target.restore_id, None)
    if folders is not None:
        folders.close()


def folders_of(target: RestoreTarget) -> TargetFolders:
    """This process's folders of ``target``: in a worker process, opened on first use
    and checked to be the parent's target folder."""
    with _targets_lock:
        folders = _targets.get(target.restore_id)
        if folders is None:
            fd = os.open(target.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (target.device, target.inode):
                os.close(fd)
                raise RepositoryError(
                    f"the restore target {target.path} was replaced by another folder during "
                    "the restore; run the restore again"
                )
            folders = _targets[target.restore_id] = TargetFolders(fd)
    return folders
