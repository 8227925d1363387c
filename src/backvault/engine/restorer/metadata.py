"""Owner, mode and times of what a restore makes: through a descriptor of the very inode
it made (or an ``O_PATH`` one, for what must not be opened), never by a path someone else
could swap. What fails is a warning; setuid/setgid bits only when asked for."""

from __future__ import annotations

import os
import stat as stat_module
from typing import Any

from backvault.engine.restorer.common import (
    RestoreBase,
    Where,
    _copy_replaced,
    _FolderJob,
    _Staging,
)
from backvault.engine.target_folders import StagedFile
from backvault.repo import format as fmt
from backvault.repo.format import Node
from backvault.repo.timefmt import parse_ns

_SETID_BITS = stat_module.S_ISUID | stat_module.S_ISGID

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


class MetadataMixin(RestoreBase):
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
