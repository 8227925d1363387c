"""The storage interface: save, load (with offset and length), list, remove and stat of
named objects, laid out as restic lays out a repository.

A backend also says what it can do beyond that (``capabilities``, as restic's
``Connections()`` and ``HasAtomicReplace()`` do), so generic code asks instead of testing
for a class, and how to open the same backend stack again in a worker process (``spec``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any


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


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the interface.

    ``direct_file_io``: objects are files on this machine. ``load_into`` reads straight
    into a caller's buffer, ``save`` takes a ``bytearray`` as it is (no copy), and worker
    processes that reopen the backend from its ``spec`` pay off: the CPU, not the network,
    is the limit.
    """

    direct_file_io: bool = False


NO_CAPABILITIES = Capabilities()
DIRECT_FILE_IO = Capabilities(direct_file_io=True)


@dataclass(frozen=True)
class BackendSpec:
    """How to open a backend stack again, in another process: the factory (a class or a
    module-level function, pickled by name), its keyword options, and the spec of the
    backend it wraps (``None`` for the innermost one). Picklable; holds no connection.

    Its repr names only the factories: options may hold a URL with a password.
    """

    factory: Callable[..., Backend]
    options: tuple[tuple[str, Any], ...] = ()
    inner: BackendSpec | None = None

    def open(self) -> Backend:
        options = dict(self.options)
        if self.inner is None:
            return self.factory(**options)
        return self.factory(self.inner.open(), **options)

    def __repr__(self) -> str:
        name = getattr(self.factory, "__qualname__", "backend")
        return f"BackendSpec({name}{f' over {self.inner!r}' if self.inner else ''})"


class Spool(ABC):
    """An object written a part at a time, before its name is known (a pack is named by
    the hash of its content): ``write`` the parts, then ``save_as`` its name, atomic and
    durable as ``Backend.save``, or ``discard`` it. Nothing of it is visible, nor left
    behind, before ``save_as``."""

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def save_as(self, name: str) -> None:
        """Store what was written under ``name``; the spool is finished either way."""

    @abstractmethod
    def discard(self) -> None:
        """Forget what was written (nothing was stored); safe to call more than once."""


class RangeReader:
    """Reads ranges of many objects of one kind, for a caller that reads a few objects
    again and again (a restore's runs, which alternate between the packs of the days a
    database changed on). A backend may keep objects it read open until ``close`` (a
    local one keeps a few files open: opening a pack by its path cost more than reading
    a run of it); this default reads each range with ``load_into``, and so goes through
    every wrapper of the backend as any read does. Objects are never modified, so a kept
    one reads as the object does."""

    def __init__(self, backend: Backend, kind: FileType) -> None:
        self._backend = backend
        self._kind = kind

    def read_into(self, name: str, offset: int, into: memoryview) -> int:
        """``Backend.load_into`` of the object ``name``."""
        return self._backend.load_into(self._kind, name, offset, into)

    def close(self) -> None:
        """Close what is kept open; safe to call more than once."""

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """Objects are written once and never modified: ``save`` must be atomic (a reader sees
    the whole object or nothing) and durable when it returns."""

    location: str

    @property
    def capabilities(self) -> Capabilities:
        """What this backend can do beyond the interface (nothing, unless it says so)."""
        return NO_CAPABILITIES

    @abstractmethod
    def spec(self) -> BackendSpec:
        """How to open this same backend (and every wrapper around it) in another process."""

    @abstractmethod
    def create(self) -> None:
        """Prepare an empty repository layout; fails if a repository is already there."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether a repository (its config) is at this location."""

    @abstractmethod
    def save(self, kind: FileType, name: str, data: bytes) -> None: ...

    def spool(self, kind: FileType) -> Spool | None:
        """A ``Spool`` for an object of ``kind``, where this backend can write one a part
        at a time without holding it in memory; None where objects are saved whole only
        (the default), or the file system cannot."""
        return None

    @abstractmethod
    def load(
        self, kind: FileType, name: str, offset: int = 0, length: int | None = None
    ) -> bytes: ...

    def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
        """Read ``len(into)`` bytes from ``offset`` into a caller's buffer; how many there
        were. Backends with ``direct_file_io`` do it without an intermediate object."""
        data = self.load(kind, name, offset, len(into))
        into[: len(data)] = data
        return len(data)

    def range_reader(self, kind: FileType) -> RangeReader:
        """A ``RangeReader`` of objects of ``kind``: ``close`` it when done."""
        return RangeReader(self, kind)

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


class BackendWrapper(Backend):
    """A backend that adds behaviour around another one (retries, fault injection): every
    call goes to ``inner`` unless a subclass changes it, capabilities included. Its spec
    is its class with ``wrapper_options()`` over the inner backend's spec."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def wrapper_options(self) -> dict[str, Any]:
        """The keyword options that make this wrapper again (besides the inner backend)."""
        return {}

    def spec(self) -> BackendSpec:
        return BackendSpec(type(self), tuple(self.wrapper_options().items()), self.inner.spec())

    def create(self) -> None:
        self.inner.create()

    def exists(self) -> bool:
        return self.inner.exists()

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        self.inner.save(kind, name, data)

    def spool(self, kind: FileType) -> Spool | None:
        return self.inner.spool(kind)

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.load(kind, name, offset, length)

    def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
        return self.inner.load_into(kind, name, offset, into)

    def stat(self, kind: FileType, name: str) -> int:
        return self.inner.stat(kind, name)

    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        return self.inner.list(kind)

    def remove(self, kind: FileType, name: str) -> None:
        self.inner.remove(kind, name)

    def close(self) -> None:
        self.inner.close()


# A URL's password (user:secret@), hidden wherever a location is shown.
_USERINFO = re.compile(r"(//[^/@\s:]*):[^/]*@")


def without_password(text: str) -> str:
    """``rest:https://user:secret@host/`` → ``rest:https://user:***@host/``."""
    return _USERINFO.sub(r"\1:***@", text)
