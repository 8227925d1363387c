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
- WAL mode with nothing in the WAL (a database no app has open, or checkpointed and
  truncated): our read transaction then reads the database file alone, and while we hold
  it no checkpoint writes to that file. When the caller allows it (``consistent_image``
  with ``in_place``: its readers are other processes), the file is read where it is,
  under the read transaction, held until the caller is done: no copy at all (copying a
  1.5 GB database took seconds on the critical path of every backup of it).
- Rollback-journal mode: the backup API copies pages in steps, so the app can write in
  between; it restarts by itself if the database changes under it.

One rule makes the read transaction hold: closing *any* descriptor of a file drops every
POSIX lock the process holds on it, SQLite's included (SQLite guards only its own
descriptors). So while this process holds a read transaction on a database, nothing in
it may open and close that file: the header readers here answer from what was read
before the transaction began (``_held``), and a copy reads through a descriptor opened
before SQLite's and closed after it.

A database is found by a cheap guess first (its name, or a -wal or -journal beside it),
then by its 16-byte header.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

SQLITE_MAGIC = b"SQLite format 3\x00"
_STEP_PAGES = 4096
_BUSY_TIMEOUT_MS = 30_000


class SQLiteCopyError(Exception):
    pass


class CopyCancelled(SQLiteCopyError):
    """The copy was given up (the backup is being interrupted)."""


_HEADER_SIZE = 100
# The headers of the databases this process holds a read transaction on, by (device,
# inode): their files must not be opened (see the module's docstring). ``_held_lock`` is
# held from a header reader's check to its close, and from a transaction's start to its
# entry here, so that no reader opens a file between the two.
_held: dict[tuple[int, int], bytes] = {}
# How many read transactions hold each (two backups in one process may hold the same
# database): its header stays in ``_held`` until the last ends.
_hold_counts: dict[tuple[int, int], int] = {}
# Descriptors of held files this process is done with, closed when the last hold ends.
_deferred_closes: dict[tuple[int, int], list[int]] = {}
_held_lock = threading.Lock()


def _begin_held(identity: tuple[int, int], header: bytes) -> None:
    """Record a read transaction begun on a file (holding ``_held_lock``)."""
    _held.setdefault(identity, header)
    _hold_counts[identity] = _hold_counts.get(identity, 0) + 1


def _end_held(identity: tuple[int, int]) -> None:
    """Forget a read transaction on a file once it is the last (holding ``_held_lock``)."""
    remaining = _hold_counts.pop(identity, 1) - 1
    if remaining > 0:
        _hold_counts[identity] = remaining
    else:
        _held.pop(identity, None)
        for fd in _deferred_closes.pop(identity, []):
            os.close(fd)


def _close_database_fd(fd: int) -> None:
    """Close a descriptor of a database file, or, while a read transaction of this
    process still holds that file (another backup's), keep it open until that ends:
    closing it would drop the transaction's locks (see the module's docstring)."""
    with _held_lock:
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return
        identity = (st.st_dev, st.st_ino)
        if identity in _hold_counts:
            _deferred_closes.setdefault(identity, []).append(fd)
        else:
            os.close(fd)


def _header(path: str | os.PathLike[str]) -> bytes:
    """The first 100 bytes of a regular file (fewer if it is shorter; none if it cannot
    be read, or is not a regular file: a FIFO named like a database would block the open,
    and the backup with it, until something wrote to it)."""
    with _held_lock:
        try:
            st = os.stat(path)
            held = _held.get((st.st_dev, st.st_ino))
            if held is not None:
                return held
            if not stat.S_ISREG(st.st_mode):
                return b""
            # Non-blocking: a FIFO put in its place since the stat is not waited on.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return b""
                return os.pread(fd, _HEADER_SIZE, 0)
            finally:
                os.close(fd)
        except OSError:
            return b""


def is_sqlite_database(path: str | os.PathLike[str]) -> bool:
    """Recognise a database by its 16-byte header, not its name."""
    return _header(path)[:16] == SQLITE_MAGIC


SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
_DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")


def looks_like_database(name: str, has_sibling: Callable[[str], bool]) -> bool:
    """A cheap guess, before reading the header: a name like a database's, or a WAL or
    rollback journal next to it."""
    # Asked of every file of every backup: spelt out, not a generator over the suffixes.
    wal, shm, journal = SIDECAR_SUFFIXES
    return (
        name.endswith(_DATABASE_SUFFIXES)
        or has_sibling(name + wal)
        or has_sibling(name + shm)
        or has_sibling(name + journal)
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


def walk_files(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``(folder, names of what in it is not a folder, names of its symlinks to folders)``
    for ``top`` and every folder below it, as ``os.walk(top)`` gives them (top down,
    symlinks to folders not entered, folders that cannot be listed skipped), names and
    folders in name order, but with a stack of its own: Python 3.11's ``os.walk``
    recurses, and a folder tree may nest deeper than the recursion limit."""
    todo = [top]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        files: list[str] = []
        links: list[str] = []
        below: list[str] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(entry.name)
                continue
            try:
                if entry.is_symlink():
                    links.append(entry.name)
                else:
                    below.append(entry.path)
            except OSError:
                continue
        yield folder, files, links
        todo.extend(reversed(below))  # the first folder by name is walked first


def databases_under(targets: list[str]) -> list[str]:
    """SQLite databases under the targets, found by name first (a cheap walk, no stat
    of every file), then by their header."""
    found: list[str] = []
    for target in targets:
        if os.path.isfile(target) and not os.path.islink(target):
            candidates = [target]
        else:
            candidates = []
            for directory, files, _links in walk_files(target):
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
    header = _header(path)
    if len(header) < _HEADER_SIZE:
        raise OSError(f"{path} is not a whole SQLite database (its header is cut short)")
    value = int.from_bytes(header[16:18], "big")
    return 65536 if value == 1 else value


class DatabaseImage(NamedTuple):
    """A consistent image of a database: the file to read, and how much of it."""

    path: Path  # the database itself (read in place) or a copy of it
    size: int
    page_size: int
    in_place: bool
    # In place: the (device, inode) of the file held. Its readers open the path, which
    # the app may have renamed another file onto meanwhile: they must check it is this.
    identity: tuple[int, int] | None = None


@contextlib.contextmanager
def consistent_image(
    path: str | os.PathLike[str],
    temp_dir: str | os.PathLike[str],
    cancel: threading.Event | None = None,
    in_place: bool = False,
) -> Iterator[DatabaseImage]:
    """A consistent image of the database while the context lasts. With ``in_place``
    (allowed only to a caller whose readers of the file are other processes), a database
    in WAL mode with nothing in its WAL is the database file itself, under a read
    transaction held until the context ends; any other is a copy (``consistent_copy``)."""
    if in_place:
        with contextlib.ExitStack() as stack:
            image = _hold_in_place(Path(path), stack)
            if image is not None:
                yield image
                return
    with consistent_copy(path, temp_dir, cancel) as copy:
        yield DatabaseImage(copy, copy.stat().st_size, page_size_of(copy), False)


def _hold_in_place(source: Path, stack: contextlib.ExitStack[bool | None]) -> DatabaseImage | None:
    """Begin a read transaction on the database and keep it (``stack`` ends it), if that
    makes the file itself a consistent image: WAL mode, with nothing in the WAL."""
    header = _header(source)  # read before the transaction: closing this drops no lock
    if len(header) < _HEADER_SIZE or header[:16] != SQLITE_MAGIC:
        return None
    try:
        before = os.stat(source)
    except OSError:
        return None
    uri = f"file:{quote(str(source.absolute()))}?mode=ro"
    try:
        # Ended by whichever thread is done with the image (the one that stored it, or
        # the one cleaning up after an error); never used by two threads at once.
        db = sqlite3.connect(
            uri, uri=True, timeout=_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
    except sqlite3.Error:
        return None
    stack.callback(db.close)
    try:
        db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            return None
        with _held_lock:
            db.execute("BEGIN")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # takes the read lock
            st = os.stat(source)
            identity = (st.st_dev, st.st_ino)
            if identity != (before.st_dev, before.st_ino):
                # Replaced by a rename while we opened it: the file our connection holds
                # may not be the one at the path.
                db.rollback()
                return None
            _begin_held(identity, header)
        stack.callback(_end_hold, db, identity)
        # Frames in the WAL once we hold the read lock: either our snapshot needs them, or
        # a writer added them after it began; either way the file alone is not it. (The
        # WAL cannot be emptied while a snapshot that needs it is held.)
        try:
            wal_size = os.stat(f"{source}-wal").st_size
        except FileNotFoundError:
            wal_size = 0
        if wal_size:
            return None
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    except sqlite3.Error:
        return None
    return DatabaseImage(source, pages * page_size, page_size, True, identity)


def _end_hold(db: sqlite3.Connection, identity: tuple[int, int]) -> None:
    with _held_lock:
        _end_held(identity)
        with contextlib.suppress(sqlite3.Error):
            db.rollback()


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
        # Opened before SQLite's connection and closed after it (see the module's docstring).
        source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SQLiteCopyError(f"cannot open the database {source}: {exc.strerror}") from exc
    try:
        src = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        _close_database_fd(source_fd)
        raise SQLiteCopyError(f"cannot open the database {source}: {exc}") from exc
    dst = sqlite3.connect(destination)
    try:
        src.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        wal = src.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        if wal:
            dst.close()
            _copy_in_read_transaction(src, source_fd, source, destination)
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
        _close_database_fd(source_fd)


def _copy_in_read_transaction(
    src: sqlite3.Connection, source_fd: int, source: Path, destination: Path
) -> None:
    """Copy the database file (through ``source_fd``, opened before SQLite's connection:
    see the module's docstring), then its WAL, inside a read transaction."""
    with _held_lock:
        st = os.fstat(source_fd)
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # takes the read lock
        identity = (st.st_dev, st.st_ino)
        _begin_held(identity, os.pread(source_fd, _HEADER_SIZE, 0))
    try:
        with open(destination, "wb") as out:  # the file first, then the WAL (see above)
            _copy_descriptor(source_fd, out.fileno())
        with contextlib.suppress(FileNotFoundError):  # no WAL: the file is the snapshot
            shutil.copyfile(f"{source}-wal", f"{destination}-wal")
    finally:
        with _held_lock:
            _end_held(identity)
            src.rollback()


def _copy_descriptor(source_fd: int, out_fd: int) -> None:
    """Copy a whole file by the kernel, from offset 0, leaving the source's offset alone."""
    offset = 0
    while True:
        sent = os.sendfile(out_fd, source_fd, offset, 64 * 1024 * 1024)
        if sent == 0:
            return
        offset += sent


def _recover(copy: Path) -> None:
    """Let SQLite apply the copied WAL, then fold it into the copied file."""
    db = sqlite3.connect(copy)
    try:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError("the copy's checkpoint did not finish")
    finally:
        db.close()
