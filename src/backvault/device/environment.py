"""The settings only the environment gives: how this process is tuned, and where this
device keeps its files. With ``settings`` (which adds ``BACKVAULT_REPO``,
``BACKVAULT_VAULT_URL``, ``BACKVAULT_ACCOUNT``, ``BACKVAULT_VAULT_TOKEN``), the one place
the client reads its setting variables. (The secrets a command is given, ``BACKVAULT_KEY``
and ``BACKVAULT_PASSWORD``, are inputs, not settings: read where used, through hardening.)

=============================  ===================  ====================================
variable                       setting              meaning
=============================  ===================  ====================================
BACKVAULT_WORKER_PROCESSES     worker_processes     N worker processes for heavy work,
                                                    0 for threads only; unset or
                                                    ``auto``: one per core (none on one)
BACKVAULT_RETRY_ATTEMPTS       retry_attempts       how often a transient storage
                                                    failure is tried (default 8, at
                                                    least 1)
BACKVAULT_RCLONE               rclone               the rclone program (default
                                                    ``rclone`` on PATH)
BACKVAULT_KEYRING              keyring              ``file``: keep secrets in 0600 files
                                                    even where an OS keyring exists
BACKVAULT_CONFIG_DIR           config_dir           instead of $XDG_CONFIG_HOME/backvault
                                                    (~/.config/backvault)
BACKVAULT_CACHE_DIR            cache_dir            instead of $XDG_CACHE_HOME/backvault
                                                    (~/.cache/backvault)
=============================  ===================  ====================================

None of them can be set in the settings file: ``BACKVAULT_CONFIG_DIR`` says where that
file is, and the others tune a machine or a run, as they always have. The client's
settings (``settings.Settings``) extend this class with what the file may hold too. The
lower layers never read these variables: they take the values as arguments
(``storage.configure``, ``engine.parallel.configure``).

``BACKVAULT_FAULT_KILL_AFTER_WRITES`` is not a setting but a test hook (storage/faults.py).
Secrets (``BACKVAULT_VAULT_TOKEN``, …) are read through ``hardening.environment_value``,
which still finds them once they are withdrawn from ``os.environ``.

The layering is written out here (``layered``) rather than taken from pydantic-settings,
which the vault uses: the variable names predate this module and follow no
prefix-plus-field rule (``BACKVAULT_REPO`` sets ``repository``), ``describe()`` must say
where each value came from, and every command loads these settings before it does
anything, where importing pydantic-settings alone costs ~0.1 s (a third of a backup that
finds nothing changed; docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from backvault.hardening import environment_value

# Setting name -> its variable. A setting's attribute is its name with "_" for ".".
VARIABLES = {
    "worker_processes": "BACKVAULT_WORKER_PROCESSES",
    "retry_attempts": "BACKVAULT_RETRY_ATTEMPTS",
    "rclone": "BACKVAULT_RCLONE",
    "keyring": "BACKVAULT_KEYRING",
    "config_dir": "BACKVAULT_CONFIG_DIR",
    "cache_dir": "BACKVAULT_CACHE_DIR",
}
DEFAULT_RETRY_ATTEMPTS = 8


class SettingsError(ValueError):
    """A setting is wrong or missing; the message says which and what to do."""


def field_of(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class Layer:
    """One source of settings: setting name -> its text, and where it came from."""

    values: dict[str, str]
    source: Callable[[str], str]  # setting name -> "$BACKVAULT_…", "flag", a file, …


def variables_layer(variables: Mapping[str, str]) -> Layer:
    """The ``BACKVAULT_*`` variables that are set and not empty."""
    values = {}
    for name, variable in variables.items():
        value = environment_value(variable)
        if value:
            values[name] = value
    return Layer(values, lambda name: f"${variables[name]}")


def parse_worker_processes(text: str) -> int | None:
    value = text.strip().lower()
    if value in ("", "auto"):
        return None  # one per core, none on a single core
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(
            f"must be a number of worker processes (0: threads only) or auto, not {text!r}"
        ) from None


def parse_retry_attempts(text: str) -> int:
    try:
        return max(1, int(text))
    except ValueError:
        raise ValueError(f"must be a whole number of attempts, not {text!r}") from None


@dataclass(frozen=True, kw_only=True)
class EnvironmentSettings:
    """This process's tuning and this device's folders, from the environment only."""

    worker_processes: int | None = None  # None: one per core, none on a single core
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    rclone: str = "rclone"
    keyring: str = ""
    config_dir: Path | None = None
    cache_dir: Path | None = None
    # Setting name -> where its value came from ("$BACKVAULT_…", "flag", a file, …).
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls) -> Self:
        """The settings, validated; SettingsError names the variable of a wrong value."""
        return cls.layered([variables_layer(cls.variables())])

    @classmethod
    def variables(cls) -> dict[str, str]:
        return VARIABLES

    @classmethod
    def parsers(cls) -> dict[str, Callable[[str], Any]]:
        """Setting name -> how its text becomes its value (ValueError says what is
        wrong); a setting not named here is text."""
        return {
            "worker_processes": parse_worker_processes,
            "retry_attempts": parse_retry_attempts,
            "config_dir": Path,
            "cache_dir": Path,
        }

    @classmethod
    def layered(cls, layers: Iterable[Layer], **fixed: Any) -> Self:
        """The settings from ``layers``, the first that gives a setting winning; every
        wrong value is named in one SettingsError. ``fixed`` are values no layer gives."""
        known = {f.name for f in dataclasses.fields(cls)} - {"sources"}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        problems = []
        parsers = cls.parsers()
        variables = cls.variables()
        for layer in layers:
            for name, text in layer.values.items():
                attribute = field_of(name)
                if attribute not in known:
                    raise TypeError(f"{cls.__name__} has no setting {name!r}")
                if name in sources:
                    continue
                sources[name] = layer.source(name)
                try:
                    values[attribute] = parsers.get(name, str)(text)
                except ValueError as exc:
                    problems.append(f"{variables.get(name, name)} {exc}")
        if problems:
            raise SettingsError("; ".join(problems))
        return cls(**values, **fixed, sources=sources)

    @property
    def uses_keyring(self) -> bool:
        """Whether secrets may go to the OS keyring (not with BACKVAULT_KEYRING=file)."""
        return self.keyring.lower() != "file"
