"""Consistent copies of a live SQLite database (source/sqlite.py), under a writer that
commits as fast as it can and checkpoints in every mode (PASSIVE, FULL, RESTART, TRUNCATE)
while we copy: every copy must open, pass integrity_check and balance."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backvault.source.sqlite import (
    consistent_copy,
    consistent_image,
    is_sqlite_database,
    page_size_of,
)
from tests.conftest import Cli, InitRepo

WRITER = """
import random, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("PRAGMA wal_autocheckpoint=50")
modes = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"]
n = 0
end = time.time() + 900  # killed when the copies are done; long enough for a loaded machine
while time.time() < end:
    a, b = random.randrange(4000), random.randrange(4000)
    db.execute("UPDATE acct SET balance=balance-3, pad=? WHERE id=?", (random.randbytes(300).hex(), a))
    db.execute("UPDATE acct SET balance=balance+3 WHERE id=?", (b,))
    if n % 50 == 0:  # grow the file now and then, so checkpoints extend it
        db.execute("INSERT INTO extra(blob) VALUES (?)", (random.randbytes(4000),))
    db.commit()
    n += 1
    if n % 40 == 0:
        try:
            db.execute(f"PRAGMA wal_checkpoint({modes[n // 40 % 4]})").fetchall()
        except sqlite3.OperationalError:
            pass
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_copies_of_a_busy_database_are_consistent(tmp_path: Path, journal: str) -> None:
    path = tmp_path / "bank.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA journal_mode={journal}")
    db.execute("CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INT, pad TEXT)")
    db.execute("CREATE TABLE extra(id INTEGER PRIMARY KEY, blob BLOB)")
    db.executemany("INSERT INTO acct VALUES (?, 100, ?)", [(i, "p" * 600) for i in range(4000)])
    db.commit()
    db.close()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    copies = 0
    try:
        time.sleep(0.3)
        # Five copies while the writer keeps writing, however long a loaded machine takes
        # (the deadline only stops a copy that never finishes).
        deadline = time.time() + 600
        while copies < 5 and time.time() < deadline:
            with consistent_copy(path, str(tmp_path)) as copy:
                assert not Path(f"{copy}-wal").exists() or Path(f"{copy}-wal").stat().st_size == 0
                check = sqlite3.connect(copy)
                assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                assert check.execute("SELECT sum(balance), count(*) FROM acct").fetchone() == (
                    400000,
                    4000,
                )
                check.close()
            copies += 1
        assert writer.poll() is None, "the writer stopped: the copies blocked it"
    finally:
        writer.kill()
        writer.wait()
    assert copies >= 5
    assert not list(tmp_path.glob(".backvault-sqlite-*"))


def _wal_database(path: Path, rows: int = 3000) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO m(body) VALUES (?)", [("x" * 500,) for _ in range(rows)])
    db.commit()
    db.close()  # the last connection: checkpointed, the WAL removed


def test_a_database_is_read_in_place_only_with_nothing_in_its_wal(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    _wal_database(path)
    assert not Path(f"{path}-wal").exists()
    with consistent_image(path, tmp_path, in_place=True) as image:
        assert image.in_place and image.path == path
        assert (image.size, image.page_size) == (path.stat().st_size, 4096)
    with consistent_image(path, tmp_path, in_place=False) as image:  # the caller forbids it
        assert not image.in_place and image.path != path
    # A writer's frames not yet checkpointed: the file alone is not the database.
    app = sqlite3.connect(path)
    app.execute("PRAGMA wal_autocheckpoint=0")
    app.execute("INSERT INTO m(body) VALUES ('new')")
    app.commit()
    assert Path(f"{path}-wal").stat().st_size > 0
    with consistent_image(path, tmp_path, in_place=True) as image:
        assert not image.in_place and image.path != path
        copy = sqlite3.connect(image.path)
        assert copy.execute("SELECT count(*) FROM m").fetchone()[0] == 3001
        copy.close()
    app.close()
    journal = tmp_path / "journal.db"
    db = sqlite3.connect(journal)
    db.execute("CREATE TABLE t(x)")
    db.commit()
    db.close()
    with consistent_image(journal, tmp_path, in_place=True) as image:
        assert not image.in_place  # rollback-journal mode: always a copy


CLOSING_APP = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=5)
db.executemany("INSERT INTO m(body) VALUES (?)", [("after",)] * 200)
db.commit()
db.close()  # the app's last connection: it checkpoints and removes the WAL if it can
"""


def test_a_database_held_in_place_stays_the_snapshot_when_the_app_closes_it(
    tmp_path: Path,
) -> None:
    """The attack on the hold: our own process reads the file's header while we hold the
    read transaction (the walk does: is it a database? its page size?). A plain open and
    close would drop every POSIX lock this process holds on the file, SQLite's too; the
    app closing its last connection would then take the file's exclusive lock, checkpoint
    its new rows into the very file the workers are reading, and delete the WAL."""
    path = tmp_path / "chat.db"
    _wal_database(path)
    before = path.read_bytes()
    with consistent_image(path, tmp_path, in_place=True) as image:
        assert image.in_place
        # (This test itself must not open the file here, for the same reason.)
        assert is_sqlite_database(path) and page_size_of(path) == 4096
        subprocess.run([sys.executable, "-c", CLOSING_APP, str(path)], check=True, timeout=60)
        assert Path(f"{path}-wal").stat().st_size > 0  # the app's rows wait in its WAL
    assert path.read_bytes() == before  # nothing was checkpointed into our snapshot
    db = sqlite3.connect(path)  # and nothing of the app's is lost
    assert db.execute("SELECT count(*) FROM m WHERE body = 'after'").fetchone()[0] == 200
    db.close()


def test_a_database_without_a_database_name_whose_wal_alone_changed_is_read_again(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """Its own stat does not change while its WAL takes the new rows: the WAL beside it
    in its folder's listing is what makes the backup read it again."""
    source = tmp_path / "source"
    source.mkdir()
    path = source / "chatlog"  # no database name: only the WAL beside it tells
    _wal_database(path, rows=200)
    app = sqlite3.connect(path)
    app.execute("PRAGMA wal_autocheckpoint=0")
    app.execute("INSERT INTO m(body) VALUES ('first')")
    app.commit()
    app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the WAL is there, empty
    assert Path(f"{path}-wal").stat().st_size == 0
    run = ("-r", str(repo.path))
    cli.ok(*run, "backup", str(source), key=repo.key)
    before = path.stat()
    app.execute("INSERT INTO m(body) VALUES ('second')")
    app.commit()
    after = path.stat()
    assert (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
    cli.ok(*run, "backup", str(source), key=repo.key)
    app.close()
    target = tmp_path / "restored"
    cli.ok(*run, "restore", "latest", "--target", str(target), key=repo.key)
    restored = sqlite3.connect(target / str(path).lstrip("/"))
    bodies = [row[0] for row in restored.execute("SELECT body FROM m WHERE id > 200")]
    restored.close()
    assert bodies == ["first", "second"]
