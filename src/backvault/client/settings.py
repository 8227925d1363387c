"""The user's settings file, ``~/.config/backvault/config.toml``: the repository, the vault's
URL, the account and its token. Flags and environment variables override it.

```toml
repository = "/mnt/nas/chat-backup"

[vault]
url = "https://vault.example"
account = "alice"
token = "bvt_…"          # a bearer credential: the file is kept mode 0600
```
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .paths import config_dir

KEYS = ("repository", "vault.url", "vault.account", "vault.token")
ENV = {
    "repository": "BACKVAULT_REPO",
    "vault.url": "BACKVAULT_VAULT_URL",
    "vault.account": "BACKVAULT_ACCOUNT",
    "vault.token": "BACKVAULT_VAULT_TOKEN",
}


class SettingsError(ValueError):
    pass


def settings_path() -> Path:
    return config_dir() / "config.toml"


def load_file() -> dict[str, Any]:
    path = settings_path()
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from exc


def _get(doc: dict[str, Any], key: str) -> str | None:
    node: Any = doc
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None else str(node)


def set_value(key: str, value: str | None) -> Path:
    """Set (or with None, remove) one setting in the file; returns the file's path."""
    if key not in KEYS:
        raise SettingsError(f"unknown setting {key!r}; known: {', '.join(KEYS)}")
    doc = load_file()
    node = doc
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        tomli_w.dump(doc, handle)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class VaultSettings:
    url: str
    account: str
    token: str


@dataclass(frozen=True)
class Settings:
    repository: str | None
    vault_url: str | None
    vault_account: str | None
    vault_token: str | None
    sources: dict[str, str]  # setting -> where its value came from

    @classmethod
    def resolve(cls, flags: dict[str, str | None] | None = None) -> Settings:
        """Flags beat the environment, which beats the file."""
        doc = load_file()
        values: dict[str, str | None] = {}
        sources: dict[str, str] = {}
        for key in KEYS:
            flag = (flags or {}).get(key)
            env = os.environ.get(ENV[key]) or None
            if flag:
                values[key], sources[key] = flag, "flag"
            elif env:
                values[key], sources[key] = env, f"${ENV[key]}"
            else:
                values[key] = _get(doc, key)
                if values[key] is not None:
                    sources[key] = str(settings_path())
        return cls(
            values["repository"],
            values["vault.url"],
            values["vault.account"],
            values["vault.token"],
            sources,
        )

    @property
    def vault(self) -> VaultSettings | None:
        if self.vault_url and self.vault_account and self.vault_token:
            return VaultSettings(self.vault_url, self.vault_account, self.vault_token)
        return None

    def require_vault(self) -> VaultSettings:
        vault = self.vault
        if vault is None:
            missing = [
                name
                for name, value in (
                    ("vault.url", self.vault_url),
                    ("vault.account", self.vault_account),
                    ("vault.token", self.vault_token),
                )
                if not value
            ]
            raise SettingsError(
                f"no vault configured (missing {', '.join(missing)}): set them with "
                "`backvault config set vault.url URL` (and vault.account, vault.token), "
                "or pass --vault/--account with BACKVAULT_VAULT_TOKEN"
            )
        return vault

    def describe(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "vault.url": self.vault_url,
            "vault.account": self.vault_account,
            "vault.token": (self.vault_token[:8] + "…") if self.vault_token else None,
            "sources": self.sources,
            "file": str(settings_path()),
        }
