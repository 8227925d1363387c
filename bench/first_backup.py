"""First backup of a ~1 GB folder: backvault against restic, same machine, same data.

    .venv/bin/python bench/first_backup.py [--size-mb 1024] [--workdir DIR] [--smoke]

The folder is generated deterministically: 80 % incompressible media (photos 50-500 KB,
voice notes, a few videos), 20 % text-like compressible files, plus a SQLite message
database. Prints wall time and repository size for each tool, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import du

WORDS = (
    "hello see you tomorrow ok thanks love lunch meeting photo call later yes no maybe "
    "running late where are you happy birthday congrats great sounds good"
).split()


def generate(root: Path, size_mb: int, seed: int = 42) -> int:
    rng = random.Random(seed)
    media = root / "Media"
    media.mkdir(parents=True)
    budget = size_mb * 1024 * 1024
    media_budget = int(budget * 0.8)
    total = 0
    i = 0
    while total < media_budget:
        kind = rng.random()
        if kind < 0.8:
            size = rng.randint(50_000, 500_000)
            name = media / f"IMG-{i:06d}.jpg"
        elif kind < 0.97:
            size = rng.randint(20_000, 400_000)
            name = media / f"PTT-{i:06d}.opus"
        else:
            size = rng.randint(3_000_000, 12_000_000)
            name = media / f"VID-{i:06d}.mp4"
        name.write_bytes(rng.randbytes(size))
        total += size
        i += 1
    db = sqlite3.connect(root / "msgstore.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY, chat INT, ts INT, body TEXT)")
    rows = []
    target = budget - total
    written = 0
    n = 0
    while written < target:
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
        rows.append((rng.randrange(300), 1_600_000_000 + n * 7, body))
        written += len(body) + 30
        n += 1
        if len(rows) >= 10_000:
            db.executemany("INSERT INTO messages(chat, ts, body) VALUES (?, ?, ?)", rows)
            rows.clear()
    if rows:
        db.executemany("INSERT INTO messages(chat, ts, body) VALUES (?, ?, ?)", rows)
    db.commit()
    db.close()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="20 MB, for CI")
    args = parser.parse_args()
    size_mb = 20 if args.smoke else args.size_mb
    work = args.workdir or Path(tempfile.mkdtemp(prefix="backvault-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "chat"
    if not source.exists():
        generate(source, size_mb)
    source_bytes = du(source)
    env = {
        **os.environ,
        "BACKVAULT_CONFIG_DIR": str(work / "cfg"),
        "BACKVAULT_KEYRING": "file",
        "BACKVAULT_CACHE_DIR": str(work / "cache"),
    }
    rows = []
    ours = work / "repo-backvault"
    shutil.rmtree(ours, ignore_errors=True)
    shutil.rmtree(work / "cfg", ignore_errors=True)
    backvault = [sys.executable, "-m", "backvault.cli", "-q", "-r", str(ours)]
    subprocess.run([*backvault, "init"], check=True, env=env, stdout=subprocess.DEVNULL)
    rows.append(("backvault", timed([*backvault, "backup", str(source)], env), du(ours)))
    restic = shutil.which("restic")
    if restic:
        theirs = work / "repo-restic"
        shutil.rmtree(theirs, ignore_errors=True)
        renv = {**env, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "rcache")}
        subprocess.run([restic, "-q", "-r", str(theirs), "init"], check=True, env=renv)
        rows.append(
            (
                "restic",
                timed([restic, "-q", "-r", str(theirs), "backup", str(source)], renv),
                du(theirs),
            )
        )
    print(
        f"source: {source_bytes / 2**20:.0f} MiB in {sum(1 for _ in source.rglob('*'))} entries; "
        f"{os.cpu_count()} cores; {sys.platform}"
    )
    print(f"{'tool':<10} {'first backup s':>15} {'MiB/s':>8} {'repository MiB':>15}")
    for name, seconds, size in rows:
        print(
            f"{name:<10} {seconds:>15.2f} {source_bytes / 2**20 / seconds:>8.1f} {size / 2**20:>15.1f}"
        )
    if len(rows) == 2:
        print(
            f"ratio backvault/restic: time {rows[0][1] / rows[1][1]:.2f}, size {rows[0][2] / rows[1][2]:.3f}"
        )
    print(json.dumps({"source_bytes": source_bytes, "results": rows}))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
