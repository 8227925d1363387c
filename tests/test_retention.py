"""forget policies, prune, repair index, check subsets and unlock — and compatibility both
ways with restic."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backvault.repo.format import Snapshot
from backvault.repo.policy import Policy, apply
from backvault.repo.timefmt import format_ns
from tests.conftest import Cli, InitRepo, make_tree, require_restic, tree_digest


def snap(when: datetime, tags: tuple[str, ...] = (), host: str = "phone") -> Snapshot:
    return Snapshot(
        format_ns(int(when.timestamp() * 1e9)), b"\0" * 32, ["/chat"], host, tags=list(tags)
    )


def kept(decisions: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(d.snapshot_id for d in decisions if d.keep)


def test_daily_weekly_monthly_policy() -> None:
    start = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    # A daily backup for 120 days, plus a second one on day 0.
    snaps = [(f"d{i:03d}", snap(start + timedelta(days=i))) for i in range(120)]
    snaps.append(("d000b", snap(start + timedelta(hours=5))))
    decisions = apply(snaps, Policy(daily=7, weekly=4, monthly=3))
    ids = kept(decisions)
    assert [f"d{i:03d}" for i in range(113, 120)] == [i for i in ids if i >= "d113"]
    assert len(ids) <= 7 + 4 + 3 and len(ids) >= 7
    assert "d000b" not in ids or "d000" not in ids  # one per day at most for daily
    reasons = {d.snapshot_id: d.reasons for d in decisions}
    assert (
        "daily" in reasons["d119"] and "weekly" in reasons["d119"] and "monthly" in reasons["d119"]
    )


def test_last_tag_and_group_by() -> None:
    t = datetime(2026, 5, 1, tzinfo=UTC)
    snaps = [
        ("a1", snap(t, host="phone")),
        ("a2", snap(t + timedelta(hours=1), host="phone")),
        ("b1", snap(t, host="tablet")),
        ("b2", snap(t + timedelta(hours=1), host="tablet", tags=("pinned",))),
        ("a0", snap(t - timedelta(days=30), tags=("pinned",))),
    ]
    assert kept(apply(snaps, Policy(last=1))) == ["a2", "b2"]
    assert kept(apply(snaps, Policy(last=1), group_by=())) == ["a2"] or kept(
        apply(snaps, Policy(last=1), group_by=())
    ) == ["b2"]
    assert kept(apply(snaps, Policy(tags=("pinned",)))) == ["a0", "b2"]
    with pytest.raises(ValueError, match="no policy"):
        apply(snaps, Policy())


def restic(repo: Path, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    binary = require_restic()
    env = {**os.environ, "RESTIC_PASSWORD": key, "RESTIC_CACHE_DIR": str(repo.parent / "rcache")}
    return subprocess.run(
        [binary, "-r", str(repo), *args], capture_output=True, text=True, env=env, timeout=600
    )


def days_of_backups(cli: Cli, repo: InitRepo, source: Path, days: int) -> list[dict[str, str]]:
    for day in range(days):
        (source / f"day{day}.bin").write_bytes(os.urandom(1_500_000))
        (source / "notes.txt").write_text(f"day {day}\n" * 1000)
        cli.ok("-r", str(repo.path), "backup", str(source), "--tag", f"day{day}")
    return list(cli.ok("--json", "-r", str(repo.path), "snapshots").json())


def test_forget_prune_keeps_what_is_referenced_and_restic_agrees(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src")
    snaps = days_of_backups(cli, repo, source, 5)
    expected_latest = tree_digest(source)
    dry = cli.ok("--json", "-r", str(repo.path), "forget", "--keep-last", "2", "--dry-run").json()
    assert (
        len(dry["remove"]) == 3
        and len(cli.ok("--json", "-r", str(repo.path), "snapshots").json()) == 5
    )
    before = sum(p.stat().st_size for p in (repo.path / "data").rglob("*") if p.is_file())
    cli.ok("-r", str(repo.path), "forget", "--keep-last", "2", "--prune")
    after = sum(p.stat().st_size for p in (repo.path / "data").rglob("*") if p.is_file())
    assert after < before
    left = cli.ok("--json", "-r", str(repo.path), "snapshots").json()
    assert [s["id"] for s in left] == [s["id"] for s in snaps[-2:]]
    cli.ok("-r", str(repo.path), "check", "--read-data")
    checked = restic(repo.path, repo.key, "check", "--read-data")
    assert checked.returncode == 0 and "no errors were found" in checked.stdout, checked.stderr
    target = tmp_path / "out"
    cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(target))
    assert tree_digest(target / source.relative_to("/")) == expected_latest
    # restic prunes what we wrote, and we still read it.
    pruned = restic(repo.path, repo.key, "forget", "--keep-last", "1", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    cli.ok("-r", str(repo.path), "check", "--read-data")


def test_prune_repacks_partly_used_packs(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(6):
        (source / f"f{i}.bin").write_bytes(os.urandom(1_000_000))
    cli.ok("-r", str(repo.path), "backup", str(source))  # one pack holds all six
    for i in range(5):
        (source / f"f{i}.bin").unlink()
    cli.ok("-r", str(repo.path), "backup", str(source))
    cli.ok("-r", str(repo.path), "forget", "--keep-last", "1")
    summary = cli.ok("--json", "-r", str(repo.path), "prune").json()
    assert summary["packs_to_repack"] >= 1 and summary["bytes_unused"] > 4_000_000
    data = sum(p.stat().st_size for p in (repo.path / "data").rglob("*") if p.is_file())
    assert data < 2_000_000
    cli.ok("-r", str(repo.path), "check", "--read-data")
    target = tmp_path / "out"
    cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(target))
    assert (target / source.relative_to("/") / "f5.bin").read_bytes() == (
        source / "f5.bin"
    ).read_bytes()
    assert restic(repo.path, repo.key, "check", "--read-data").returncode == 0


def test_we_prune_a_repository_restic_made(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "restic-repo"
    assert restic(repo, "pw", "init").returncode == 0
    source = make_tree(tmp_path / "src")
    for day in range(3):
        (source / f"day{day}.bin").write_bytes(os.urandom(800_000))
        assert restic(repo, "pw", "backup", str(source)).returncode == 0
    cli.ok("-r", str(repo), "forget", "--keep-last", "1", "--prune", key="pw")
    checked = restic(repo, "pw", "check", "--read-data")
    assert checked.returncode == 0 and "no errors were found" in checked.stdout, checked.stderr
    out = tmp_path / "out"
    assert restic(repo, "pw", "restore", "latest", "--target", str(out)).returncode == 0
    assert tree_digest(out / source.relative_to("/")) == tree_digest(source)


def test_prune_refuses_when_a_snapshot_is_damaged(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    days_of_backups(cli, repo, source, 2)
    victim = sorted((repo.path / "snapshots").iterdir())[0]
    os.chmod(victim, 0o600)
    victim.write_bytes(victim.read_bytes()[:-5])
    packs_before = sorted(p.name for p in (repo.path / "data").rglob("*") if p.is_file())
    refused = cli.run("-r", str(repo.path), "prune")
    assert refused.code != 0 and "prune stopped before deleting anything" in refused.err
    assert sorted(p.name for p in (repo.path / "data").rglob("*") if p.is_file()) == packs_before


def test_repair_index_after_index_files_are_lost(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    days_of_backups(cli, repo, source, 2)
    for index in (repo.path / "index").iterdir():
        index.unlink()
    broken = cli.run("-r", str(repo.path), "check")
    assert broken.code == 3 and "not in any index" in broken.err
    # Restores go on from the packs' own headers even before the repair.
    target = tmp_path / "out"
    cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(target))
    assert tree_digest(target / source.relative_to("/")) == tree_digest(source)
    repaired = cli.ok("--json", "-r", str(repo.path), "repair", "index").json()
    assert repaired["packs_indexed"] >= 2 and repaired["unreadable_packs"] == []
    cli.ok("-r", str(repo.path), "check", "--read-data")
    assert restic(repo.path, repo.key, "check", "--read-data").returncode == 0


def test_check_read_data_subset(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    days_of_backups(cli, repo, source, 3)
    total = json.loads(cli.ok("--json", "-r", str(repo.path), "check", "--read-data").out)[
        "bytes_read"
    ]
    parts = [
        json.loads(
            cli.ok("--json", "-r", str(repo.path), "check", "--read-data-subset", f"{n}/3").out
        )["bytes_read"]
        for n in (1, 2, 3)
    ]
    assert sum(parts) == total
    bad = cli.run("-r", str(repo.path), "check", "--read-data-subset", "4/3")
    assert bad.code == 2 and "n/t" in bad.err


def test_unlock_removes_only_stale_locks(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    from backvault.repo.format import Lock
    from backvault.repo.repository import Repository
    from backvault.storage import FileType, LocalBackend

    r = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    import socket

    dead = Lock(
        format_ns(int(datetime.now(UTC).timestamp() * 1e9)),
        True,
        socket.gethostname(),
        "x",
        999_999_999,
    )
    r.save_unpacked(FileType.LOCK, dead.to_json())
    alive = Lock(format_ns(int(datetime.now(UTC).timestamp() * 1e9)), False, "other-host", "y", 1)
    r.save_unpacked(FileType.LOCK, alive.to_json())
    result = cli.ok("--json", "-r", str(repo.path), "unlock").json()
    assert result["removed"] == 1
    assert len(list((repo.path / "locks").iterdir())) == 1


def test_a_backup_through_the_python_api_holds_a_shared_lock_a_prune_cannot_pass(
    tmp_path: Path,
) -> None:
    """An app that embeds the engine and calls Backup.run without a lock of its own: a prune
    meanwhile (exclusive) must be refused, or it could delete data the backup reuses."""
    from backvault.engine.archiver import Backup
    from backvault.engine.progress import NoProgress
    from backvault.repo.errors import RepositoryLocked
    from backvault.repo.lock import RepositoryLock
    from backvault.repo.repository import Repository
    from backvault.storage import LocalBackend

    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(b"x" * 100_000)
    outcomes: list[str] = []

    class PruneMeanwhile(NoProgress):
        def advance(self, nbytes: int) -> None:
            other = Repository.open_with_master_key(LocalBackend(tmp_path / "repo"), repo.key)
            try:
                with RepositoryLock(other, exclusive=True):
                    outcomes.append("prune got its lock")
            except RepositoryLocked:
                outcomes.append("refused")

    Backup(repo, PruneMeanwhile(), temp_dir=tmp_path).run([str(source)])
    assert outcomes and set(outcomes) == {"refused"}
    assert repo.locks_held == 0 and not list((tmp_path / "repo" / "locks").iterdir())
