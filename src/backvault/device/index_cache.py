"""Where this device keeps a repository's local index cache (``repo.index_cache``): one
file in the user's cache folder, written whole and private like every other file there.
It is a cache: missing, unreadable or not opening, it is rebuilt from the repository."""

from __future__ import annotations

from pathlib import Path

from backvault.device.paths import cache_dir
from backvault.hardening.private_files import write_private_file


class IndexCacheFile:
    """``IndexCacheStore`` in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of_repository(cls, repository_id: str) -> IndexCacheFile:
        return cls(cache_dir() / repository_id / "index")

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def save(self, sealed: list[bytes]) -> None:
        # Not flushed to disk: a crash may lose it (or leave the old one), never tear it.
        write_private_file(self.path, sealed, durable=False)
