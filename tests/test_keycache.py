"""The device key cache through a real keyring backend (keyrings.alt's file keyring stands
in for the desktop's Secret Service) and through the 0600-file fallback."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cli


def test_key_cache_in_the_os_keyring(cli: Cli, tmp_path: Path) -> None:
    env = {
        "BACKVAULT_KEYRING": "",
        "PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring",
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    repo = str(tmp_path / "repo")
    init = cli.ok("-r", repo, "init", env=env)
    assert "OS keyring (PlaintextKeyring)" in init.out
    assert not (cli.home / "config" / "device-keys").exists()
    assert list((tmp_path / "data").rglob("keyring_pass.cfg"))
    cli.ok("-r", repo, "snapshots", env=env)
    forgotten = cli.ok("-r", repo, "forget-device", env=env)
    assert "OS keyring entry" in forgotten.out
    denied = cli.run("-r", repo, "snapshots", env=env)
    assert denied.code == 10


def test_key_cache_file_fallback_is_private(cli: Cli, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    init = cli.ok("-r", repo, "init")
    assert "a file readable only by you" in init.out
    files = list((cli.home / "config" / "device-keys").iterdir())
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    cli.ok("-r", repo, "forget-device")
    assert not list((cli.home / "config" / "device-keys").iterdir())
