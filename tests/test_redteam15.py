"""Red-team tests for the performance round two changes (issue 15): databases read in
place, IVs drawn in batches, worker packs saved in the background, the long-content fast
path of encode_tree."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backvault.crypto.aead import Key
from backvault.engine import parallel
from backvault.engine import sealer as sealer_module
from backvault.engine.archiver import Backup, databases
from backvault.engine.restorer import Restorer
from backvault.engine.sealer import FILE, ChunkSealer, Piece
from backvault.repo.repository import Repository
from backvault.source.sqlite import consistent_image, is_sqlite_database, page_size_of
from backvault.storage import Backend, BackendWrapper, FileType, LocalBackend
from tests.conftest import tree_digest

# What a worker process does with an in-place image: open the path, read the image's
# size. (Run in another process: an open and close in this one would drop our locks.)
READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
data = os.pread(fd, int(sys.argv[2]), 0)
os.close(fd)
open(sys.argv[3], "wb").write(data)
"""


def _wal_database(path: Path, rows: int, body: str) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO m(body) VALUES (?)", [(body * 500,) for _ in range(rows)])
    db.commit()
    db.close()


def _read_as_worker(path: Path, size: int, out: Path) -> None:
    subprocess.run([sys.executable, "-c", READER, str(path), str(size), str(out)], check=True)


def _integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def test_a_database_replaced_by_rename_while_held_is_not_stored_in_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app replaces its database by a rename (VACUUM INTO then rename; a restore from
    its own backup) while we hold it in place: our read transaction holds the old file,
    but the workers open the path, now the new file, which nothing holds, and read the
    old file's size of it. The backup must store the held database, or report the file;
    it stored the new file cut short: a restored database that does not open."""
    source = tmp_path / "src"
    source.mkdir()
    path = source / "msgstore.db"
    _wal_database(path, 2000, "a")
    replacement = tmp_path / "replacement.db"
    _wal_database(replacement, 6000, "b")  # bigger: the workers read a prefix of it
    real_image = databases.consistent_image

    @contextlib.contextmanager
    def replaced_while_held(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with real_image(*args, **kwargs) as image:
            assert image.in_place
            os.rename(replacement, path)  # the app's replace, just after our hold began
            yield image

    monkeypatch.setattr(databases, "consistent_image", replaced_while_held)
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    parallel.configure(worker_processes=2)
    try:
        result = Backup(repo, temp_dir=tmp_path).run([str(source)])
    finally:
        parallel.configure(worker_processes=None)
    if any(str(path) in error_path for error_path, _ in result.errors):
        return  # reported: the next backup reads the new file
    restored = tmp_path / "out"
    Restorer(repo, restored).run(repo.find_snapshot(result.snapshot_id)[1])
    copy = restored / path.relative_to("/")
    assert _integrity(copy) == "ok"
    db = sqlite3.connect(copy)
    assert db.execute("SELECT count(*) FROM m").fetchone()[0] in (2000, 6000)
    db.close()


WRITER = """
import random, sqlite3, sys, time
end = time.time() + 600
modes = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"]
n = 0
while time.time() < end:
    db = sqlite3.connect(sys.argv[1], timeout=30)
    db.execute("PRAGMA wal_autocheckpoint=20")
    for _ in range(random.randrange(1, 60)):
        a, b = random.randrange(2000), random.randrange(2000)
        db.execute("UPDATE acct SET balance=balance-3, pad=? WHERE id=?", (random.randbytes(300).hex(), a))
        db.execute("UPDATE acct SET balance=balance+3 WHERE id=?", (b,))
        if n % 25 == 0:
            db.execute("INSERT INTO extra(blob) VALUES (?)", (random.randbytes(5000),))
        db.commit()
        n += 1
        if n % 7 == 0:
            try:
                db.execute(f"PRAGMA wal_checkpoint({modes[n % 4]})").fetchall()
            except sqlite3.OperationalError:
                pass
    db.close()  # the last connection: checkpoint, WAL removed (when it can)
    time.sleep(random.random() / 50)
"""


def test_in_place_images_of_a_busy_database_are_consistent(tmp_path: Path) -> None:
    """The in-place path only triggers while the WAL is empty: this writer checkpoints in
    every mode and closes its connection (WAL removed) again and again. Every in-place
    image, read by another process as the workers do, must be a whole database that
    balances."""
    path = tmp_path / "bank.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=wal")
    db.execute("CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INT, pad TEXT)")
    db.execute("CREATE TABLE extra(id INTEGER PRIMARY KEY, blob BLOB)")
    db.executemany("INSERT INTO acct VALUES (?, 100, ?)", [(i, "p" * 600) for i in range(2000)])
    db.commit()
    db.close()
    (tmp_path / "tmp").mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    in_place = images = 0
    try:
        deadline = time.monotonic() + 60
        while (in_place < 6 or images < 12) and time.monotonic() < deadline:
            with consistent_image(path, tmp_path / "tmp", in_place=True) as image:
                images += 1
                out = tmp_path / f"image{images}.db"
                if image.in_place:
                    in_place += 1
                    time.sleep(0.05)  # the writer goes on meanwhile
                    _read_as_worker(image.path, image.size, out)
                else:
                    out.write_bytes(image.path.read_bytes()[: image.size])
            assert _integrity(out) == "ok", (images, image.in_place)
            check = sqlite3.connect(out)
            assert check.execute("SELECT sum(balance) FROM acct").fetchone()[0] == 200_000
            check.close()
            out.unlink()
    finally:
        writer.kill()
        writer.wait()
    assert in_place >= 3, (in_place, images)


class FailingWorkerSaves(BackendWrapper):
    """In a worker process (not the parent), the second pack save fails, as a full disk
    or a lost connection fails it."""

    def __init__(self, inner: Backend, parent: int) -> None:
        super().__init__(inner)
        self.parent = parent
        self.saves = 0

    def wrapper_options(self) -> dict[str, Any]:
        return {"parent": self.parent}

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        if kind is FileType.DATA and os.getpid() != self.parent:
            self.saves += 1
            if self.saves == 2:
                raise OSError(errno.ENOSPC, "No space left on device (test)")
        super().save(kind, name, data)


def test_a_pack_save_failing_in_a_worker_leaves_no_snapshot_with_missing_blobs(
    tmp_path: Path,
) -> None:
    """A worker saves its packs in the background: a save that fails must not leave a
    snapshot whose blobs are in no pack, nor blame the files that happened to be sealed
    when the error surfaced."""
    source = tmp_path / "src"
    source.mkdir()
    for i in range(40):
        (source / f"photo{i}.jpg").write_bytes(os.urandom(1024 * 1024))
    backend = FailingWorkerSaves(LocalBackend(tmp_path / "repo"), os.getpid())
    repo = Repository.init(backend, b"k" * 32)
    parallel.configure(worker_processes=2)
    try:
        result = Backup(repo, temp_dir=tmp_path).run([str(source)])
    except Exception as exc:  # the backup failed: no snapshot, nothing to restore
        assert "No space left" in str(exc), repr(exc)  # the cause, not its consequence
        return
    finally:
        parallel.configure(worker_processes=None)
    assert not result.errors, result.errors  # the photos are readable: the disk is full
    restored = tmp_path / "out"
    Restorer(repo, restored).run(repo.find_snapshot(result.snapshot_id)[1])
    assert tree_digest(restored / source.relative_to("/")) == tree_digest(source)


CLOSING_APP = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=5)
db.executemany("INSERT INTO m(body) VALUES (?)", [("after",)] * 200)
db.commit()
db.close()  # the app's last connection: it checkpoints and removes the WAL if it can
"""


def test_two_holds_of_one_database_in_one_process_keep_it_until_both_end(
    tmp_path: Path,
) -> None:
    """Two backups in one process (an app backing up to two repositories at once) hold
    the same database in place. The first to finish must not make the header readers
    forget the other's hold: its walk then opens and closes the file, which drops this
    process's POSIX locks on it, and the app closing its connection checkpoints into the
    file the other backup's workers are reading."""
    path = tmp_path / "chat.db"
    _wal_database(path, 3000, "a")
    before = path.read_bytes()
    with consistent_image(path, tmp_path, in_place=True) as second:
        assert second.in_place
        with consistent_image(path, tmp_path, in_place=True) as first:
            assert first.in_place
        assert is_sqlite_database(path) and page_size_of(path) == 4096  # the second's walk
        subprocess.run([sys.executable, "-c", CLOSING_APP, str(path)], check=True, timeout=60)
        # The workers read it now: it must still be the snapshot.
        out = tmp_path / "read.db"
        _read_as_worker(path, second.size, out)
        assert out.read_bytes() == before[: second.size]


HANGS = """
import sys
from pathlib import Path
from backvault.engine.archiver import Backup
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
tmp = Path(sys.argv[1])
repo = Repository.init(LocalBackend(tmp / "repo"), b"k" * 32)
result = Backup(repo, temp_dir=tmp).run([str(tmp / "src")])
print(result.snapshot_id)
"""


def test_a_fifo_named_like_a_database_does_not_hang_the_backup(tmp_path: Path) -> None:
    """The header readers (is it a database? its page size?) opened any file named like
    a database with a blocking open: a FIFO named chat.db (another user's, in a shared
    folder; a leftover of an app) hung the backup before it began, holding the lock
    every database hold needs."""
    source = tmp_path / "src"
    source.mkdir()
    os.mkfifo(source / "chat.db")
    (source / "note.txt").write_text("hello")
    try:
        run = subprocess.run(
            [sys.executable, "-c", HANGS, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the backup hangs on a FIFO named like a database") from None
    assert run.returncode == 0, run.stderr


def test_a_small_file_read_in_short_reads_is_stored_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read may return fewer bytes than asked without being at the end (FUSE file
    systems with direct I/O, an MTP-mounted phone, network file systems on a signal).
    A whole small file was read with one call, and what it returned taken as the file:
    the backup stored it cut short, with no error."""
    data = os.urandom(3 * 1024 * 1024 + 77)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    real_preadv = os.preadv

    def short_preadv(fd: int, buffers: list[Any], offset: int) -> int:
        return real_preadv(fd, [memoryview(buffers[0])[: 128 * 1024]], offset)

    monkeypatch.setattr(sealer_module.os, "preadv", short_preadv)
    key = Key.generate()
    chunks = ChunkSealer(key, lambda _id: False).store(Piece(FILE, str(path)))
    assert sum(chunk.plain_length for chunk in chunks) == len(data)


def _report_dumpable(queue: Any) -> None:
    import ctypes

    queue.put(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE


def _worker_pid(context: str) -> int:
    return os.getpid()


def _no_context() -> str:
    return "nothing"


def _no_args() -> tuple[()]:
    return ()


def test_the_fork_server_workers_come_from_is_not_dumpable() -> None:
    """Workers are forks of the fork server and receive the master key (unpickled with
    their start-up arguments) before their own start-up code makes them not dumpable. The
    fork server lives as long as the process and stayed dumpable: another process of the
    user (ptrace_scope 0) could attach to it, and run code in every worker forked after,
    which the threat model's row on /proc and ptrace rules out."""
    import multiprocessing

    pool = parallel.WorkerPool(None, 1, _no_context, _no_args, threshold=0, processes=1)
    try:
        pool.submit(_worker_pid).result(timeout=60)  # the fork server runs
    finally:
        pool.shutdown()
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork server on this system")
    context = multiprocessing.get_context("forkserver")
    queue = context.Queue()
    child = context.Process(target=_report_dumpable, args=(queue,))  # a fork of it
    child.start()
    dumpable = queue.get(timeout=60)
    child.join(timeout=60)
    assert dumpable == 0


def test_a_forked_child_never_repeats_its_parents_ivs_even_under_its_pid() -> None:
    """IVs are handed out from a draw of 256; a forked child must draw its own. The draw
    was tied to the process by its pid, which the system reuses: a grandchild forked
    after the parent that drew is gone may get the parent's pid, and would hand out the
    IVs the parent handed out after the fork (AES-CTR keystream and Poly1305 key reused).
    (Here the child takes the parent's pid by a patch, as pid reuse would give it.)"""
    from backvault.crypto import aead

    key = Key.generate()
    key.seal(b"x")  # this thread's draw is made
    parent = os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            aead.os.getpid = lambda: parent  # type: ignore[attr-defined]
            os.write(write, key.seal(b"y")[:16])
        finally:
            os._exit(0)
    os.close(write)
    child_iv = os.read(read, 16)
    os.close(read)
    os.waitpid(child, 0)
    assert key.seal(b"z")[:16] != child_iv


def test_backups_of_a_busy_database_restore_whole_databases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end, on worker processes: backups of a database whose writer commits,
    checkpoints in every mode and closes (so that it is read in place at times) restore
    databases that pass integrity_check and balance."""
    source = tmp_path / "src"
    source.mkdir()
    path = source / "bank.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=wal")
    db.execute("CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INT, pad TEXT)")
    db.execute("CREATE TABLE extra(id INTEGER PRIMARY KEY, blob BLOB)")
    db.executemany("INSERT INTO acct VALUES (?, 100, ?)", [(i, "p" * 600) for i in range(2000)])
    db.commit()
    db.close()
    real_image = databases.consistent_image
    in_place: list[bool] = []

    @contextlib.contextmanager
    def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with real_image(*args, **kwargs) as image:
            in_place.append(image.in_place)
            yield image

    monkeypatch.setattr(databases, "consistent_image", counted)
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    snapshots = []
    parallel.configure(worker_processes=2)
    try:
        deadline = time.monotonic() + 90
        while (sum(in_place) < 3 or len(snapshots) < 5) and time.monotonic() < deadline:
            result = Backup(repo, temp_dir=tmp_path).run([str(source)])
            assert not result.errors, result.errors
            snapshots.append(result.snapshot_id)
    finally:
        parallel.configure(worker_processes=None)
        writer.kill()
        writer.wait()
    assert sum(in_place) >= 3, in_place
    for number, snapshot_id in enumerate(snapshots):
        restored = tmp_path / f"out{number}"
        Restorer(repo, restored).run(repo.find_snapshot(snapshot_id)[1])
        copy = restored / path.relative_to("/")
        assert _integrity(copy) == "ok", number
        check = sqlite3.connect(copy)
        assert check.execute("SELECT sum(balance) FROM acct").fetchone()[0] == 200_000
        check.close()


def test_a_small_file_that_grew_before_it_was_read_leaves_no_buffer_its_size(
    tmp_path: Path,
) -> None:
    """A file the walk saw small is read whole into the reading thread's buffer, which it
    keeps for the next pieces. A file that grew meanwhile (a video being downloaded into
    the chat's media folder) made that buffer its new size, kept by every worker that met
    one until the end of the backup: hundreds of MiB where the pieces need 4."""
    path = tmp_path / "video.mp4"
    path.write_bytes(os.urandom(40 * 1024 * 1024))  # seen at 1 MiB by the walk
    key = Key.generate()
    chunks = ChunkSealer(key, lambda _id: False).store(Piece(FILE, str(path)))
    assert sum(chunk.plain_length for chunk in chunks) == 40 * 1024 * 1024
    kept = getattr(sealer_module._reading, "buffer", b"")
    assert len(kept) <= 16 * 1024 * 1024, f"{len(kept) >> 20} MiB kept"


def test_a_copy_of_a_database_held_in_place_by_another_backup_keeps_the_hold(
    tmp_path: Path,
) -> None:
    """Two backups in one process, one reading a database in place (worker processes),
    the other copying it (threads): the copy reads through a descriptor of its own, and
    closing it drops every POSIX lock this process holds on the file, the first backup's
    read transaction's included; the app closing its connection then checkpoints into
    the file the first backup's workers are reading."""
    path = tmp_path / "chat.db"
    _wal_database(path, 3000, "a")
    before = path.read_bytes()
    with consistent_image(path, tmp_path, in_place=True) as held:
        assert held.in_place
        with consistent_image(path, tmp_path, in_place=False) as copy:
            assert not copy.in_place
        subprocess.run([sys.executable, "-c", CLOSING_APP, str(path)], check=True, timeout=60)
        out = tmp_path / "read.db"
        _read_as_worker(path, held.size, out)
        assert out.read_bytes() == before[: held.size]
