"""The restore's staging folders and how an entry is put in place.

Every entry but a folder is made in a staging folder of the restore's own (mode 0700, a
random name, one per file system within the target), given its metadata there, and only
then renamed into place; ``--overwrite`` moves what is in the way into the staging folder
first (removed with it), never what this restore made itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shlex
import stat as stat_module

from backvault.engine.restorer.common import (
    EntryRefused,
    RestoreBase,
    _FolderJob,
    _lstat,
    _name_taken,
    _Staging,
)
from backvault.engine.target_folders import (
    FOLDER_FLAGS,
    FolderRef,
    NotPrivate,
    StagingRef,
    UnsafeTarget,
    empty_folder,
    make_private,
    share_staging,
    unshare_staging,
)
from backvault.repo.errors import RepositoryError

STAGING_PREFIX = ".backvault-restore-"
_LEFTOVER = re.compile(re.escape(STAGING_PREFIX) + "[0-9a-f]{16}")


class StagingMixin(RestoreBase):
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
