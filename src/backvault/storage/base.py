"""The storage interface: save, load (with offset and length), list, remove and stat of
named objects, laid out as restic lays out a repository."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from enum import Enum


class StorageError(Exception):
    """The storage failed or refused: the message says what and where."""


class ObjectNotFound(StorageError):
    """The named object does not exist."""


class TransientStorageError(StorageError):
    """A failure worth retrying: a 5xx answer, a timeout, a reset or refused connection."""


class StorageAccessDenied(StorageError):
    """Credentials missing or refused (never retried: retrying cannot fix it)."""


class StorageRefused(StorageError):
    """The storage refuses this operation by policy (e.g. deleting on append-only storage)."""


# restic's object type names in URLs (REST protocol) and key prefixes (S3).
def object_path(kind: FileType, name: str) -> str:
    if kind is FileType.CONFIG:
        return "config"
    if kind is FileType.DATA:
        return f"data/{name[:2]}/{name}"
    return f"{kind.value}/{name}"


class FileType(Enum):
    CONFIG = "config"
    KEY = "keys"
    DATA = "data"
    INDEX = "index"
    SNAPSHOT = "snapshots"
    LOCK = "locks"


class Backend(ABC):
    """Objects are written once and never modified: ``save`` must be atomic (a reader sees
    the whole object or nothing) and durable when it returns."""

    location: str

    @abstractmethod
    def create(self) -> None:
        """Prepare an empty repository layout; fails if a repository is already there."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether a repository (its config) is at this location."""

    @abstractmethod
    def save(self, kind: FileType, name: str, data: bytes) -> None: ...

    @abstractmethod
    def load(
        self, kind: FileType, name: str, offset: int = 0, length: int | None = None
    ) -> bytes: ...

    @abstractmethod
    def stat(self, kind: FileType, name: str) -> int:
        """Size in bytes."""

    @abstractmethod
    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        """(name, size) of every object of a kind."""

    @abstractmethod
    def remove(self, kind: FileType, name: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; a no-op for backends that hold none."""
