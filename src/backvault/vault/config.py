"""Vault configuration: defaults, then a TOML file, then BACKVAULT_VAULT_* environment
variables, then command-line flags — each overriding the one before."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..hardening import environment_value


class SettingsError(ValueError):
    """A setting is missing or wrong; the message says which and what to do."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "backvault-vault"


@dataclass
class VaultSettings:
    listen: str = "127.0.0.1:8750"
    db: str = ""  # default: sqlite in data_dir
    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    sealing: str = "file"  # "file" or "pkcs11"
    sealing_key_file: str = ""  # default: data_dir/sealing.key
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    pkcs11_token_label: str = "backvault"  # noqa: S105 - a label, not a secret
    pkcs11_pin: str = ""
    pkcs11_pin_file: str = ""
    pkcs11_key_label: str = "backvault-sealing"
    max_attempts: int = 10
    login_ttl: float = 60.0
    registration_ttl: float = 600.0
    guess_cap: int = 30  # wrong guesses per record within guess_cap_days, across successes
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

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{Path(self.data_dir) / 'vault.db'}"

    @property
    def sealing_key_path(self) -> Path:
        return Path(self.sealing_key_file or Path(self.data_dir) / "sealing.key")

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--listen must be HOST:PORT, not {self.listen!r}")
        return host.strip("[]"), int(port)

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


def _coerce(kind: Any, value: Any) -> Any:
    if kind in (bool, "bool"):
        if isinstance(value, bool):
            return value
        return str(value).lower() in ("1", "true", "yes", "on")
    if kind in (int, "int"):
        return int(value)
    if kind in (float, "float"):
        return float(value)
    return str(value)


def load_settings(
    config_file: str | None = None, overrides: dict[str, Any] | None = None
) -> VaultSettings:
    settings = VaultSettings()
    known = {f.name: f.type for f in fields(VaultSettings)}
    values: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as handle:
            doc = tomllib.load(handle)
        section = doc.get("vault", doc)
        for key, value in section.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
            values[name] = value
    for name in known:
        env = environment_value(f"BACKVAULT_VAULT_{name.upper()}")  # the PIN is withdrawn
        if env is not None:
            values[name] = env
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    for name, value in values.items():
        setattr(settings, name, _coerce(known[name], value))
    return settings
