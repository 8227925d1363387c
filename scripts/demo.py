"""The walk-through behind scripts/demo.sh; every step is a real `backvault` command."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(args: list[str], env: dict[str, str], show: bool = True) -> str:
    printable = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ backvault {printable}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "backvault.cli", *args], env=env, text=True, capture_output=True
    )
    if show and proc.stdout.strip():
        print(proc.stdout.rstrip())
    if proc.returncode != 0:
        print(proc.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"demo failed at: backvault {printable}")
    return proc.stdout


def make_chat_store(root: Path) -> None:
    rng = random.Random(2021)
    media = root / "Media"
    (media / "Images").mkdir(parents=True)
    (media / "Voice Notes").mkdir()
    for i in range(40):
        (media / "Images" / f"IMG-2026{i:04d}.jpg").write_bytes(
            rng.randbytes(rng.randint(50_000, 400_000))
        )
    for i in range(15):
        (media / "Voice Notes" / f"PTT-{i:04d}.opus").write_bytes(
            rng.randbytes(rng.randint(20_000, 200_000))
        )
    db = sqlite3.connect(root / "msgstore.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY, chat TEXT, ts INT, body TEXT)")
    words = ["hello", "see", "you", "soon", "ok", "thanks", "love", "lunch", "photo", "call"]
    db.executemany(
        "INSERT INTO messages(chat, ts, body) VALUES (?, ?, ?)",
        [
            (
                f"chat-{rng.randrange(30)}",
                1_700_000_000 + i * 60,
                " ".join(rng.choice(words) for _ in range(rng.randint(2, 25))),
            )
            for i in range(60_000)
        ],
    )
    db.commit()
    db.close()


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.name.endswith(("-wal", "-shm")):
            continue
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            data = path.read_bytes()
            if data.startswith(b"SQLite format 3\x00"):
                con = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
                data = "\n".join(con.iterdump()).encode()
                con.close()
            h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="backvault-demo-"))
    phone, new_phone = work / "phone", work / "new-phone"
    store, repo = phone / "chat", work / "storage" / "backup-repo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKVAULT_")}
    env.update(
        BACKVAULT_CONFIG_DIR=str(phone / "config"),
        BACKVAULT_CACHE_DIR=str(phone / "cache"),
        BACKVAULT_KEYRING="file",
        BACKVAULT_REPO=str(repo),
    )
    try:
        say("A phone with a chat history: a SQLite message database and a media folder")
        make_chat_store(store)
        files = [p for p in store.rglob("*") if p.is_file()]
        print(
            f"{len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB in {store}"
        )

        say("Turn on encrypted backup: a new repository and its 64-digit recovery key")
        init = json.loads(run(["--json", "init"], env, show=False))
        groups = init["recovery_key_groups"].split()
        print("Recovery key (shown once; write it down):")
        for row in range(4):
            print("    " + " ".join(groups[row * 4 : row * 4 + 4]))
        print(f"This device remembers the repository key in {init['device_cache']}")

        say("Daily backup, no password prompt (the device key cache opens the repository)")
        run(["backup", str(store)], env)
        expected = digest(store)

        say("A day of chatting: 200 new messages and two photos, then the next daily backup")
        db = sqlite3.connect(store / "msgstore.db")
        db.executemany(
            "INSERT INTO messages(chat, ts, body) VALUES ('chat-1', 1800000000, ?)",
            [(f"new message {i}",) for i in range(200)],
        )
        db.commit()
        db.close()
        for i in range(2):
            (store / "Media" / "Images" / f"IMG-new-{i}.jpg").write_bytes(os.urandom(250_000))
        run(["backup", str(store)], env)
        expected = digest(store)
        run(["snapshots"], env)

        say("The phone is lost: the device forgets its key")
        run(["forget-device"], env)
        shutil.rmtree(phone)

        say("A new phone: restore the latest snapshot with the 64-digit key, typed in groups")
        new_env = dict(
            env,
            BACKVAULT_CONFIG_DIR=str(new_phone / "config"),
            BACKVAULT_CACHE_DIR=str(new_phone / "cache"),
            BACKVAULT_KEY=" ".join(groups).upper(),
        )
        run(["restore", "latest", "--target", str(new_phone / "restored")], new_env)
        restored = new_phone / "restored" / store.relative_to("/")
        same = digest(restored) == expected
        print(f"restored chat store identical to the phone's last backup: {same}")
        if not same:
            raise SystemExit("demo failed: the restored store differs")

        say("Check every byte of the repository")
        run(["check", "--read-data"], new_env)
        restic = shutil.which("restic")
        if restic:
            say("Stock restic opens the same repository with the same 64 digits")
            renv = dict(
                new_env,
                RESTIC_PASSWORD=init["recovery_key"],
                RESTIC_CACHE_DIR=str(work / "restic-cache"),
            )
            print(f"$ restic -r {repo} snapshots")
            subprocess.run([restic, "-r", str(repo), "snapshots"], env=renv, check=True)

        say("What the storage holds: encrypted objects only")
        objects = [p for p in repo.rglob("*") if p.is_file()]
        print(
            f"{len(objects)} objects, {sum(p.stat().st_size for p in objects) / 2**20:.1f} MiB; "
            "names are SHA-256 hashes; no file name, message or key appears in clear"
        )
        print(f"\nDemo finished; everything it made is in {work} (delete it when done).")
    except BaseException:
        print(f"(work folder kept for inspection: {work})", file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
