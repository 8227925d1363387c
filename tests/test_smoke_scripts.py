"""The README's main command (the demo) and the benchmarks run, in small form."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    """`backvault demo`, the README's main command: offline, embedded vault, under a minute."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKVAULT_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "backvault.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "restored chat history identical to the lost phone's backup: True" in out
    assert "wrong password — 9 attempts left" in out and "wrong password — 8 attempts left" in out
    assert "Your password is right" in out
    assert "What the storage provider holds" in out and "What the vault operator holds" in out
    # The token is piped into `config set vault.token -`: no part of it is ever shown.
    assert "config set vault.token -" in out and "bvt_" not in out
    assert not list(tmp_path.glob("backvault-demo-*")), "the demo cleans up after itself"


def test_demo_with_three_realms_tells_the_story_and_shows_the_bound(tmp_path: Path) -> None:
    """`backvault demo --realms 3`: three realm processes on loopback (A on PostgreSQL with
    SoftHSM2 sealing where installed), one stopped mid-story, one rolled back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKVAULT_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "backvault.cli", "demo", "--realms", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    if os.environ.get("CI"):  # CI installs both (scripts/bootstrap.sh)
        assert "PostgreSQL" in out and "sealing key in a SoftHSM2 token" in out
    assert "2 of 3 needed for the password" in out
    # One guess = one evaluation at each of 2 realms; the bound over the realms' counts.
    assert "wrong password — 6 attempts left" in out and "wrong password — 5 attempts left" in out
    assert "realm B stopped" in out
    assert "warning: realm http://127.0.0.1:" in out  # the realm that was down is named
    assert (
        "restored chat history identical to the lost phone's backup: True (with realm B down)"
        in out
    )
    assert "Your password is right. The realms allow" in out
    assert "realm C: registered, 0 of 5 attempts used  (rolled back)" in out
    assert "(the bound: 7 for 3 realms, t = 2, G_r = 5; 10 with one realm rolled back)" in out
    assert "the bound with one realm rolled back: True" in out
    assert "What each realm operator holds" in out
    assert "cannot test a single guess" in out
    # Tokens are piped into `config set vault.token --realm URL -`: none is ever shown.
    assert out.count("config set vault.token --realm http://127.0.0.1:") == 9
    assert "bvt_" not in out and "bvt_" not in proc.stderr
    assert not list(tmp_path.glob("backvault-demo-*")), "the demo cleans up after itself"


def run_bench_smoke(tmp_path: Path, script: str) -> str:
    """Run a benchmark in its --smoke form; returns its output (CI never times anything)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_first_backup_bench_smoke(tmp_path: Path) -> None:
    out = run_bench_smoke(tmp_path, "first_backup.py")
    assert "backvault" in out and "repository MiB" in out


def test_vault_bench_smoke(tmp_path: Path) -> None:
    assert "logins/s" in run_bench_smoke(tmp_path, "vault_bench.py")


def test_realms_bench_smoke(tmp_path: Path) -> None:
    out = run_bench_smoke(tmp_path, "realms_bench.py")
    assert "end to end (RealmSet.recover)" in out and "evaluations/s" in out


def test_storage_bench_smoke(tmp_path: Path) -> None:
    out = run_bench_smoke(tmp_path, "storage_bench.py")
    assert "S3 (moto)" in out and "REST (rclone serve restic)" in out


def test_compare_bench_smoke(tmp_path: Path) -> None:
    """bench/compare.py on a tiny chat store: every step runs for every tool."""
    out = run_bench_smoke(tmp_path, "compare.py")
    assert "true change after --mutate 1" in out and "backvault" in out


def test_chatstore_generator_is_deterministic(tmp_path: Path) -> None:
    from bench.chatstore import build

    for name in ("a", "b"):
        build(tmp_path / name, scale=0.002, seed=5)
    files_a = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    files_b = sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert files_a == files_b
    media = [p for p in files_a if p.parts[0] == "Media"]
    assert media and all(
        (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in media
    )
