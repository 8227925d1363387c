"""Vault configuration, on pydantic-settings: defaults, then a TOML file (table ``[vault]``),
then environment variables ``BACKVAULT_SERVER_<NAME>``, then command-line flags — each
overriding the one before, and every value validated on load.

The vault once read ``BACKVAULT_VAULT_<NAME>``, a prefix that collides with the client's
``BACKVAULT_VAULT_URL`` and ``BACKVAULT_VAULT_TOKEN``. Those old names are still read for
the vault's own settings (never URL or TOKEN), each with a one-line deprecation warning on
stderr naming its new variable; a new variable wins over its old one.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url

from backvault.hardening import environment_value

ENV_PREFIX = "BACKVAULT_SERVER_"
LEGACY_ENV_PREFIX = "BACKVAULT_VAULT_"
# The client's variables under the old prefix: never read as the vault's.
CLIENT_ENV_NAMES = frozenset({"URL", "TOKEN"})


class SettingsError(ValueError):
    """A setting is missing or wrong; the message says which and what to do."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "backvault-vault"


def default_config_dir() -> Path:
    """Home of the default sealing key: NOT the data folder, so that a backup of the
    database's folder never holds the key that opens it."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "backvault-vault"


def has_key_files(path: Path) -> bool:
    """Whether any version of the sealing key file ``path`` exists (``path``,
    ``path.v2``, …)."""
    return path.exists() or any(path.parent.glob(f"{path.name}.v[0-9]*"))


class _TomlTable(PydanticBaseSettingsSource):
    """The ``[vault]`` table of a TOML file (or the whole file without one); ``-`` in keys
    reads as ``_``; a key that names no setting is an error."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole table at once

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        with open(self.path, "rb") as handle:
            doc = tomllib.load(handle)
        section = doc.get("vault", doc)
        values: dict[str, Any] = {}
        for key, value in section.items():
            name = key.replace("-", "_")
            if name not in _SETTING_NAMES:
                raise SettingsError(f"{self.path}: unknown setting {key!r}")
            values[name] = value
        return values


class _Environment(PydanticBaseSettingsSource):
    """``BACKVAULT_SERVER_<NAME>``, else the deprecated ``BACKVAULT_VAULT_<NAME>``. Read
    through hardening.environment_value: secrets (the PIN) are withdrawn from os.environ at
    start."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads every setting at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in _SETTING_NAMES:
            suffix = name.upper()
            value = environment_value(ENV_PREFIX + suffix)
            legacy = (
                None
                if suffix in CLIENT_ENV_NAMES
                else environment_value(LEGACY_ENV_PREFIX + suffix)
            )
            if legacy is not None:
                if value is None:
                    value = legacy
                    print(
                        f"backvault: {LEGACY_ENV_PREFIX}{suffix} is deprecated for the vault "
                        f"server; set {ENV_PREFIX}{suffix} instead",
                        file=sys.stderr,
                    )
                else:
                    print(
                        f"backvault: {LEGACY_ENV_PREFIX}{suffix} is deprecated and ignored: "
                        f"{ENV_PREFIX}{suffix} is set",
                        file=sys.stderr,
                    )
            if value is not None:
                values[name] = value
        return values


class VaultSettings(BaseSettings):
    # coerce_numbers_to_str: a TOML number for a text setting (server_identity = 7) reads
    # as text, as it always did.
    model_config = SettingsConfigDict(extra="forbid", coerce_numbers_to_str=True)

    # Where the TOML layer was read from ("" for none): given by the caller, not a setting.
    config_file: str = Field(default="", exclude=True)
    listen: str = "127.0.0.1:8750"
    db: str = ""  # default: sqlite in data_dir
    data_dir: str = Field(default_factory=lambda: str(default_data_dir()))
    sealing: Literal["file", "pkcs11"] = "file"
    sealing_key_file: str = ""  # default: config dir/sealing.key (see sealing_key_path)
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    pkcs11_token_label: str = "backvault"  # noqa: S105 - a label, not a secret
    pkcs11_pin: str = Field(default="", repr=False)
    pkcs11_pin_file: str = ""
    pkcs11_key_label: str = "backvault-sealing"
    # Accept a current HSM key whose CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE or
    # CKA_LOCAL is false (an imported or derived key, or a copy unwrapped by an HSM's
    # cloning procedure).
    pkcs11_accept_cloned_keys: bool = False
    max_attempts: int = 10
    login_ttl: float = 60.0
    registration_ttl: float = 600.0
    guess_cap: int = 30  # attempts not successes per account within guess_cap_days, across records
    guess_cap_days: float = 365.0
    max_pending_registrations: int = 8  # per account
    opaque_context: str = "backvault OPAQUE-3DH ristretto255-SHA512 v1"
    server_identity: str = ""
    jwt_public_key_file: str = ""
    jwt_audience: str = ""  # required with a JWT key: this vault's own public URL or id
    jwt_issuer: str = ""  # required with a JWT key
    jwt_max_lifetime: float = 3600.0  # longest exp - iat accepted, in seconds
    builtin_tokens: bool = True
    rate_per_ip_per_minute: float = 600.0
    rate_per_account_per_minute: float = 120.0
    max_body_bytes: int = 16 * 1024
    tls_cert: str = ""
    tls_key: str = ""
    forwarded_allow_ips: str = ""
    timeout_keep_alive: int = 5
    graceful_shutdown_seconds: int = 10
    limit_concurrency: int = 1000
    log_level: str = "info"
    sweep_every: float = 5.0
    audit_retention_days: float = 400.0  # 0 keeps audit events forever
    truncate_client_addresses: bool = False  # store IPv4 /24 and IPv6 /48 networks only
    metrics: bool = True
    metrics_listen: str = ""  # HOST:PORT: serve /metrics there instead of on `listen`
    metrics_token_file: str = ""  # /metrics on `listen` then needs this bearer token
    # Realm mode (docs/realms.md): serve /realm/v1; a JWT audience must be the realm id.
    realm: bool = False
    # Seconds a realm keeps what phase 3 needs after its last allowed evaluation.
    realm_unlock_window: float = Field(default=60.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (the keyword arguments), then the environment, then the TOML file."""
        path = None
        if isinstance(init_settings, InitSettingsSource):
            path = init_settings.init_kwargs.get("config_file") or None
        return init_settings, _Environment(settings_cls), _TomlTable(settings_cls, path)

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{Path(self.data_dir) / 'vault.db'}"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None for PostgreSQL (or an in-memory database)."""
        url = make_url(self.db_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database)

    @property
    def legacy_sealing_key_path(self) -> Path:
        """Where the key file was by default before it moved out of the data folder."""
        return Path(self.data_dir) / "sealing.key"

    @property
    def sealing_key_path(self) -> Path:
        if self.sealing_key_file:
            return Path(self.sealing_key_file)
        if has_key_files(self.legacy_sealing_key_path):
            return self.legacy_sealing_key_path  # an older deployment: kept, with a warning
        return default_config_dir() / "sealing.key"

    def host_port(self) -> tuple[str, int]:
        return _host_port(self.listen, "listen")

    def metrics_host_port(self) -> tuple[str, int]:
        return _host_port(self.metrics_listen, "metrics_listen")

    def metrics_token(self) -> str:
        if not self.metrics_token_file:
            return ""
        token = Path(self.metrics_token_file).read_text().strip()
        if len(token) < 16:
            raise ValueError(
                f"{self.metrics_token_file}: the metrics token must be at least 16 characters"
            )
        return token

    def pin(self) -> str:
        if self.pkcs11_pin_file:
            return Path(self.pkcs11_pin_file).read_text().strip()
        return self.pkcs11_pin


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90d``, ``12h``, ``30m``, ``45s`` or ``3600``."""
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    if not (number.isascii() and number.isdigit()) or int(number) <= 0:
        raise SettingsError(
            f"{text!r} is not a duration: write a positive whole number with a unit, "
            "e.g. 90d, 12h, 30m or 3600s"
        )
    return float(int(number) * (unit or 1))


def _host_port(value: str, name: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{name} must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


# In declaration order: the environment is read (and warned about) in a stable order.
_SETTING_NAMES = tuple(name for name in VaultSettings.model_fields if name != "config_file")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))


def load_settings(
    config_file: str | None = None, overrides: dict[str, Any] | None = None
) -> VaultSettings:
    """Settings from the defaults, ``config_file`` (TOML), the environment and
    ``overrides`` (flags; None values are not given), validated: a SettingsError (or an
    OSError reading the file) says what is wrong."""
    flags = {name: value for name, value in (overrides or {}).items() if value is not None}
    try:
        return VaultSettings(config_file=config_file or "", **flags)
    except ValidationError as exc:
        raise SettingsError(
            f"{config_file + ': ' if config_file else ''}{_describe(exc)}"
        ) from None
