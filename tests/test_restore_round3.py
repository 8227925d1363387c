"""Red team round three against restore: each attack performed for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.test_hostile_snapshots import Hostile, link
from tests.test_restore_attacks import ATTACKER, fingerprint, needs_root


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder other users can reach (pytest's own is private to root), removed after."""
    base = Path(tempfile.mkdtemp(prefix="backvault-rt3-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


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
