"""Crash safety and damage detection.

Crash suite: a backup and a prune are killed with SIGKILL right before their N-th write or
delete (BACKVAULT_FAULT_KILL_AFTER_WRITES), at points drawn from several seeds. After every
kill: `check` passes (leftovers may only be warned about), every earlier snapshot restores
identical, and the next backup (or prune) succeeds.

Corruption suite: 100 random corruptions — bit flips, truncations, deletions — of stored
objects, each on a fresh copy of a repository. `check --read-data` detects every one, and a
restore names the damaged files and restores every other file identical.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from backvault.engine.check import Checker
from backvault.engine.restorer import Restorer
from backvault.repo.errors import DamagedObject, RepositoryError
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
from tests.conftest import Cli, InitRepo, make_tree, tree_digest

KILL = "BACKVAULT_FAULT_KILL_AFTER_WRITES"


def restore_digest(
    cli: Cli, repo: Path, snapshot_id: str, target: Path, source: Path
) -> dict[str, object]:
    if target.exists():
        shutil.rmtree(target)
    cli.ok("-r", str(repo), "restore", snapshot_id, "--target", str(target))
    return tree_digest(target / source.relative_to("/"))


def assert_consistent(
    cli: Cli,
    repo: Path,
    expected: dict[str, dict[str, object]],
    sources: dict[str, Path],
    tmp: Path,
) -> None:
    check = cli.run("-r", str(repo), "check")
    assert check.code == 0, check.err
    for error_line in check.err.splitlines():
        assert error_line.startswith("warning: data/"), error_line  # only leftover packs
    for snapshot_id, digest in expected.items():
        assert (
            restore_digest(cli, repo, snapshot_id, tmp / "verify", sources[snapshot_id]) == digest
        )


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_backup_killed_at_random_writes(
    cli: Cli, repo: InitRepo, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    source = make_tree(tmp_path / "src", seed=seed, big=1_000_000)
    first = cli.ok("--json", "-r", str(repo.path), "backup", str(source)).json()["snapshot_id"]
    expected = {first: tree_digest(source)}
    sources = {first: source}
    points = [rng.randrange(0, 6) for _ in range(7)]  # a backup here makes 6 to 8 writes
    kills = 0
    for point in points:
        for i in range(3):
            (source / f"new-{point}-{i}.bin").write_bytes(rng.randbytes(rng.randint(1, 6_000_000)))
        result = cli.run("-r", str(repo.path), "backup", str(source), env={KILL: str(point)})
        if result.code == -9:
            kills += 1
        else:
            assert result.code == 0, result.err
            latest = cli.ok("--json", "-r", str(repo.path), "snapshots").json()[-1]["id"]
            expected[latest] = tree_digest(source)
            sources[latest] = source
        assert_consistent(cli, repo.path, expected, sources, tmp_path)
        done = cli.ok("--json", "-r", str(repo.path), "backup", str(source)).json()["snapshot_id"]
        expected[done] = tree_digest(source)
        sources[done] = source
    assert kills == len(points), f"only {kills} of {len(points)} kills landed"
    cli.ok("-r", str(repo.path), "check", "--read-data")


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_prune_killed_at_random_writes(cli: Cli, repo: InitRepo, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    source = tmp_path / "src"
    source.mkdir()
    kills = 0
    for round_number in range(7):
        # Two days of changes, then forget all but the last two snapshots.
        for _ in range(2):
            for i in range(4):
                (source / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(100_000, 900_000)))
            cli.ok("-r", str(repo.path), "backup", str(source))
        cli.ok("-r", str(repo.path), "forget", "--keep-last", "2")
        kept = cli.ok("--json", "-r", str(repo.path), "snapshots").json()
        latest = kept[-1]["id"]
        expected = {latest: tree_digest(source)}
        point = rng.randrange(0, 5)  # a prune here makes 5 or more writes
        result = cli.run(
            "-r", str(repo.path), "prune", "--max-unused", "0%", env={KILL: str(point)}
        )
        kills += result.code == -9
        assert result.code in (0, -9), result.err
        assert_consistent(cli, repo.path, expected, {latest: source}, tmp_path)
        assert len(cli.ok("--json", "-r", str(repo.path), "snapshots").json()) == 2
        cli.ok("-r", str(repo.path), "prune")  # the next prune cleans up
        assert_consistent(cli, repo.path, expected, {latest: source}, tmp_path)
        check = cli.run("-r", str(repo.path), "check")
        assert check.code == 0 and "warning" not in check.err, check.err
        del round_number
    assert kills == 7, f"only {kills} of 7 kills landed"
    cli.ok("-r", str(repo.path), "check", "--read-data")


# --- corruption -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, bytes, Path, dict[bytes, dict[str, object]]]:
    """A repository with two snapshots of a 25-file tree, written in-process."""
    from backvault.engine.archiver import Backup

    base = tmp_path_factory.mktemp("pristine")
    source = make_tree(base / "src", seed=99, big=600_000)
    rng = random.Random(99)
    for i in range(15):
        (source / "media" / f"img{i}.jpg").write_bytes(rng.randbytes(rng.randint(1_000, 300_000)))
    secret = b"k" * 32
    repo = Repository.init(LocalBackend(base / "repo"), secret)
    digests: dict[bytes, dict[str, object]] = {}
    for day in range(2):
        if day:
            (source / "notes.txt").write_text("changed\n")
        snapshot_id = Backup(repo).run([str(source)]).snapshot_id
        digests[repo.find_snapshot(snapshot_id)[1].tree] = tree_digest(source)
    return base / "repo", secret, source, digests


def corrupt(repo: Path, rng: random.Random) -> str:
    """Damage one stored object; returns a description."""
    objects = [
        p
        for p in repo.rglob("*")
        if p.is_file() and p.parent.name not in ("keys", "locks") and p.name != "config"
    ]
    target = rng.choice(objects)
    kind = rng.choice(["flip", "truncate", "delete"])
    if kind == "delete" and target.parent.name == "snapshots":
        kind = "flip"  # a deleted snapshot is indistinguishable from a forgotten one
    os.chmod(target, 0o600)
    data = bytearray(target.read_bytes())
    if kind == "flip":
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif kind == "truncate":
        target.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:
        target.unlink()
    return f"{kind} {target.relative_to(repo)}"


def test_100_random_corruptions_are_all_detected_and_restores_save_the_rest(
    pristine: tuple[Path, bytes, Path, dict[bytes, dict[str, object]]], tmp_path: Path
) -> None:
    repo_path, secret, source, digests = pristine
    rng = random.Random(2026)
    detected = 0
    restored_files = damaged_files = 0
    for case in range(100):
        work = tmp_path / f"case{case}"
        shutil.copytree(repo_path, work)
        what = corrupt(work, rng)
        repo = Repository.open(LocalBackend(work), [secret])
        result = Checker(repo).run(read_data=True)
        assert result.errors, f"undetected: {what}"
        detected += 1
        # Restore the latest snapshot that can still be read.
        fresh = Repository.open(LocalBackend(work), [secret])
        try:
            _, snapshot = fresh.find_snapshot("latest")
        except (DamagedObject, RepositoryError):
            continue  # every snapshot file damaged: check named it; nothing to restore
        expected: dict[str, dict[str, object]] = digests[snapshot.tree]  # type: ignore[assignment]
        target = tmp_path / f"out{case}"
        outcome = Restorer(fresh, target).run(snapshot)
        restored = (
            tree_digest(target / source.relative_to("/"))
            if (target / source.relative_to("/")).exists()
            else {}
        )
        damaged_paths = [p for p, _ in outcome.damaged]
        for rel, entry in expected.items():
            if "sha256" not in entry:
                continue
            full = "/" + str(source.relative_to("/") / rel)
            named = any(full == d or full.startswith(d.rstrip("/") + "/") for d in damaged_paths)
            if rel in restored:
                assert restored[rel] == entry, f"{what}: {rel} restored differently"
            else:
                assert named, f"{what}: {rel} missing and not named as damaged ({damaged_paths})"
        restored_files += sum(1 for e in restored.values() if "sha256" in e)
        damaged_files += len(damaged_paths)
        shutil.rmtree(work)
        shutil.rmtree(target, ignore_errors=True)
    assert detected == 100
    print(
        f"corruptions detected: {detected}/100; files restored {restored_files}, named damaged {damaged_files}"
    )
