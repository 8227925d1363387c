"""The client's settings, one layer: defaults, then ``~/.config/backvault/config.toml``,
then the keyring (the vault token), then ``BACKVAULT_*`` variables, then flags — each
overriding the one before, validated on load, with where each value
came from (``describe()``, shown by `backvault config`).

The file holds the repository, the vault's URL and the account; the account's token, a
bearer credential, is kept in the OS keyring (or a 0600 file where there is none), never
in the settings file. The settings only the environment gives (worker processes, retries,
folders, …) are ``environment.EnvironmentSettings``, which ``Settings`` extends.

```toml
repository = "/mnt/nas/chat-backup"

[vault]
url = "https://vault.example"
account = "alice"
```

Earlier versions kept ``token = "bvt_…"`` under ``[vault]``: it is still read, and moved to
the keyring by the next ``backvault config set vault.token``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from backvault.device import secretstore
from backvault.device.environment import EnvironmentSettings, Layer, variables_layer
from backvault.device.environment import SettingsError as SettingsError
from backvault.device.paths import config_dir
from backvault.hardening.private_files import write_private_file

# The settings the file holds (and `config set` sets), with their variables.
KEYS = (
    "repository",
    "vault.url",
    "vault.account",
    "vault.token",
    "vault.realms",
    "vault.threshold",
)
ENV = {
    "repository": "BACKVAULT_REPO",
    "vault.url": "BACKVAULT_VAULT_URL",
    "vault.account": "BACKVAULT_ACCOUNT",
    "vault.token": "BACKVAULT_VAULT_TOKEN",
    "vault.realms": "BACKVAULT_VAULT_REALMS",
    "vault.threshold": "BACKVAULT_VAULT_THRESHOLD",
    # One token per realm, in the order of vault.realms, separated by commas (scripts, CI);
    # otherwise each realm's token is in the keyring (`config set vault.token --realm URL`).
    "vault.realm_tokens": "BACKVAULT_VAULT_REALM_TOKENS",
}
REALMS = "vault.realms"
THRESHOLD = "vault.threshold"
REALM_TOKENS = "vault.realm_tokens"


TOKEN = "vault.token"  # noqa: S105 - the setting's name
TOKEN_ENTRY = "vault-token"  # noqa: S105 - its name in the OS keyring
HIDDEN = "<hidden>"


class InsecureVaultUrl(SettingsError):
    """A vault URL over which the token and the login would cross the network in clear."""


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
    if isinstance(node, list):
        return ",".join(str(item) for item in node)
    return None if node is None else str(node)


def set_value(key: str, value: str | None) -> Path:
    """Set (or with None, remove) one setting in the file; returns the file's path. The
    token goes to ``store_token`` instead; None removes one an earlier version wrote."""
    if key not in KEYS:
        raise SettingsError(f"unknown setting {key!r}; known: {', '.join(KEYS)}")
    if key == TOKEN and value is not None:
        raise SettingsError("the vault token is kept in the OS keyring, not the settings file")
    doc = load_file()
    node = doc
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(parts[-1], None)
    elif key in (REALMS, THRESHOLD):
        try:
            parsed = parse_realms(value) if key == REALMS else parse_threshold(value)
        except ValueError as exc:
            raise SettingsError(f"{key} {exc}") from None
        node[parts[-1]] = [pin.entry for pin in parsed] if isinstance(parsed, tuple) else parsed
    else:
        node[parts[-1]] = value
    path = settings_path()
    write_private_file(path, tomli_w.dumps(doc))
    return path


def _token_file() -> Path:
    return config_dir() / "vault-token"


def _stored_token() -> tuple[str, str] | None:
    found = secretstore.load(TOKEN_ENTRY, _token_file())
    if found is None or not found[0].strip():
        return None
    return found[0].strip(), found[1]


def store_token(token: str) -> str:
    """Keep the account token in the OS keyring (or a 0600 file), and drop any copy an
    earlier version left in the settings file; returns where it went."""
    where = secretstore.store(TOKEN_ENTRY, token, _token_file())
    if _get(load_file(), TOKEN) is not None:
        set_value(TOKEN, None)
    return where


def forget_token() -> list[str]:
    """Remove the stored token wherever it is; returns what was removed."""
    removed = secretstore.delete(TOKEN_ENTRY, _token_file())
    if _get(load_file(), TOKEN) is not None:
        removed.append(f"{TOKEN} in {set_value(TOKEN, None)}")
    return removed


def _realm_token_entry(url: str) -> str:
    return f"{TOKEN_ENTRY}@{url}"


def _realm_token_file(url: str) -> Path:
    # The URL names the file through a digest: it may hold characters no file name can.
    return config_dir() / "realm-tokens" / hashlib.sha256(url.encode()).hexdigest()[:32]


def store_realm_token(url: str, token: str) -> str:
    """Keep the account's token for the realm at ``url`` (each realm issues its own)."""
    return secretstore.store(_realm_token_entry(url), token, _realm_token_file(url))


def stored_realm_token(url: str) -> tuple[str, str] | None:
    found = secretstore.load(_realm_token_entry(url), _realm_token_file(url))
    if found is None or not found[0].strip():
        return None
    return found[0].strip(), found[1]


def forget_realm_token(url: str) -> list[str]:
    return secretstore.delete(_realm_token_entry(url), _realm_token_file(url))


@dataclass(frozen=True)
class RealmPin:
    """One realm as the settings name it: its URL, and its realm id once pinned."""

    url: str
    realm_id: bytes | None = None

    @property
    def entry(self) -> str:
        """How the settings file writes it: ``ID@URL`` (ID in hex) or ``URL``."""
        return f"{self.realm_id.hex()}@{self.url}" if self.realm_id else self.url


def parse_realms(text: str) -> tuple[RealmPin, ...]:
    """``vault.realms``: entries ``URL`` or ``ID@URL`` (ID: 32 hex digits), separated by
    commas or spaces."""
    pins = []
    for entry in text.replace(",", " ").split():
        realm_id: bytes | None = None
        url = entry
        head, at, tail = entry.partition("@")
        if at and len(head) == 32 and "/" not in head:
            try:
                realm_id = bytes.fromhex(head)
            except ValueError:
                raise ValueError(
                    f"{head!r} in {entry!r} is not a realm id (32 hex digits)"
                ) from None
            url = tail
        if not url.lower().startswith(("https://", "http://")):
            raise ValueError(f"{entry!r} is not a realm: give its URL (https://…), or ID@URL")
        pins.append(RealmPin(url.rstrip("/"), realm_id))
    if len({pin.url for pin in pins}) != len(pins):
        raise ValueError("lists a realm twice")
    return tuple(pins)


def parse_threshold(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be a number of realms, not {text!r}") from None


def parse_tokens(text: str) -> tuple[str, ...]:
    return tuple(token.strip() for token in text.split(","))


@dataclass(frozen=True)
class RealmAccess:
    """A realm as the client talks to it: URL, pinned id (None until the first
    registration pins it) and this account's token there."""

    url: str
    realm_id: bytes | None
    token: str = field(repr=False)


def check_vault_url(url: str, allow_plain_http: bool) -> None:
    """Refuse a vault URL that would send the token and the login in clear over a
    network: https://, or http:// to this machine (loopback), unless asked for."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme == "https" and host:
        return
    if scheme == "http" and host:
        if allow_plain_http or _is_loopback(host):
            return
        raise InsecureVaultUrl(
            f"the vault URL {url} is plain http, so the account token and the login would "
            "cross the network unencrypted: use https://, or pass --insecure-vault if you "
            "accept that (plain http needs no flag only on loopback)"
        )
    raise InsecureVaultUrl(
        f"the vault URL {url!r} must start with https:// (or http:// on this machine); "
        "set it with `backvault config set vault.url https://…`"
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class VaultSettings:
    """Where the password is checked: one vault (``url`` and ``token``), or — when
    ``realms`` is set — t of n realms (docs/realms.md), each with its own token."""

    url: str
    account: str
    token: str
    allow_plain_http: bool = False  # --insecure-vault
    realms: tuple[RealmAccess, ...] = ()
    threshold: int | None = None  # for new registrations; None: a majority of the realms
    # With realms: the single vault also configured (vault.url and its token), whose record
    # is deleted once the realms hold the password (moving from one vault to realms).
    single_vault: VaultSettings | None = None

    @property
    def uses_realms(self) -> bool:
        return bool(self.realms)

    @property
    def where(self) -> str:
        """The vault or the realms, for messages."""
        if not self.realms:
            return f"the vault at {self.url}"
        hosts = ", ".join(urlsplit(realm.url).netloc for realm in self.realms)
        return f"the realms {hosts}"

    def __repr__(self) -> str:
        return (
            f"VaultSettings(url={self.url!r}, account={self.account!r}, token={HIDDEN}, "
            f"allow_plain_http={self.allow_plain_http}, "
            f"realms={[realm.url for realm in self.realms]}, threshold={self.threshold})"
        )


def file_layer() -> Layer:
    """The settings file's values (``KEYS`` only), as text."""
    doc = load_file()
    found = {key: _get(doc, key) for key in KEYS}
    where = str(settings_path())
    return Layer({k: v for k, v in found.items() if v is not None}, lambda _: where)


def stored_token_layer() -> Layer:
    """The vault token in the OS keyring (or its 0600 file)."""
    stored = _stored_token()
    if stored is None:
        return Layer({}, str)
    token, where = stored
    return Layer({TOKEN: token}, lambda _: where)


@dataclass(frozen=True, kw_only=True)
class Settings(EnvironmentSettings):
    """The client's settings, validated: flags beat the environment, which beats the
    keyring (the token), which beats the settings file, which beats the defaults.
    ``sources`` says where each value came from. Build it with ``resolve``."""

    repository: str | None = None
    vault_url: str | None = None
    vault_account: str | None = None
    vault_token: str | None = field(default=None, repr=False)
    vault_realms: tuple[RealmPin, ...] = ()
    vault_threshold: int | None = None
    # Per realm, in the order of vault_realms: from BACKVAULT_VAULT_REALM_TOKENS, else the
    # keyring (None where no token is kept).
    vault_realm_tokens: tuple[str | None, ...] = field(default=(), repr=False)
    allow_plain_http: bool = False  # --insecure-vault

    @classmethod
    def variables(cls) -> dict[str, str]:
        return {**ENV, **super().variables()}

    @classmethod
    def parsers(cls) -> dict[str, Callable[[str], Any]]:
        return {
            **super().parsers(),
            REALMS: parse_realms,
            THRESHOLD: parse_threshold,
            REALM_TOKENS: parse_tokens,
        }

    @classmethod
    def resolve(
        cls, flags: dict[str, str | None] | None = None, allow_plain_http: bool = False
    ) -> Settings:
        """The settings, with ``flags`` (setting name -> value, None or empty if not
        given) over everything else."""
        given = Layer(
            {name: value for name, value in (flags or {}).items() if value}, lambda _: "flag"
        )
        variables = variables_layer(cls.variables())
        layers = [given, variables]
        if TOKEN not in given.values and TOKEN not in variables.values:
            layers.append(stored_token_layer())  # the keyring is asked only when needed
        layers.append(file_layer())
        settings = cls.layered(layers, allow_plain_http=allow_plain_http)
        if settings.vault_realms and not settings.vault_realm_tokens:
            stored = [stored_realm_token(pin.url) for pin in settings.vault_realms]
            settings = dataclasses.replace(
                settings, vault_realm_tokens=tuple(s[0] if s else None for s in stored)
            )
        return settings

    @property
    def vault(self) -> VaultSettings | None:
        if self.vault_realms:
            tokens = self.vault_realm_tokens
            if not self.vault_account or len(tokens) != len(self.vault_realms) or not all(tokens):
                return None
            realms = tuple(
                RealmAccess(pin.url, pin.realm_id, str(token))
                for pin, token in zip(self.vault_realms, tokens, strict=True)
            )
            single = None
            if self.vault_url and self.vault_token:
                single = VaultSettings(
                    self.vault_url, self.vault_account, self.vault_token, self.allow_plain_http
                )
            return VaultSettings(
                "",
                self.vault_account,
                "",
                self.allow_plain_http,
                realms=realms,
                threshold=self.vault_threshold,
                single_vault=single,
            )
        if self.vault_url and self.vault_account and self.vault_token:
            return VaultSettings(
                self.vault_url, self.vault_account, self.vault_token, self.allow_plain_http
            )
        return None

    def require_vault(self) -> VaultSettings:
        """The vault settings, complete and safe to use (SettingsError otherwise)."""
        vault = self.vault
        if vault is not None:
            for url in [realm.url for realm in vault.realms] or [vault.url]:
                check_vault_url(url, vault.allow_plain_http)
            n, t = len(vault.realms), vault.threshold
            # The protocol refuses these too (realms.descriptor.check_threshold); said here
            # first, before a command writes anything.
            if vault.realms and (n < 2 or (t is not None and (t < 2 or t > n or 2 * t <= n))):
                raise SettingsError(
                    f"vault.threshold {t} with {n} realms: use 2 or more realms, and a "
                    f"threshold above half of them and at least 2 (for {n}: "
                    f"{max(2, n // 2 + 1)} to {n})"
                )
            return vault
        if self.vault_realms:
            raise SettingsError(self._missing_for_realms())
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

    def _missing_for_realms(self) -> str:
        if not self.vault_account:
            return (
                "no account for the realms: set it with `backvault config set vault.account NAME`"
            )
        tokens = self.vault_realm_tokens
        if self.sources.get(REALM_TOKENS) and len(tokens) != len(self.vault_realms):
            return (
                f"BACKVAULT_VAULT_REALM_TOKENS has {len(tokens)} tokens for "
                f"{len(self.vault_realms)} realms: give one per realm, in the order of vault.realms"
            )
        without = [
            pin.url for pin, token in zip(self.vault_realms, tokens, strict=False) if not token
        ] + [pin.url for pin in self.vault_realms[len(tokens) :]]
        return (
            f"no token for the realm{'s' if len(without) > 1 else ''} {', '.join(without)}: "
            "set each with `backvault config set vault.token --realm URL`"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "vault.url": self.vault_url,
            "vault.account": self.vault_account,
            "vault.token": HIDDEN if self.vault_token else None,
            "vault.realms": [pin.entry for pin in self.vault_realms] or None,
            "vault.threshold": self.vault_threshold,
            "sources": {key: self.sources[key] for key in KEYS if key in self.sources},
            "file": str(settings_path()),
        }
