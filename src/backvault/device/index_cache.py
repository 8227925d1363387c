"""Where this device keeps a repository's local index cache (``repo.index_cache``): one
file in the user's cache folder, written whole and private like every other file there.
It is a cache: missing, unreadable or not opening, it is rebuilt from the repository."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from backvault.device.paths import repository_cache_dir
from backvault.hardening.private_files import write_private_file


class IndexCacheFile:
    """``IndexCacheStore`` in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of_repository(cls, repository_id: str) -> IndexCacheFile | None:
        """The repository's cache file; None for a repository id that names no folder of
        the cache (see ``paths.repository_cache_dir``)."""
        folder = repository_cache_dir(repository_id)
        return None if folder is None else cls(folder / "index")

    def load(self) -> bytes | None:
        """The file's bytes, if it is a regular file of this user: not through a symlink,
        and never a FIFO or a device (a FIFO planted there would stop a scheduled backup
        for ever, /dev/zero fill its memory)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                return None
            with contextlib.suppress(OSError):
                return handle.read()
        return None

    def save(self, sealed: Iterable[bytes]) -> None:
        # Not flushed to disk: a crash may lose it (or leave the old one), never tear it.
        write_private_file(self.path, sealed, durable=False)
