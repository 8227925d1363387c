"""Finding SQLite databases, and consistent copies of live ones.

A chat app keeps writing its message database while we back it up; copying the file (and
its -wal) byte by byte at an arbitrary moment can give a torn, unopenable copy.

- WAL mode (what chat apps use): while we hold a read transaction, SQLite guarantees that
  the database file changes only by checkpoints of WAL frames that our snapshot already
  includes, and that those frames stay in the WAL (a WAL restart waits for readers like
  us, and with a reader on the file alone no checkpoint runs at all). So we copy the
  database file, then the WAL, with the kernel (fast), end the read transaction, and let
  SQLite recover the copy: it applies every complete transaction in the copied WAL, drops
  any torn frame written after our snapshot, exactly as after a crash, and checkpoints
  it into the copied file. The copy is a consistent database as of our snapshot or a
  later commit. This is several times faster than the backup API, which copies page by
  page through SQLite's cache.
- Rollback-journal mode: the backup API copies pages in steps, so the app can write in
  between; it restarts by itself if the database changes under it.

A database is found by a cheap guess first (its name, or a -wal or -journal beside it),
then by its 16-byte header.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

SQLITE_MAGIC = b"SQLite format 3\x00"
_STEP_PAGES = 4096
_BUSY_TIMEOUT_MS = 30_000


class SQLiteCopyError(Exception):
    pass


class CopyCancelled(SQLiteCopyError):
    """The copy was given up (the backup is being interrupted)."""


def is_sqlite_database(path: str | os.PathLike[str]) -> bool:
    """Recognise a database by its 16-byte header, not its name."""
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == SQLITE_MAGIC
    except OSError:
        return False


SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
_DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")


def looks_like_database(name: str, has_sibling: Callable[[str], bool]) -> bool:
    """A cheap guess, before reading the header: a name like a database's, or a WAL or
    rollback journal next to it."""
    return name.endswith(_DATABASE_SUFFIXES) or any(
        has_sibling(name + suffix) for suffix in SIDECAR_SUFFIXES
    )


def is_sidecar(directory: str, name: str, siblings: set[str]) -> bool:
    """A live database's -wal, -shm or -journal file: never back it up on its own.
    Restored next to the consistent copy, a stale WAL could be replayed onto it."""
    for suffix in SIDECAR_SUFFIXES:
        if name.endswith(suffix):
            database = name[: -len(suffix)]
            if database in siblings and is_sqlite_database(os.path.join(directory, database)):
                return True
    return False


def databases_under(targets: list[str]) -> list[str]:
    """SQLite databases under the targets, found by name first (a cheap walk, no stat
    of every file), then by their header."""
    found: list[str] = []
    for target in targets:
        if os.path.isfile(target) and not os.path.islink(target):
            candidates = [target]
        else:
            candidates = []
            for directory, _dirs, files in os.walk(target):
                names = set(files)
                candidates.extend(
                    os.path.join(directory, name)
                    for name in files
                    if looks_like_database(name, names.__contains__)
                )
        found.extend(
            path for path in candidates if not os.path.islink(path) and is_sqlite_database(path)
        )
    return found


def page_size_of(path: str | os.PathLike[str]) -> int:
    """The page size from the header (bytes 16-17, big-endian; 1 means 65536)."""
    with open(path, "rb") as handle:
        header = handle.read(100)
    value = int.from_bytes(header[16:18], "big")
    return 65536 if value == 1 else value


@contextlib.contextmanager
def consistent_copy(
    path: str | os.PathLike[str],
    temp_dir: str | os.PathLike[str],
    cancel: threading.Event | None = None,
) -> Iterator[Path]:
    """Yield the path of a consistent copy of the database, made in ``temp_dir`` (a
    private folder: the copy is the whole chat history in clear); the copy is deleted
    after. Setting ``cancel`` stops a copy under way (CopyCancelled)."""
    fd, name = tempfile.mkstemp(prefix=".backvault-sqlite-", suffix=".db", dir=temp_dir)
    os.close(fd)
    copy = Path(name)
    try:
        _backup(Path(path), copy, cancel or threading.Event())
        yield copy
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{copy}{suffix}")


def _backup(source: Path, destination: Path, cancel: threading.Event) -> None:
    uri = f"file:{quote(str(source.absolute()))}?mode=ro"
    try:
        src = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise SQLiteCopyError(f"cannot open the database {source}: {exc}") from exc
    dst = sqlite3.connect(destination)
    try:
        src.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        wal = src.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        if wal:
            dst.close()
            _copy_in_read_transaction(src, source, destination)
            _recover(destination)
            return

        def stop_if_cancelled(_status: int, _remaining: int, _total: int) -> None:
            if cancel.is_set():
                raise CopyCancelled(f"the copy of {source} was given up")

        deadline = time.monotonic() + 600
        while True:
            try:
                src.backup(
                    dst, pages=-1 if wal else _STEP_PAGES, progress=stop_if_cancelled, sleep=0.005
                )
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                if cancel.wait(0.05):
                    raise CopyCancelled(f"the copy of {source} was given up") from exc
        dst.commit()
    except sqlite3.Error as exc:
        raise SQLiteCopyError(f"cannot copy the database {source}: {exc}") from exc
    finally:
        dst.close()
        src.close()


def _copy_in_read_transaction(src: sqlite3.Connection, source: Path, destination: Path) -> None:
    src.execute("BEGIN")
    try:
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # takes the read lock
        shutil.copyfile(source, destination)  # the file first, then the WAL (see above)
        with contextlib.suppress(FileNotFoundError):  # no WAL: the file is the snapshot
            shutil.copyfile(f"{source}-wal", f"{destination}-wal")
    finally:
        src.rollback()


def _recover(copy: Path) -> None:
    """Let SQLite apply the copied WAL, then fold it into the copied file."""
    db = sqlite3.connect(copy)
    try:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError("the copy's checkpoint did not finish")
    finally:
        db.close()
