"""Red team round three against restore: each attack performed for real."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backvault.engine.restorer import Restorer, matches
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
from tests.conftest import Cli, default_sigint
from tests.test_hostile_snapshots import Hostile, link, remove_tree
from tests.test_restore_attacks import ATTACKER, fingerprint, needs_root


def as_attacker(*argv: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", *argv],
        check=True,
        cwd="/",
    )


@needs_root
def test_a_root_owned_symlink_that_another_user_moved_onto_the_way_is_not_followed(
    open_dir: Path, cli: Cli
) -> None:
    """Root restores alice's backup into her home (``first``): its symlink ``shortcut`` ->
    a root-only folder comes back owned by root, as the snapshot says. Alice, who owns the
    folder it is in, renames it to ``/home/alice/second``, where root restores next: the
    symlink belongs to root, so it was followed and root restored into the root-only
    folder."""
    secret = open_dir / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "keep").write_text("root's\n")
    home = open_dir / "home-alice"
    home.mkdir()
    os.chown(home, ATTACKER, ATTACKER)
    h = Hostile(open_dir / "repo")
    first_id = h.snapshot([{**link("shortcut", secret), "uid": 0, "gid": 0}])
    cli.ok("-r", str(h.path), "restore", first_id, "--target", str(home / "first"), key=h.key)
    os.chown(home / "first", ATTACKER, ATTACKER)  # her folder, as her home is
    assert (home / "first" / "shortcut").lstat().st_uid == 0
    as_attacker("mv", str(home / "first" / "shortcut"), str(home / "second"))
    before = fingerprint(secret)
    second_id = h.snapshot([h.file("ld.so.preload", b"/home/alice/evil.so\n")])
    result = cli.run(
        "-r", str(h.path), "restore", second_id, "--target", str(home / "second" / "sub"),
        key=h.key,
    )  # fmt: skip
    assert fingerprint(secret) == before, "root restored into a folder outside the target"
    assert result.code == 1, result.err
    assert f"{home / 'second'}" in result.err, result.err


def test_include_on_a_snapshot_nested_thousands_deep_does_not_take_hours(tmp_path: Path) -> None:
    """``restore --include leaf.txt`` of a planted snapshot of folders nested 1500 deep:
    every entry was matched against every ancestor of its path, window by window (the cube
    of the depth: 43 s for 1000 levels, hours for 10 000). Now only the entry itself."""
    h = Hostile(tmp_path / "repo")
    nodes = [h.file("leaf.txt", b"deep\n")]
    for _ in range(1500):
        nodes = [h.folder("d", nodes)]
    snapshot_id = h.snapshot(nodes)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    snapshot = repo.find_snapshot(snapshot_id)[1]
    target = tmp_path / "out"
    try:
        started = time.monotonic()
        result = Restorer(repo, target, ["leaf.txt", "/d/nothing"], workers=2).run(snapshot)
        assert time.monotonic() - started < 30
        assert result.files == 1 and not result.damaged
        assert (target / Path(*["d"] * 1500) / "leaf.txt").read_bytes() == b"deep\n"
    finally:
        if target.exists():
            remove_tree(target, tmp_path / "spare")


@pytest.mark.parametrize(
    "path, pattern, expected, itself",
    [
        ("/a/b/c", "c", True, True),
        ("/a/b/c", "b", True, False),  # an ancestor matched
        ("/a/b/c", "b/c", True, True),
        ("/a/b/c", "/a", True, False),
        ("/a/b/c", "/a/b/c", True, True),
        ("/a/b/c", "/b", False, False),
        ("/a/b/c", "/a/b/c/d", False, False),
        ("/a/b/c", "a/*", True, False),
        ("/a/b/c", "b/*", True, True),
        ("/a/b/c", "x", False, False),
    ],
)
def test_include_patterns_match_as_before(
    path: str, pattern: str, expected: bool, itself: bool
) -> None:
    assert matches(path, [pattern]) is expected
    assert matches(path, [pattern], ancestors=False) is itself


def test_an_interrupted_overwrite_puts_back_the_file_a_folder_replaced(
    tmp_path: Path, cli: Cli
) -> None:
    """``restore --overwrite`` of a snapshot where a folder ``notes`` (of 100 files) goes
    where the target has a file ``notes``; Ctrl-C once the folder is in place. The old file
    had been moved aside into the private folder, which the stopped restore removed: the
    only copy was gone, and ``notes`` was a folder holding part of the files."""
    h = Hostile(tmp_path / "repo")
    files = [h.file(f"f{i:03d}", os.urandom(2_000_000)) for i in range(100)]
    snapshot_id = h.snapshot([h.folder("notes", files)])
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes").write_text("the only copy of my notes\n")
    restore = subprocess.Popen(
        [sys.executable, "-m", "backvault.cli", "-r", str(h.path), "restore", snapshot_id,
         "--target", str(target), "--overwrite"],
        env={**cli.env, "BACKVAULT_KEY": h.key}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (target / "notes").is_dir() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.1)
    restore.send_signal(signal.SIGINT)
    _, err = restore.communicate(timeout=60)
    if restore.returncode == 0:  # pragma: no cover - finished before the signal
        assert len(os.listdir(target / "notes")) == 100
        return
    assert restore.returncode == 130, err
    assert (target / "notes").read_text() == "the only copy of my notes\n"
    assert os.listdir(target) == ["notes"]


def _deep_folder(top: Path, depth: int) -> None:
    fd = os.open(top.parent, os.O_RDONLY)
    name = top.name
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, name = inner, "d"
    finally:
        os.close(fd)


def test_a_deep_folder_that_overwrite_replaces_is_removed(tmp_path: Path, cli: Cli) -> None:
    """``restore --overwrite`` of a file ``x`` where the target holds a folder ``x`` nested
    1200 deep (anyone who can write into the target can make one): it was moved aside and
    removed with shutil.rmtree, which recursed: ``internal error: RecursionError`` after
    the restore, and the private folder stayed."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot([h.file("x", b"new x\n")])
    target = tmp_path / "out"
    target.mkdir()
    _deep_folder(target / "x", 1200)
    cli.ok("-r", str(h.path), "restore", snapshot_id, "--target", str(target), "--overwrite",
           key=h.key)  # fmt: skip
    assert os.listdir(target) == ["x"] and (target / "x").read_bytes() == b"new x\n"


SWAP_AT_OPEN = r"""
import os, sys
from backvault.engine.restorer import Restorer
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
repo_path, key, snapshot_id, target, kind, outside = sys.argv[1:7]
real_open = os.open
def racing_open(path, flags, mode=0o777, *, dir_fd=None):
    # The other user's move, at the worst moment: the folder "swap" of what was moved
    # aside, listed and seen as a folder, is a fifo (or a symlink to one) when opened.
    if path == "swap" and dir_fd is not None:
        os.rename("swap", "was-swap", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if kind == "fifo":
            os.mkfifo("swap", dir_fd=dir_fd)
        else:
            os.symlink(outside, "swap", dir_fd=dir_fd)
    return real_open(path, flags, mode, dir_fd=dir_fd)
os.open = racing_open
repo = Repository.open(LocalBackend(repo_path), [key.encode()])
result = Restorer(repo, target, overwrite=True).run(repo.find_snapshot(snapshot_id)[1])
print(result.to_json()["warnings"])
"""


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_what_overwrite_moved_aside_is_removed_without_opening_a_swapped_in_fifo(
    tmp_path: Path, kind: str
) -> None:
    """The folder ``x`` that ``--overwrite`` moves aside belongs to another user, who kept
    a descriptor of it and swaps a subfolder for a fifo (or a symlink to a fifo, or to a
    device) between shutil.rmtree's lstat and its open: root's restore opened it with
    O_RDONLY, following symlinks, and hung there for good (a device would have been
    opened as root). The swap is made at that very moment here."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot([h.file("x", b"new x\n")])
    target = tmp_path / "out"
    (target / "x" / "swap" / "inner").mkdir(parents=True)
    outside = tmp_path / "outside-fifo"
    os.mkfifo(outside)
    done = subprocess.run(
        [sys.executable, "-c", SWAP_AT_OPEN, str(h.path), h.key, snapshot_id, str(target),
         kind, str(outside)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.listdir(target) == ["x"] and (target / "x").read_bytes() == b"new x\n"
    assert stat.S_ISFIFO(outside.lstat().st_mode)


@needs_root
def test_entries_planted_under_a_leftover_name_change_nothing_outside(
    open_dir: Path, cli: Cli
) -> None:
    """Attack that failed: alice, who owns the target, plants entries named like a killed
    restore's private folder (a symlink to a root-only folder, and a folder holding
    symlinks out), so the target counts as empty; root restores there (without
    --overwrite) and then runs the ``rm -rf`` the restore prints. Nothing outside the
    target is read, written or removed: the leftovers are never touched, the command
    removes the symlink itself, not what it points to."""
    secret = open_dir / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "keep").write_text("root's\n")
    target = open_dir / "home-alice"
    target.mkdir()
    os.chown(target, ATTACKER, ATTACKER)
    link_name, folder_name = (
        ".backvault-restore-0123456789abcdef",
        ".backvault-restore-fedcba9876543210",
    )
    as_attacker("ln", "-s", str(secret), str(target / link_name))
    as_attacker("mkdir", str(target / folder_name))
    as_attacker("ln", "-s", str(secret), str(target / folder_name / "keep"))
    h = Hostile(open_dir / "repo")
    snapshot_id = h.snapshot(
        [h.file("a.txt", b"a\n"), h.folder(link_name[:-1] + "0", [h.file("b", b"b\n")])]
    )
    before = fingerprint(secret)
    done = cli.ok("-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key)
    said = [line for line in done.err.splitlines() if "interrupted" in line]
    assert len(said) == 1, done.err
    assert fingerprint(secret) == before
    subprocess.run(["sh", "-c", said[0].split("with: ", 1)[1]], check=True)
    assert fingerprint(secret) == before
    assert sorted(os.listdir(target)) == sorted(["a.txt", link_name[:-1] + "0"])
