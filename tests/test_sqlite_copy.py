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

from backvault.source.sqlite import consistent_copy

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
