"""`backvault demo`: the whole story on embedded defaults, in under a minute, offline.

A sample chat store on a "phone"; an embedded vault on loopback; backup turned on with a
password (and a 64-digit key); a daily backup; the phone is lost; a "new phone" restores
with just the password and checks the result; wrong passwords count down; and finally what
the storage and the vault hold. Every step is a real `backvault` command in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PASSWORD = "grandma's lemon cake 1987"  # noqa: S105 - the demo's sample password
WORDS = ["hello", "see", "you", "soon", "ok", "thanks", "love", "lunch", "photo", "call"]


def make_chat_store(root: Path, seed: int = 2021) -> None:
    rng = random.Random(seed)
    media = root / "Media"
    (media / "Images").mkdir(parents=True)
    (media / "Voice Notes").mkdir()
    for i in range(40):
        size = rng.randint(50_000, 400_000)
        (media / "Images" / f"IMG-2026{i:04d}.jpg").write_bytes(rng.randbytes(size))
    for i in range(15):
        size = rng.randint(20_000, 200_000)
        (media / "Voice Notes" / f"PTT-{i:04d}.opus").write_bytes(rng.randbytes(size))
    db = sqlite3.connect(root / "msgstore.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY, chat TEXT, ts INT, body TEXT)")
    rows = [
        (
            f"chat-{rng.randrange(30)}",
            1_700_000_000 + i * 60,
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 25))),
        )
        for i in range(60_000)
    ]
    db.executemany("INSERT INTO messages(chat, ts, body) VALUES (?, ?, ?)", rows)
    db.commit()
    db.close()


def digest(root: Path) -> str:
    """Names and contents of a tree; SQLite databases by their logical content."""
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


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.bold = sys.stdout.isatty()

    def say(self, text: str) -> None:
        print(f"\n\033[1m== {text}\033[0m" if self.bold else f"\n== {text}", flush=True)

    def run(
        self,
        args: list[str],
        env: dict[str, str],
        expect: int = 0,
        show: bool = True,
        stdin: str | None = None,
    ) -> str:
        # Tokens are credentials: show only their start.
        printable = [a[:8] + "…" if a.startswith("bvt_") else a for a in args]
        shown = " ".join(a if " " not in a else repr(a) for a in printable)
        piped = "   # the token, piped in: never on a command line" if stdin is not None else ""
        print(f"$ backvault {shown}{piped}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "backvault.cli", *args],
            env=env,
            text=True,
            capture_output=True,
            timeout=300,
            input=stdin,
        )
        if show and proc.stdout.strip():
            print(proc.stdout.rstrip(), flush=True)
        if proc.stderr.strip() and (proc.returncode != 0 or show):
            print(proc.stderr.rstrip(), flush=True)
        if proc.returncode != expect:
            raise SystemExit(f"demo failed: `backvault {shown}` exited {proc.returncode}")
        return proc.stdout

    def device_env(self, name: str, **extra: str) -> dict[str, str]:
        home = self.work / name
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKVAULT_")}
        env.update(
            HOME=str(home),
            BACKVAULT_CONFIG_DIR=str(home / "config"),
            BACKVAULT_CACHE_DIR=str(home / "cache"),
            BACKVAULT_KEYRING="file",
            **extra,
        )
        return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(keep: bool = False) -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="backvault-demo-"))
    demo = Demo(work)
    vault_dir, repo = work / "vault-operator", work / "cloud-storage" / "chat-backup"
    store = work / "phone" / "chat"
    vault_proc = None
    try:
        demo.say("A phone with a chat history: a SQLite message database and a media folder")
        make_chat_store(store)
        files = [p for p in store.rglob("*") if p.is_file()]
        print(f"{len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB")

        demo.say("The chat service runs a Backup Key Vault (here: embedded, on loopback)")
        # The vault's key goes to $XDG_CONFIG_HOME: keep it inside the demo's folder.
        operator_env = demo.device_env(
            "vault-operator", XDG_CONFIG_HOME=str(work / "vault-operator" / ".config")
        )
        token = demo.run(
            ["vault", "add-account", "--data-dir", str(vault_dir), "ana"], operator_env, show=False
        ).strip()
        print("account 'ana' created; its token goes to Ana's devices")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(work / "vault.log", "wb")  # noqa: SIM115 - the vault process keeps it
        vault_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backvault.cli",
                "vault",
                "serve",
                "--data-dir",
                str(vault_dir),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            env=operator_env,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as answer:  # noqa: S310 - loopback
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or vault_proc.poll() is not None:
                    raise SystemExit("demo failed: the embedded vault did not start") from None
                time.sleep(0.1)
        print(f"vault listening on {url}")

        phone = demo.device_env("phone", BACKVAULT_PASSWORD=PASSWORD)
        demo.say("Ana turns on encrypted backup with a password (and keeps a 64-digit key too)")
        for key, value in (
            ("repository", str(repo)),
            ("vault.url", url),
            ("vault.account", "ana"),
        ):
            demo.run(["config", "set", key, value], phone, show=False)
        # A token never goes on a command line: it is piped in, and kept in the keyring.
        demo.run(["config", "set", "vault.token", "-"], phone, show=False, stdin=token)
        init = json.loads(demo.run(["--json", "init", "--password"], phone, show=False))
        groups = init["recovery_key_groups"].split()
        print("64-digit recovery key (shown once):")
        for row in range(4):
            print("    " + " ".join(groups[row * 4 : row * 4 + 4]))
        print(f"password slot {init['password_key_id'][:8]} registered with the vault")
        demo.run(["key", "list"], phone)

        demo.say("Daily backup: no password needed (this device's key cache opens the repository)")
        demo.run(["backup", str(store)], phone)
        expected = digest(store)

        demo.say("The phone is lost")
        demo.run(["forget-device"], phone)
        shutil.rmtree(work / "phone")
        print("the phone, its chats and its key cache are gone")

        new_phone = demo.device_env("new-phone")
        demo.say("A new phone: same account, and Ana types a wrong password twice")
        for key, value in (
            ("repository", str(repo)),
            ("vault.url", url),
            ("vault.account", "ana"),
        ):
            demo.run(["config", "set", key, value], new_phone, show=False)
        # A token never goes on a command line: it is piped in, and kept in the keyring.
        demo.run(["config", "set", "vault.token", "-"], new_phone, show=False, stdin=token)
        for guess in ("grandma's lemon pie", "lemon cake 1987"):
            demo.run(["snapshots"], dict(new_phone, BACKVAULT_PASSWORD=guess), expect=10)

        demo.say("Then the right password: restore the latest snapshot")
        target = work / "new-phone" / "restored"
        demo.run(
            ["restore", "latest", "--target", str(target)],
            dict(new_phone, BACKVAULT_PASSWORD=PASSWORD),
        )
        same = digest(target / store.relative_to("/")) == expected
        print(f"restored chat history identical to the lost phone's backup: {same}")
        if not same:
            raise SystemExit("demo failed: the restored history differs")
        demo.run(["password", "check"], dict(new_phone, BACKVAULT_PASSWORD=PASSWORD))

        demo.say("What the storage provider holds")
        objects = [p for p in repo.rglob("*") if p.is_file()]
        by_dir: dict[str, int] = {}
        for p in objects:
            by_dir[p.relative_to(repo).parts[0]] = by_dir.get(p.relative_to(repo).parts[0], 0) + 1
        print(
            f"{len(objects)} objects ({', '.join(f'{n} {d}' for d, n in sorted(by_dir.items()))}), "
            f"{sum(p.stat().st_size for p in objects) / 2**20:.1f} MiB, named by SHA-256"
        )
        print("it can learn: how much is stored and when. It cannot read a message, a file name")
        print("or a key, and cannot guess the password (nothing derived from it is there).")

        demo.say("What the vault operator holds")
        db = sqlite3.connect(vault_dir / "vault.db")
        for table in ("vault_keys", "accounts", "records", "logins", "audit"):
            count = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
            print(f"  {table:<11} {count} rows")
        record = db.execute(
            "SELECT length(sealed_payload), attempts_used, max_attempts FROM records"
        ).fetchone()
        db.close()
        print(
            f"the record: {record[0]} sealed bytes (OPAQUE record + wrapped slot secret), "
            f"{record[1]} of {record[2]} wrong guesses used"
        )
        print("it can learn: that 'ana' has a record, and when and from where logins happen.")
        print("It cannot read the backup key (wrapped under a key only the password yields),")
        print("cannot guess offline (OPAQUE; the OPRF seed is sealed), and a thief of its")
        print("database gets sealed bytes only. Known limit: an operator who rolls its database")
        print("back can reset guess counters.")
        print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")
        return 0
    finally:
        if vault_proc is not None:
            vault_proc.terminate()
            vault_proc.wait(timeout=20)
        if keep:
            print(f"(everything the demo made is in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
