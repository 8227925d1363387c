"""Consistent copies of live SQLite databases through SQLite's online backup API.

A chat app keeps writing its message database while we back it up; copying the file (and
its -wal) byte by byte can give a torn, unopenable copy. The backup API copies pages
inside a read transaction instead, so the copy is a consistent database as of one moment.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

SQLITE_MAGIC = b"SQLite format 3\x00"
_STEP_PAGES = 4096
_BUSY_TIMEOUT_MS = 30_000


class SQLiteCopyError(Exception):
    pass


def is_sqlite_database(path: str | os.PathLike[str]) -> bool:
    """Recognise a database by its 16-byte header, not its name."""
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def page_size_of(path: str | os.PathLike[str]) -> int:
    """The page size from the header (bytes 16-17, big-endian; 1 means 65536)."""
    with open(path, "rb") as handle:
        header = handle.read(100)
    value = int.from_bytes(header[16:18], "big")
    return 65536 if value == 1 else value


@contextlib.contextmanager
def consistent_copy(path: str | os.PathLike[str], temp_dir: str | None = None) -> Iterator[Path]:
    """Yield the path of a consistent copy of the database; the copy is deleted after."""
    fd, name = tempfile.mkstemp(prefix=".backvault-sqlite-", suffix=".db", dir=temp_dir)
    os.close(fd)
    copy = Path(name)
    try:
        _backup(Path(path), copy)
        yield copy
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{copy}{suffix}")


def _backup(source: Path, destination: Path) -> None:
    uri = f"file:{quote(str(source.absolute()))}?mode=ro"
    try:
        src = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise SQLiteCopyError(f"cannot open the database {source}: {exc}") from exc
    dst = sqlite3.connect(destination)
    try:
        src.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        wal = src.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        # In WAL mode readers never block the app, so copy in one read transaction. In
        # rollback mode, copy in steps so the app can write in between; the backup
        # restarts by itself if the source changes under it.
        deadline = time.monotonic() + 600
        while True:
            try:
                src.backup(dst, pages=-1 if wal else _STEP_PAGES, sleep=0.005)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        dst.commit()
    except sqlite3.Error as exc:
        raise SQLiteCopyError(f"cannot copy the database {source}: {exc}") from exc
    finally:
        dst.close()
        src.close()
