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

This is pydantic-settings with sources of its own rather than its stock ones: the variable
names predate this module and do not follow one prefix-plus-field rule (``BACKVAULT_REPO``
sets ``repository``), and ``describe()`` must say where each value came from, which each
source here records under ``sources``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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


class Variables(PydanticBaseSettingsSource):
    """The ``BACKVAULT_*`` variables that are set and not empty."""

    def __init__(self, settings_cls: type[BaseSettings], variables: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.variables = variables

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every variable itself

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, variable in self.variables.items():
            value = environment_value(variable)
            if value:
                values[field_of(name)] = value
                sources[name] = f"${variable}"
        return {**values, "sources": sources} if values else {}


class EnvironmentSettings(BaseSettings):
    """This process's tuning and this device's folders, from the environment only."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    worker_processes: int | None = None  # None: one per core, none on a single core
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    rclone: str = "rclone"
    keyring: str = ""
    config_dir: Path | None = None
    cache_dir: Path | None = None
    # Setting name -> where its value came from ("$BACKVAULT_…", "flag", a file, …).
    sources: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, Variables(settings_cls, cls.variables())

    @classmethod
    def load(cls, **given: Any) -> Self:
        """The settings, validated: ``given`` (flags) beat the sources; SettingsError
        names the variable of a value that is wrong."""
        try:
            return cls(**given)
        except ValidationError as exc:
            raise SettingsError(explain(exc, cls.variables())) from None

    @classmethod
    def variables(cls) -> dict[str, str]:
        return VARIABLES

    @property
    def uses_keyring(self) -> bool:
        """Whether secrets may go to the OS keyring (not with BACKVAULT_KEYRING=file)."""
        return self.keyring.lower() != "file"

    @field_validator("worker_processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> int | None:
        text = str(value).strip().lower() if value is not None else "auto"
        if text in ("", "auto"):
            return None
        try:
            return max(0, int(text))
        except ValueError:
            raise ValueError(
                f"must be a number of worker processes (0: threads only) or auto, not {value!r}"
            ) from None

    @field_validator("retry_attempts", mode="before")
    @classmethod
    def _attempts(cls, value: Any) -> int:
        try:
            return max(1, int(value))
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number of attempts, not {value!r}") from None


def explain(exc: ValidationError, variables: Mapping[str, str]) -> str:
    """A user's message for invalid settings: which variable, what is wrong."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name = next((n for n in variables if field_of(n) == field), field)
        cause = error.get("ctx", {}).get("error")
        problems.append(f"{variables.get(name, name)} {cause if cause else error['msg']}")
    return "; ".join(problems)
