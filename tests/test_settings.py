"""The client's settings, in process: the layers (defaults, file, keyring, environment,
flags), where each value came from, validation of the environment-only settings, the
file's format and privacy, and the device's folders (XDG through platformdirs)."""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from backvault.device import paths, schedule, secretstore
from backvault.device.environment import EnvironmentSettings
from backvault.device.settings import (
    HIDDEN,
    Settings,
    SettingsError,
    set_value,
    settings_path,
    store_token,
)


@pytest.fixture(autouse=True)
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith(("BACKVAULT_", "XDG_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BACKVAULT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("BACKVAULT_KEYRING", "file")
    yield tmp_path / "config"


def test_defaults_with_nothing_set() -> None:
    settings = Settings.resolve()
    assert (settings.repository, settings.vault_url, settings.vault_token) == (None, None, None)
    assert (settings.worker_processes, settings.retry_attempts, settings.rclone) == (
        None,
        8,
        "rclone",
    )
    assert settings.vault is None
    assert settings.describe()["sources"] == {}


def test_flags_beat_the_environment_which_beats_the_file(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_value("repository", "/from/file")
    set_value("vault.url", "https://file.example")
    set_value("vault.account", "ana")
    monkeypatch.setenv("BACKVAULT_REPO", "/from/env")
    monkeypatch.setenv("BACKVAULT_VAULT_URL", "https://env.example")
    settings = Settings.resolve({"repository": None, "vault.url": "https://flag.example"})
    assert settings.repository == "/from/env"
    assert settings.vault_url == "https://flag.example"
    assert settings.vault_account == "ana"
    file = str(device / "config.toml")
    assert settings.describe()["sources"] == {
        "repository": "$BACKVAULT_REPO",  # not "flag" (issue 13's first bug)
        "vault.url": "flag",
        "vault.account": file,
    }
    assert settings.describe()["file"] == file


def test_the_token_from_the_environment_then_the_keyring_then_an_old_file(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (device).mkdir(mode=0o700)
    (device / "config.toml").write_text('[vault]\ntoken = "bvt_old"\n')
    assert Settings.resolve().vault_token == "bvt_old"
    where = store_token("bvt_stored")
    assert "a file readable only by you" in where
    assert "token" not in tomllib.loads((device / "config.toml").read_text()).get("vault", {})
    stored = Settings.resolve()
    assert stored.vault_token == "bvt_stored"
    assert stored.sources["vault.token"] == str(device / "vault-token")
    monkeypatch.setenv("BACKVAULT_VAULT_TOKEN", "bvt_env")
    from_env = Settings.resolve()
    assert from_env.vault_token == "bvt_env"
    assert from_env.describe()["vault.token"] == HIDDEN
    assert from_env.sources["vault.token"] == "$BACKVAULT_VAULT_TOKEN"
    assert "bvt_env" not in repr(from_env) + str(from_env) + str(from_env.describe())


def test_the_file_keeps_its_format_and_is_private(device: Path) -> None:
    path = set_value("repository", "/mnt/nas/chat-backup")
    set_value("vault.url", "https://vault.example")
    set_value("vault.account", "alice")
    assert path == settings_path() == device / "config.toml"
    assert tomllib.loads(path.read_text()) == {
        "repository": "/mnt/nas/chat-backup",
        "vault": {"url": "https://vault.example", "account": "alice"},
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(device.stat().st_mode) == 0o700
    set_value("vault.account", None)
    assert "account" not in path.read_text()


def test_bad_names_values_and_files_are_settings_errors(device: Path) -> None:
    with pytest.raises(SettingsError, match=r"unknown setting 'vault\.user'; known: repository"):
        set_value("vault.user", "x")
    with pytest.raises(SettingsError, match="kept in the OS keyring, not the settings file"):
        set_value("vault.token", "bvt_x")
    device.mkdir(mode=0o700, exist_ok=True)
    (device / "config.toml").write_text("repository = \n")
    with pytest.raises(SettingsError, match=r"config\.toml is not valid TOML"):
        Settings.resolve()


def test_require_vault_says_what_is_missing_and_refuses_plain_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SettingsError, match=r"missing vault\.url, vault\.account, vault\.token"):
        Settings.resolve().require_vault()
    monkeypatch.setenv("BACKVAULT_VAULT_TOKEN", "bvt_x")
    flags: dict[str, str | None] = {"vault.url": "http://vault.example", "vault.account": "a"}
    with pytest.raises(SettingsError, match="plain http"):
        Settings.resolve(flags).require_vault()
    vault = Settings.resolve(flags, allow_plain_http=True).require_vault()
    assert vault.allow_plain_http and vault.account == "a"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", (None)), ("", None), (" 2 ", 2), ("0", 0), ("-3", 0), ("AUTO", None)],
)
def test_worker_processes(
    value: str, expected: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKVAULT_WORKER_PROCESSES", value)
    assert EnvironmentSettings.load().worker_processes == expected


def test_environment_only_settings_are_validated_on_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKVAULT_RETRY_ATTEMPTS", "0")
    assert Settings.resolve().retry_attempts == 1  # at least one try, as before
    monkeypatch.setenv("BACKVAULT_RETRY_ATTEMPTS", "many")
    with pytest.raises(SettingsError, match="BACKVAULT_RETRY_ATTEMPTS must be a whole number"):
        Settings.resolve()
    monkeypatch.setenv("BACKVAULT_RETRY_ATTEMPTS", "3")
    monkeypatch.setenv("BACKVAULT_WORKER_PROCESSES", "lots")
    with pytest.raises(SettingsError, match="BACKVAULT_WORKER_PROCESSES must be a number"):
        EnvironmentSettings.load()
    monkeypatch.setenv("BACKVAULT_WORKER_PROCESSES", "2")
    monkeypatch.setenv("BACKVAULT_RCLONE", "/opt/rclone")
    settings = Settings.resolve()
    assert (settings.retry_attempts, settings.worker_processes, settings.rclone) == (
        3,
        2,
        "/opt/rclone",
    )
    assert settings.sources["retry_attempts"] == "$BACKVAULT_RETRY_ATTEMPTS"
    assert "retry_attempts" not in settings.describe()["sources"]  # `config` shows the four


def test_the_file_cannot_set_environment_only_settings(device: Path) -> None:
    device.mkdir(mode=0o700)
    (device / "config.toml").write_text('retry_attempts = 1\nconfig_dir = "/elsewhere"\n')
    settings = Settings.resolve()
    assert settings.retry_attempts == 8 and settings.config_dir == device


def test_keyring_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert secretstore.keyring_backend() is None  # BACKVAULT_KEYRING=file
    monkeypatch.setenv("BACKVAULT_KEYRING", "FILE")
    assert secretstore.keyring_backend() is None
    monkeypatch.setenv("BACKVAULT_KEYRING", "")
    assert EnvironmentSettings.load().uses_keyring


def test_folders_follow_xdg_and_the_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.delenv("BACKVAULT_CONFIG_DIR")
    assert paths.config_dir() == home / ".config" / "backvault"
    assert paths.cache_dir() == home / ".cache" / "backvault"
    assert schedule._systemd_dir() == home / ".config" / "systemd" / "user"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xk"))
    assert paths.config_dir() == tmp_path / "xc" / "backvault"
    assert paths.cache_dir() == tmp_path / "xk" / "backvault"
    assert schedule._systemd_dir() == tmp_path / "xc" / "systemd" / "user"
    monkeypatch.setenv("BACKVAULT_CONFIG_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("BACKVAULT_CACHE_DIR", str(tmp_path / "k"))
    assert paths.config_dir() == tmp_path / "c"
    assert paths.cache_dir() == tmp_path / "k"
    assert settings_path() == tmp_path / "c" / "config.toml"
    temp = paths.private_temp_dir()
    assert temp == tmp_path / "k" / "tmp" and stat.S_IMODE(temp.stat().st_mode) == 0o700


def test_the_schedule_passes_on_where_the_device_keeps_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKVAULT_CACHE_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("BACKVAULT_WORKER_PROCESSES", "2")
    assert schedule._device_variables() == {
        "BACKVAULT_CONFIG_DIR": str(tmp_path / "config"),
        "BACKVAULT_CACHE_DIR": str(tmp_path / "k"),
        "BACKVAULT_KEYRING": "file",
    }


def test_the_lower_layers_take_the_tuning_as_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import backvault.storage as storage
    from backvault.engine import parallel
    from backvault.storage.base import StorageError

    for module, name in [
        (parallel, "_requested_processes"),
        (storage, "_retry_attempts"),
        (storage, "_rclone_program"),
    ]:
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setenv("BACKVAULT_WORKER_PROCESSES", "5")  # the engine never reads it
    parallel.configure(worker_processes=3)
    assert parallel.worker_processes() == (3, True)
    parallel.configure(worker_processes=None)
    assert parallel.worker_processes()[1] is False
    storage.configure(retry_attempts=2, rclone=str(Path("/nonexistent/rclone")))
    backend = storage.open_backend("rest:http://127.0.0.1:9/")
    assert getattr(backend, "attempts", None) == 2
    with pytest.raises(StorageError, match="rclone is not installed"):
        storage.open_backend("rclone:remote:path")


def test_realms_from_the_file_with_tokens_from_the_keyring_or_the_environment(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backvault.device.settings import parse_realms, store_realm_token

    pinned = "00112233445566778899aabbccddeeff"
    set_value(
        "vault.realms", f"https://r1.example, {pinned}@https://r2.example/ https://r3.example"
    )
    set_value("vault.threshold", "2")
    set_value("vault.account", "alice")
    doc = tomllib.loads((device / "config.toml").read_text())
    assert doc["vault"]["realms"] == [
        "https://r1.example",
        f"{pinned}@https://r2.example",
        "https://r3.example",
    ]
    assert doc["vault"]["threshold"] == 2
    settings = Settings.resolve()
    assert [pin.url for pin in settings.vault_realms] == [
        "https://r1.example",
        "https://r2.example",
        "https://r3.example",
    ]
    assert settings.vault_realms[1].realm_id == bytes.fromhex(pinned)
    assert settings.vault is None  # no tokens yet
    with pytest.raises(SettingsError, match=r"no token for the realms https://r1\.example, "):
        settings.require_vault()
    for n in (1, 2, 3):
        store_realm_token(f"https://r{n}.example", f"bvt_r{n}")
    vault = Settings.resolve().require_vault()
    assert vault.uses_realms and vault.threshold == 2 and vault.account == "alice"
    assert [r.token for r in vault.realms] == ["bvt_r1", "bvt_r2", "bvt_r3"]
    assert "bvt_r" not in repr(vault) and "r1.example" in vault.where
    monkeypatch.setenv("BACKVAULT_VAULT_REALM_TOKENS", "bvt_e1,bvt_e2")
    with pytest.raises(SettingsError, match="has 2 tokens for 3 realms"):
        Settings.resolve().require_vault()
    monkeypatch.setenv("BACKVAULT_VAULT_REALM_TOKENS", "bvt_e1,bvt_e2,bvt_e3")
    assert [r.token for r in Settings.resolve().require_vault().realms][2] == "bvt_e3"
    monkeypatch.setenv(
        "BACKVAULT_VAULT_REALMS", "http://r1.example,http://r2.example,https://r3.example"
    )
    with pytest.raises(SettingsError, match="plain http"):
        Settings.resolve().require_vault()
    for bad in ("r1.example", "https://a, https://a", "zz112233445566778899aabbccddeeff@https://x"):
        with pytest.raises(ValueError):
            parse_realms(bad)
    monkeypatch.setenv("BACKVAULT_VAULT_THRESHOLD", "two")
    with pytest.raises(SettingsError, match="BACKVAULT_VAULT_THRESHOLD must be a number"):
        Settings.resolve()


@pytest.mark.parametrize(("realms", "threshold"), [(3, "1"), (4, "2"), (3, "4"), (1, "1")])
def test_a_threshold_that_is_not_a_majority_is_refused_before_anything_is_written(
    monkeypatch: pytest.MonkeyPatch, realms: int, threshold: str
) -> None:
    urls = [f"https://r{n}.example" for n in range(realms)]
    monkeypatch.setenv("BACKVAULT_VAULT_REALMS", ",".join(urls))
    monkeypatch.setenv("BACKVAULT_VAULT_REALM_TOKENS", ",".join(f"bvt_{n}" for n in range(realms)))
    monkeypatch.setenv("BACKVAULT_ACCOUNT", "ana")
    monkeypatch.setenv("BACKVAULT_VAULT_THRESHOLD", threshold)
    with pytest.raises(SettingsError, match="above half of them and at least 2"):
        Settings.resolve().require_vault()
