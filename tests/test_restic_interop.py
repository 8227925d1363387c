"""The judge is the real restic: it checks and restores what we write, and we restore what
it writes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, InitRepo, make_tree, require_restic, tree_digest


def restic(
    repo: Path, password: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    binary = require_restic()
    env = {
        **os.environ,
        "RESTIC_PASSWORD": password,
        "RESTIC_CACHE_DIR": str(repo.parent / "rcache"),
    }
    proc = subprocess.run(
        [binary, "-r", str(repo), *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert proc.returncode == 0, f"restic {args}: {proc.stderr}"
    return proc


def test_restic_checks_and_restores_our_snapshot(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    expected = tree_digest(source)
    cli.ok("-r", str(repo.path), "backup", str(source))
    # A second, incremental snapshot after a change, so the parent chain is exercised.
    (source / "notes.txt").write_text("changed\n")
    os.utime(source / "notes.txt", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    expected = tree_digest(source)
    cli.ok("-r", str(repo.path), "backup", str(source))

    check = restic(repo.path, repo.key, "check", "--read-data")
    assert "no errors were found" in check.stdout

    target = tmp_path / "restored-by-restic"
    restic(repo.path, repo.key, "restore", "latest", "--target", str(target))
    restored = target / source.relative_to("/")
    assert tree_digest(restored) == expected


def test_restic_accepts_the_key_only_in_canonical_form(repo: InitRepo) -> None:
    assert restic(repo.path, repo.key, "snapshots").returncode == 0
    wrong = restic(repo.path, repo.groups, "snapshots", check=False)
    assert wrong.returncode != 0


def test_we_restore_a_repository_restic_made_with_a_password(cli: Cli, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", seed=7)
    expected = tree_digest(source)
    repo = tmp_path / "restic-repo"
    restic(repo, "a restic password", "init")
    restic(repo, "a restic password", "backup", str(source))

    listing = cli.ok("--json", "-r", str(repo), "snapshots", key="a restic password").json()
    assert len(listing) == 1 and listing[0]["paths"] == [str(source)]
    target = tmp_path / "restored"
    cli.ok("-r", str(repo), "restore", "latest", "--target", str(target), key="a restic password")
    assert tree_digest(target / source.relative_to("/")) == expected
    cli.ok("-r", str(repo), "check", "--read-data", key="a restic password")


def test_restic_backs_up_into_our_repository_and_we_restore_it(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src", seed=3)
    expected = tree_digest(source)
    cli.ok("-r", str(repo.path), "backup", str(source))
    restic(repo.path, repo.key, "backup", str(source))  # restic reuses our config and index
    snaps = cli.ok("--json", "-r", str(repo.path), "snapshots").json()
    assert len(snaps) == 2
    target = tmp_path / "restored"
    cli.ok("-r", str(repo.path), "restore", snaps[-1]["id"], "--target", str(target))
    assert tree_digest(target / source.relative_to("/")) == expected
    restic(repo.path, repo.key, "check", "--read-data")


def test_restic_sees_every_key_slot(cli: Cli, repo: InitRepo) -> None:
    added = cli.ok("--json", "-r", str(repo.path), "key", "add").json()["recovery_key"]
    assert restic(repo.path, added, "snapshots").returncode == 0
    keys = restic(repo.path, repo.key, "key", "list").stdout
    # Every slot shows restic the same neutral names (what it is, only backvault can read).
    rows = [line[1:].split() for line in keys.splitlines() if line[:1] in " *" and "-" in line]
    rows = [row for row in rows if len(row) >= 4 and len(row[0]) == 8]
    assert [row[1:3] for row in rows] == [["backvault", "backvault"]] * 2, keys


@pytest.mark.parametrize("size", [0, 1, 600_000, 9_000_000])
def test_file_sizes_around_chunk_boundaries(
    cli: Cli, repo: InitRepo, tmp_path: Path, size: int
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f.bin").write_bytes(os.urandom(size))
    cli.ok("-r", str(repo.path), "backup", str(source))
    restic(repo.path, repo.key, "check", "--read-data")
    target = tmp_path / "out"
    restic(repo.path, repo.key, "restore", "latest", "--target", str(target))
    assert (target / source.relative_to("/") / "f.bin").read_bytes() == (
        source / "f.bin"
    ).read_bytes()
