"""The one writer of private files (hardening.private_files): 0600 in a 0700 folder, whole
or not at all, never through a symlink, and exclusive when asked."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from backvault.hardening.private_files import make_private_dir, wipe_file, write_private_file


def test_written_private_in_a_private_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "secret.json"
    write_private_file(path, "text")
    assert path.read_text() == "text"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    write_private_file(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    assert os.listdir(path.parent) == ["secret.json"]  # no temporary left behind


def test_parts_are_written_as_they_come_and_a_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "index"
    write_private_file(path, (bytes([n]) * 1000 for n in range(3)), durable=False)
    assert path.read_bytes() == b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000

    def failing() -> Iterator[bytes]:
        yield b"new"
        raise BufferError("the index changed")

    with pytest.raises(BufferError):
        write_private_file(path, failing(), durable=False)
    assert path.read_bytes() == b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000
    assert os.listdir(path.parent) == ["index"]  # no temporary left behind


def test_a_wide_folder_is_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "wide"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    assert make_private_dir(folder) == f"{folder} was mode 0755; now 0700"
    write_private_file(folder / "x", "1")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    folder = tmp_path / "private"
    make_private_dir(folder)
    (folder / "config.toml").symlink_to(victim)
    write_private_file(folder / "config.toml", "new")
    assert victim.read_text() == "untouched"
    assert not (folder / "config.toml").is_symlink()
    assert (folder / "config.toml").read_text() == "new"


def test_exclusive_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_private_file(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_private_file(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["key"]


def test_wipe_removes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_private_file(path, "secret")
    wipe_file(path)
    assert not path.exists()
