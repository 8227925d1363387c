"""A realistic, deterministic chat store for benchmarks: a messenger-shaped SQLite database
plus a media folder, and `--mutate PERCENT` to simulate more days of chatting.

    python bench/chatstore.py DIR [--scale 1.0] [--shape chat] [--seed 1]   # build
    python bench/chatstore.py DIR --mutate 1 [--seed 2]                      # a day of chatting

Shapes, at scale 1.0:
- ``chat``: about 1 M messages (~300 MB database with receipts, media references and a
  full-text index) and ~800 MB of incompressible media (photos 50-500 KB, voice notes, a
  few videos of several MB, some forwarded duplicates);
- ``db-heavy``: a heavy user whose message database is most of the data: 5 M messages
  (~1.45 GB database) and ~200 MB of media.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
from pathlib import Path

WORDS = (
    "ok yes no maybe thanks love you see soon tomorrow tonight lunch dinner call me later "
    "where are running late sorry happy birthday congrats great idea sounds good what time "
    "meeting photo video look this haha lol sure fine home work school kids mom dad weekend "
    "train bus car traffic rain sun beach coffee tea pizza movie game match won lost"
).split()
# Messages and media bytes at scale 1.0, by shape.
SHAPES = {
    "chat": (1_000_000, 800 * 1024 * 1024),
    "db-heavy": (5_000_000, 200 * 1024 * 1024),
}

SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE contacts(id INTEGER PRIMARY KEY, jid TEXT UNIQUE, name TEXT, phone TEXT, status TEXT);
CREATE TABLE chats(id INTEGER PRIMARY KEY, jid TEXT UNIQUE, subject TEXT, created INTEGER,
                   last_message_id INTEGER, unread INTEGER DEFAULT 0);
CREATE TABLE messages(id INTEGER PRIMARY KEY, key_id TEXT, chat_id INTEGER, from_me INTEGER,
                      sender_id INTEGER, ts INTEGER, text TEXT, status INTEGER, media_id INTEGER,
                      starred INTEGER DEFAULT 0, thumbnail BLOB);
CREATE UNIQUE INDEX messages_key ON messages(key_id);
CREATE INDEX messages_chat_ts ON messages(chat_id, ts);
CREATE TABLE receipts(message_id INTEGER, contact_id INTEGER, ts INTEGER, kind INTEGER);
CREATE INDEX receipts_message ON receipts(message_id);
CREATE TABLE media(id INTEGER PRIMARY KEY, message_id INTEGER, path TEXT, mime TEXT, size INTEGER, hash TEXT);
CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='id');
"""


def _text(rng: random.Random) -> str:
    # Messenger lengths: mostly short, a long tail.
    n = min(200, int(rng.paretovariate(1.4) * 7))
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


class Store:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.db_path = root / "msgstore.db"
        (root / "Media").mkdir(parents=True, exist_ok=True)

    def add_media(self, db: sqlite3.Connection, message_id: int, budget: list[int]) -> int | None:
        rng = self.rng
        roll = rng.random()
        folder, mime, size = "Images", "image/jpeg", rng.randint(50_000, 500_000)
        if roll > 0.8:
            folder, mime, size = "Voice Notes", "audio/ogg", rng.randint(10_000, 300_000)
        if roll > 0.985:
            folder, mime, size = "Video", "video/mp4", rng.randint(2_000_000, 12_000_000)
        directory = self.root / "Media" / folder
        directory.mkdir(exist_ok=True)
        path = directory / f"{mime.split('/')[0].upper()}-{message_id:08d}.{mime.split('/')[1]}"
        forwarded = sorted(directory.iterdir())[:50] if rng.random() < 0.05 else []
        # A forwarded item is the same bytes again under another name.
        data = rng.choice(forwarded).read_bytes() if forwarded else rng.randbytes(size)
        path.write_bytes(data)
        budget[0] -= len(data)
        cursor = db.execute(
            "INSERT INTO media(message_id, path, mime, size, hash) VALUES (?,?,?,?,?)",
            (
                message_id,
                str(path.relative_to(self.root)),
                mime,
                len(data),
                f"{rng.getrandbits(128):032x}",
            ),
        )
        return cursor.lastrowid

    def add_messages(
        self, db: sqlite3.Connection, count: int, media_bytes: int, start_ts: int
    ) -> None:
        rng = self.rng
        contacts = db.execute("SELECT count(*) FROM contacts").fetchone()[0]
        chats = db.execute("SELECT count(*) FROM chats").fetchone()[0]
        next_id = (db.execute("SELECT max(id) FROM messages").fetchone()[0] or 0) + 1
        media_every = max(1, count * 250_000 // max(1, media_bytes)) if media_bytes else 0
        budget = [media_bytes]
        rows, receipts = [], []
        for i in range(count):
            mid = next_id + i
            chat = int(rng.paretovariate(1.2)) % chats + 1
            from_me = rng.random() < 0.45
            media_id = None
            if media_every and i % media_every == 0 and budget[0] > 0:
                media_id = self.add_media(db, mid, budget)
            text = _text(rng)
            thumbnail = rng.randbytes(rng.randint(3_000, 9_000)) if media_id else None
            rows.append(
                (
                    mid,
                    f"{rng.getrandbits(80):020X}",
                    chat,
                    int(from_me),
                    0 if from_me else rng.randrange(1, contacts + 1),
                    start_ts + i * 7,
                    text,
                    13 if from_me else 0,
                    media_id,
                    thumbnail,
                )
            )
            if from_me:
                for kind in (1, 2):
                    receipts.append(
                        (mid, rng.randrange(1, contacts + 1), start_ts + i * 7 + kind * 30, kind)
                    )
            if len(rows) >= 20_000:
                self._flush(db, rows, receipts)
        self._flush(db, rows, receipts)

    @staticmethod
    def _flush(
        db: sqlite3.Connection, rows: list[tuple[object, ...]], receipts: list[tuple[object, ...]]
    ) -> None:
        db.executemany(
            "INSERT INTO messages(id, key_id, chat_id, from_me, sender_id, ts, text, status, media_id, thumbnail) VALUES (?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        db.executemany(
            "INSERT INTO messages_fts(rowid, text) VALUES (?, ?)", [(r[0], r[6]) for r in rows]
        )
        db.executemany("INSERT INTO receipts VALUES (?,?,?,?)", receipts)
        rows.clear()
        receipts.clear()


def build(root: Path, scale: float = 1.0, seed: int = 1, shape: str = "chat") -> None:
    messages, media_bytes = SHAPES[shape]
    rng = random.Random(seed)
    store = Store(root, rng)
    db = sqlite3.connect(store.db_path)
    db.executescript(SCHEMA)
    contacts = max(50, int(800 * scale))
    db.executemany(
        "INSERT INTO contacts(jid, name, phone, status) VALUES (?,?,?,?)",
        [
            (f"{31600000000 + i}@s.example", f"Contact {i}", f"+{31600000000 + i}", _text(rng))
            for i in range(contacts)
        ],
    )
    db.executemany(
        "INSERT INTO chats(jid, subject, created) VALUES (?,?,?)",
        [
            (f"chat{i}@g.example", _text(rng)[:40], 1_500_000_000 + i)
            for i in range(max(20, int(300 * scale)))
        ],
    )
    store.add_messages(db, int(messages * scale), int(media_bytes * scale), 1_600_000_000)
    db.commit()
    db.close()


def mutate(root: Path, percent: float, seed: int = 2) -> None:
    """More days of chatting: new messages and media (percent of the store), a few old
    messages deleted, statuses and receipts updated, some messages starred."""
    rng = random.Random(seed)
    store = Store(root, rng)
    db = sqlite3.connect(store.db_path)
    total = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    media_total = db.execute("SELECT coalesce(sum(size), 0) FROM media").fetchone()[0]
    last_ts = db.execute("SELECT max(ts) FROM messages").fetchone()[0] or 1_600_000_000
    new = max(1, int(total * percent / 100))
    store.add_messages(db, new, int(media_total * percent / 100), last_ts + 60)
    old = [
        r[0]
        for r in db.execute("SELECT id FROM messages ORDER BY id LIMIT ?", (max(1, new // 20),))
    ]
    db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in old])
    recent = db.execute(
        "SELECT id FROM messages WHERE from_me = 1 ORDER BY id DESC LIMIT ?", (new,)
    ).fetchall()
    db.executemany("UPDATE messages SET status = 13 WHERE id = ?", recent)
    db.executemany(
        "INSERT INTO receipts VALUES (?, 1, ?, 3)",
        [(r[0], last_ts + 99) for r in recent[: new // 2]],
    )
    db.executemany(
        "UPDATE messages SET starred = 1 WHERE id = ?",
        [(rng.randrange(1, total),) for _ in range(max(1, new // 100))],
    )
    db.execute(
        "UPDATE chats SET unread = unread + 1, last_message_id = (SELECT max(id) FROM messages)"
    )
    db.commit()
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="chat")
    parser.add_argument("--seed", type=int, help="default: 1 to build, 2 to mutate")
    parser.add_argument("--mutate", type=float, metavar="PERCENT")
    args = parser.parse_args()
    # A mutation must not replay the build's random stream (it would repeat message keys).
    if args.mutate is not None:
        mutate(args.dir, args.mutate, 2 if args.seed is None else args.seed)
    else:
        build(args.dir, args.scale, 1 if args.seed is None else args.seed, args.shape)


if __name__ == "__main__":
    main()
