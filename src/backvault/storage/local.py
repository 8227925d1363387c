"""A repository in a local folder (or a mounted NAS), laid out exactly as restic does."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from backvault.storage.base import (
    DIRECT_FILE_IO,
    Backend,
    BackendSpec,
    Capabilities,
    FileType,
    ObjectNotFound,
    RangeReader,
    Spool,
    StorageError,
)

_DIR_MODE = 0o700
_FILE_MODE = 0o400  # objects are immutable, as restic writes them


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of ``fd``, up to the end of the file; how many bytes
    were read. One call may return fewer bytes than asked before the end (FUSE file
    systems with direct I/O, network file systems): only a read of none is the end."""
    got = 0
    while got < len(view):
        read = os.preadv(fd, [view[got:]], offset + got)
        if read == 0:
            break
        got += read
    return got


class LocalBackend(Backend):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root: Path = Path(path).expanduser().absolute()
        self.location = str(self.root)
        self._swept_spools = False

    @property
    def capabilities(self) -> Capabilities:
        return DIRECT_FILE_IO

    def spec(self) -> BackendSpec:
        return BackendSpec(LocalBackend, (("path", str(self.root)),))

    def _path(self, kind: FileType, name: str) -> Path:
        if kind is FileType.CONFIG:
            return self.root / "config"
        if not name or "/" in name or name.startswith("."):
            raise StorageError(f"invalid object name {name!r}")
        if kind is FileType.DATA:
            return self.root / "data" / name[:2] / name
        return self.root / str(kind.value) / name

    def create(self) -> None:
        if (self.root / "config").exists():
            raise StorageError(f"a repository already exists at {self.root}")
        try:
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            for kind in FileType:
                if kind is not FileType.CONFIG:
                    (self.root / kind.value).mkdir(mode=_DIR_MODE, exist_ok=True)
            for i in range(256):
                (self.root / "data" / f"{i:02x}").mkdir(mode=_DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create a repository at {self.root}: {exc.strerror}"
            ) from exc

    def exists(self) -> bool:
        return (self.root / "config").is_file()

    def save(self, kind: FileType, name: str, data: bytes | bytearray) -> None:
        target = self._path(kind, name)
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
        try:
            target.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _write_error(exc, self.root, target) from exc

    def spool(self, kind: FileType) -> Spool | None:
        """A hidden file in the folder of ``kind`` (``.spool-…``, which restic and this
        backend's listing skip), renamed to its name when saved. One that a killed
        process left behind is removed here once it is a day old (a spool being filled
        is written every few milliseconds)."""
        folder = self.root / kind.value
        if not self._swept_spools:
            self._swept_spools = True
            _remove_stale_spools(folder)
        path = folder / f"{_SPOOL_PREFIX}{secrets.token_hex(8)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        except FileNotFoundError:
            return None  # no such folder (yet): ``save`` makes it
        except OSError as exc:
            raise _write_error(exc, self.root, path) from exc
        return _LocalSpool(self, kind, fd, path)

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(kind, name)
        try:
            with open(path, "rb") as handle:
                if offset < 0:
                    handle.seek(offset, os.SEEK_END)
                else:
                    handle.seek(offset)
                return handle.read() if length is None else handle.read(length)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{kind.value}/{name} is missing from the repository") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc

    def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
        path, fd = self._open_for_reading(kind, name)
        try:
            return read_into(fd, into, offset)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _open_for_reading(self, kind: FileType, name: str) -> tuple[Path, int]:
        """The object's path and a descriptor reading it (ObjectNotFound, StorageError)."""
        path = self._path(kind, name)
        try:
            return path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{kind.value}/{name} is missing from the repository") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc

    def range_reader(self, kind: FileType) -> RangeReader:
        if type(self).load_into is not LocalBackend.load_into:
            # A subclass that reads otherwise (a test's failing disk): through its reads.
            return super().range_reader(kind)
        return _OpenFiles(self, kind)

    def stat(self, kind: FileType, name: str) -> int:
        path = self._path(kind, name)
        try:
            return path.stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{kind.value}/{name} is missing from the repository") from exc
        except OSError as exc:  # (not a folder on the way, a symlink loop, EIO, ESTALE)
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc

    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        if kind is FileType.CONFIG:
            if self.exists():
                yield "config", (self.root / "config").stat().st_size
            return
        base = self.root / kind.value
        dirs = sorted(p for p in base.iterdir() if p.is_dir()) if kind is FileType.DATA else [base]
        for directory in dirs:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    yield entry.name, entry.stat().st_size

    def remove(self, kind: FileType, name: str) -> None:
        path = self._path(kind, name)
        try:
            path.unlink()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{kind.value}/{name} is missing from the repository") from exc
        except OSError as exc:
            raise StorageError(f"cannot remove {path}: {exc.strerror}") from exc


_SPOOL_PREFIX = ".spool-"
_STALE_SPOOL_SECONDS = 24 * 3600


def _remove_stale_spools(folder: Path) -> None:
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_SPOOL_PREFIX):
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_SPOOL_SECONDS:
                os.unlink(entry.path)


class _LocalSpool(Spool):
    def __init__(self, backend: LocalBackend, kind: FileType, fd: int, path: Path) -> None:
        self._backend = backend
        self._kind = kind
        self._path = path
        # A file object closes the descriptor if the spool is dropped without a word.
        self._file: io.FileIO | None = io.FileIO(fd, "w", closefd=True)

    def _open_file(self) -> io.FileIO:
        if self._file is None:
            raise StorageError("this spool was already saved or discarded")
        return self._file

    def write(self, data: bytes | bytearray | memoryview) -> None:
        file = self._open_file()
        view = memoryview(data)
        try:
            while view:
                written = file.write(view)
                view = view[written or 0 :]
        except OSError as exc:
            self.discard()
            raise _write_error(exc, self._backend.root, self._path) from exc

    def save_as(self, name: str) -> None:
        file = self._open_file()
        target = self._backend._path(self._kind, name)
        try:
            target.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            os.fsync(file.fileno())
            os.replace(self._path, target)
            self._file = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _write_error(exc, self._backend.root, target) from exc
        finally:
            self.discard()
            with contextlib.suppress(OSError):
                file.close()

    def discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._path)


def _write_error(exc: OSError, root: Path, target: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"the repository's disk is full ({root})")
    return StorageError(f"cannot write {target}: {exc.strerror}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# A local RangeReader keeps up to this many files open (the least recently read closed
# first): a restore's runs alternate between the pack of the first backup and those of
# the days since, a few at a time.
_OPEN_FILES = 16


class _OpenFiles(RangeReader):
    """Reads ranges of local objects through descriptors it keeps open (see RangeReader)."""

    def __init__(self, backend: LocalBackend, kind: FileType) -> None:
        super().__init__(backend, kind)
        self._local = backend
        self._open: dict[str, int] = {}  # name -> descriptor, least recently read first

    def read_into(self, name: str, offset: int, into: memoryview) -> int:
        fd = self._open.pop(name, None)
        if fd is None:
            fd = self._local._open_for_reading(self._kind, name)[1]
            if len(self._open) >= _OPEN_FILES:
                os.close(self._open.pop(next(iter(self._open))))
        try:
            got = read_into(fd, into, offset)
        except BaseException as exc:
            os.close(fd)  # not kept: a later read opens the file again
            path = self._local._path(self._kind, name)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
            if isinstance(exc, OverflowError):  # an offset past what a file can hold
                raise StorageError(f"cannot read {path} at offset {offset}") from exc
            raise
        self._open[name] = fd
        return got

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])
