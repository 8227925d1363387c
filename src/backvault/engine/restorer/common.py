"""What every part of a restore shares: its result and errors, the jobs (folders,
staging folders, files) it tracks, and ``RestoreBase``, the state and the reporting the
parts of ``Restorer`` (in this package's modules) work on."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backvault.engine.errors import DiskFull
from backvault.engine.progress import Progress
from backvault.engine.target_folders import (
    FolderRef,
    StagedFile,
    StagingRef,
    TargetFolders,
    UnsafeTarget,
)
from backvault.repo.errors import RepositoryError
from backvault.repo.format import Node
from backvault.repo.repository import Repository

# The damaged entries and warnings a result lists (the rest are counted), and the longest
# path it lists whole: a hostile snapshot nests folders 16,000 deep with 255-character
# names (4 MB paths), and gives every entry a warning.
MAX_LISTED = 1000
MAX_LISTED_PATH = 4096

# Where an entry is, for messages: its path, or how to build it (built only if a message
# needs it: a folder keeps no path of its own, see ``_FolderJob.path``).
Where = str | Callable[[], str]


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
    folder, and what it still waits for (``remaining``: its runs sent and not yet written,
    and the sender's own hold until all are sent)."""

    def __init__(
        self,
        node: Node,
        folder: _FolderJob,
        staging: _Staging,
        staged: StagedFile,
        remaining: int,
        anchor: bool,
    ) -> None:
        self.node = node
        self.folder = folder
        self.staging = staging
        self.staged = staged
        self.remaining = remaining
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


def _entry_path(folder: _FolderJob, node: Node) -> str:
    return f"{folder.path}/{node.name}"


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


class RestoreBase:
    """The state of a restore and its reporting; what one part uses of another is
    declared here and made in that part."""

    repo: Repository
    target: Path
    overwrite: bool
    progress: Progress
    keep_setuid: bool
    result: RestoreResult
    euid: int
    is_root: bool
    _folders: TargetFolders | None
    _root: _FolderJob | None
    _resolved: str
    _stagings: dict[int, _Staging]
    _device_tops: dict[int, _FolderJob]
    _lock: threading.Lock
    _fatal: BaseException | None
    _own_folders: set[tuple[int, int]]
    _replacing: list[_FolderJob]

    @property
    def _target_folders(self) -> TargetFolders:
        assert self._folders is not None
        return self._folders

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

    # Made in other parts (staging, metadata, the walk):

    def _staging_for(self, folder: _FolderJob) -> _Staging:
        raise NotImplementedError

    def _place(self, staging: _Staging, tmp: str, folder: _FolderJob, name: str) -> None:
        raise NotImplementedError

    def _hold(self, folder: _FolderJob) -> None:
        raise NotImplementedError

    def _release(self, folder: _FolderJob | None) -> None:
        raise NotImplementedError

    def _set_staged_metadata(
        self, staging_fd: int, name: str, node: Node, path: Where, identity: tuple[int, int]
    ) -> None:
        raise NotImplementedError

    def _set_file_metadata(
        self,
        staging: _Staging,
        staged: StagedFile,
        node: Node,
        path: Where,
        fd: int | None,
    ) -> None:
        raise NotImplementedError

    def _restore_times(self, folder: _FolderJob, fd: int) -> None:
        raise NotImplementedError
