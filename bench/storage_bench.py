"""Backup throughput to each backend on loopback: a local folder, S3 (moto's server) and
restic's REST protocol (`rclone serve restic`), and rclone over --stdio with a local remote.

    .venv/bin/python bench/storage_bench.py [--size-mb 200] [--smoke]

The same generated data (incompressible, like media) is backed up once to each; prints
seconds and MiB/s, and the ratio to the local folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.storage_servers import S3_ENV, start_moto, start_rclone_rest  # noqa: E402


def backup(location: str, source: Path, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "backvault.cli", "-q", "-r", location]
    subprocess.run([*cmd, "init"], check=True, env=env, stdout=subprocess.DEVNULL)
    started = time.perf_counter()
    subprocess.run([*cmd, "backup", str(source)], check=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    size = 8 if args.smoke else args.size_mb
    work = Path(tempfile.mkdtemp(prefix="backvault-storage-bench-"))
    servers = []
    try:
        source = work / "media"
        source.mkdir()
        for i in range(max(1, size // 4)):
            (source / f"clip{i}.mp4").write_bytes(os.urandom(4 * 1024 * 1024))
        env = {
            **os.environ,
            **S3_ENV,
            "BACKVAULT_CONFIG_DIR": str(work / "cfg"),
            "BACKVAULT_KEYRING": "file",
            "RCLONE_CONFIG_BENCH_TYPE": "local",
        }
        moto = start_moto(work)
        rest = start_rclone_rest(work)
        servers = [moto, rest]
        targets = [
            ("local folder", str(work / "local-repo")),
            ("S3 (moto)", f"s3:http://127.0.0.1:{moto.port}/bench/repo"),
            ("REST (rclone serve restic)", f"rest:http://127.0.0.1:{rest.port}/repo"),
            ("rclone --stdio (local remote)", f"rclone:bench:{work / 'rclone-repo'}"),
        ]
        rows = [(name, backup(location, source, env)) for name, location in targets]
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    mib = size if size >= 4 else 4
    print(f"{os.cpu_count()} cores; {mib} MiB of incompressible files; first backup each")
    print(f"{'backend':<32} {'seconds':>8} {'MiB/s':>8} {'vs local':>9}")
    for name, seconds in rows:
        print(f"{name:<32} {seconds:>8.2f} {mib / seconds:>8.1f} {rows[0][1] / seconds:>9.2f}")


if __name__ == "__main__":
    main()
