"""The README's main command (the demo) and the benchmarks run, in small form."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_restic

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_restores_identically(tmp_path: Path) -> None:
    require_restic()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "restored chat store identical to the phone's last backup: True" in proc.stdout
    assert "no errors found" in proc.stdout
    assert "2 snapshots" in proc.stdout


def test_first_backup_bench_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "first_backup.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "backvault" in proc.stdout and "repository MiB" in proc.stdout


def test_vault_bench_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vault_bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logins/s" in proc.stdout
