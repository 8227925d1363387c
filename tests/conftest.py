from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).parent / "vectors"


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


@pytest.fixture(scope="session")
def opaque_vectors() -> list[dict[str, Any]]:
    return load_vectors("opaque-3dh-ristretto255-sha512.json")["vectors"]  # type: ignore[no-any-return]


# --- repository and CLI fixtures -------------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402


def require_restic() -> str:
    path = shutil.which("restic")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("restic is not installed; scripts/test.sh installs it when run as root")
        pytest.skip("restic is not installed (scripts/test.sh installs it when run as root)")
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    """Runs the real `backvault` command in a subprocess with an isolated home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "HOME": str(home),
            "BACKVAULT_CONFIG_DIR": str(home / "config"),
            "BACKVAULT_CACHE_DIR": str(home / "cache"),
            "BACKVAULT_KEYRING": "file",
            "COLUMNS": "200",
        }
        for name in ("BACKVAULT_KEY", "BACKVAULT_REPO"):
            self.env.pop(name, None)

    def run(
        self,
        *args: str,
        key: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300,
        stdin_text: str | None = None,
    ) -> CliResult:
        full_env = dict(self.env)
        if key is not None:
            full_env["BACKVAULT_KEY"] = key
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "backvault.cli", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            **({"input": stdin_text} if stdin_text is not None else {"stdin": subprocess.DEVNULL}),
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kwargs: Any) -> CliResult:
        result = self.run(*args, **kwargs)
        assert result.code == 0, f"{args} exited {result.code}: {result.err}"
        return result

    def popen(self, *args: str, key: str | None = None) -> subprocess.Popen[str]:
        full_env = dict(self.env)
        if key is not None:
            full_env["BACKVAULT_KEY"] = key
        return subprocess.Popen(
            [sys.executable, "-m", "backvault.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            stdin=subprocess.DEVNULL,
            # As from a terminal: a test run started in the background of a script (where
            # the shell ignores SIGINT for its children) must still be able to Ctrl-C it.
            preexec_fn=default_sigint,
        )


def default_sigint() -> None:
    """Ctrl-C as from a terminal, in a child process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


@dataclass
class InitRepo:
    path: Path
    key: str  # canonical 64-digit key
    groups: str
    id: str


@pytest.fixture
def repo(cli: Cli, tmp_path: Path) -> InitRepo:
    path = tmp_path / "repo"
    doc = cli.ok("--json", "-r", str(path), "init").json()
    return InitRepo(path, doc["recovery_key"], doc["recovery_key_groups"], doc["id"])


def make_tree(root: Path, seed: int = 1, big: int = 3_000_000) -> Path:
    """A small chat-store-like folder: text, random media, a symlink, modes, nesting."""
    import random
    import sqlite3

    rng = random.Random(seed)
    (root / "media" / "voice").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "media" / "photo1.jpg").write_bytes(rng.randbytes(big))
    (root / "media" / "voice" / "note.opus").write_bytes(rng.randbytes(120_000))
    (root / "notes.txt").write_text("".join(f"line {i}\n" for i in range(20_000)))
    (root / "secret.txt").write_text("only me\n")
    os.chmod(root / "secret.txt", 0o600)
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o755)
    os.symlink("notes.txt", root / "link-to-notes")
    os.symlink("/nonexistent/target", root / "dangling")
    db = sqlite3.connect(root / "msgstore.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY, chat INT, body TEXT)")
    db.executemany(
        "INSERT INTO messages(chat, body) VALUES (?, ?)",
        [(rng.randrange(50), f"message {i} " + "x" * rng.randrange(200)) for i in range(5000)],
    )
    db.commit()
    db.close()
    os.utime(root / "notes.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def tree_digest(root: Path, skip_sqlite_sidecars: bool = True) -> dict[str, Any]:
    """Names, types, modes, mtimes, symlink targets and contents of a tree (SQLite databases
    compared by their logical content, since the copy is consistent, not byte-identical)."""
    import hashlib
    import sqlite3

    result: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if skip_sqlite_sidecars and rel.endswith(("-wal", "-shm", "-journal")):
            continue
        st = path.lstat()
        entry: dict[str, Any] = {"mode": oct(st.st_mode)}
        if path.is_symlink():
            entry["target"] = os.readlink(path)
        elif path.is_file():
            entry["mtime_ns"] = st.st_mtime_ns
            data = path.read_bytes()
            if data.startswith(b"SQLite format 3\x00"):
                con = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
                entry["sqlite"] = hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
                con.close()
            else:
                entry["sha256"] = hashlib.sha256(data).hexdigest()
                entry["size"] = len(data)
        else:
            entry["mtime_ns"] = st.st_mtime_ns
        result[rel] = entry
    return result


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder other users can reach (pytest's own is private to root), removed after:
    where the restore attack tests put what a local user races."""
    base = Path(tempfile.mkdtemp(prefix="backvault-race-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True)
        shutil.rmtree(base)
