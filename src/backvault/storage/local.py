"""A repository in a local folder (or a mounted NAS), laid out exactly as restic does."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from backvault.storage.base import (
    DIRECT_FILE_IO,
    Backend,
    BackendSpec,
    Capabilities,
    FileType,
    ObjectNotFound,
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
            if exc.errno == errno.ENOSPC:
                raise StorageError(f"the repository's disk is full ({self.root})") from exc
            raise StorageError(f"cannot write {target}: {exc.strerror}") from exc

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
        path = self._path(kind, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{kind.value}/{name} is missing from the repository") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            return read_into(fd, into, offset)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def stat(self, kind: FileType, name: str) -> int:
        try:
            return self._path(kind, name).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{kind.value}/{name} is missing from the repository") from exc

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
