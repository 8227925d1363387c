"""Daily unattended backups: a systemd user timer, or a cron line where there is no systemd.

The job runs `backvault backup PATHS` with the device key cache, so it needs no password
and keeps working when the vault is unreachable. The systemd units carry this device's
``BACKVAULT_CONFIG_DIR``, ``BACKVAULT_CACHE_DIR`` and ``BACKVAULT_KEYRING`` where they are
set, so the job finds the same key cache, and are private files (their command line names
the repository, whose URL may hold a password).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from backvault.device.environment import VARIABLES, EnvironmentSettings
from backvault.device.paths import user_config_home
from backvault.hardening import scrubbed_env
from backvault.hardening.private_files import write_private_file

UNIT = "backvault-backup"


@dataclass
class Installed:
    """What ``install`` did, for the user."""

    how: str  # "systemd" or "cron"
    files: list[Path]
    cron_line: str | None
    enabled: bool
    message: str


def _systemd_dir() -> Path:
    return user_config_home() / "systemd" / "user"


def _device_variables() -> dict[str, str]:
    """The variables that say where this device keeps its files and secrets, as set here:
    the job must find the same key cache."""
    environment = EnvironmentSettings.load()
    return {
        VARIABLES[name]: str(getattr(environment, name))
        for name in ("config_dir", "cache_dir", "keyring")
        if name in environment.sources
    }


def backup_command(repository: str, paths: list[str]) -> list[str]:
    """The job's command: this Python, this backvault, absolute paths."""
    return [
        sys.executable,
        "-m",
        "backvault.cli",
        "--quiet",
        "--repo",
        repository,
        "backup",
        *[os.path.abspath(p) for p in paths],
    ]


def _systemctl_user_works() -> bool:
    if shutil.which("systemctl") is None:
        return False
    probe = subprocess.run(
        ["systemctl", "--user", "show-environment"],
        capture_output=True,
        timeout=10,
        env=scrubbed_env(),
    )
    return probe.returncode == 0


def install(
    repository: str, paths: list[str], at: str = "03:00", force_cron: bool = False
) -> Installed:
    """A daily backup of ``paths`` at ``at`` (HH:MM): systemd units where systemctl exists
    (enabled if a user session runs), else the cron line for the user to add."""
    hour, _, minute = at.partition(":")
    if not (hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60):
        raise ValueError(f"--at must be HH:MM, not {at!r}")
    command = backup_command(repository, paths)
    env_lines = [
        f"Environment={name}={shlex.quote(value)}" for name, value in _device_variables().items()
    ]
    if not force_cron and shutil.which("systemctl") is not None:
        directory = _systemd_dir()
        service = directory / f"{UNIT}.service"
        timer = directory / f"{UNIT}.timer"
        # Private: the command line names the repository, whose URL may hold a password.
        write_private_file(
            service,
            "[Unit]\n"
            "Description=backvault daily encrypted backup\n"
            "Wants=network-online.target\nAfter=network-online.target\n\n"
            "[Service]\nType=oneshot\n"
            + "".join(line + "\n" for line in env_lines)
            + f"ExecStart={shlex.join(command)}\n"
            "Nice=10\nIOSchedulingClass=idle\n",
            private_folder=False,
        )
        write_private_file(
            timer,
            "[Unit]\nDescription=backvault daily encrypted backup\n\n"
            f"[Timer]\nOnCalendar=*-*-* {int(hour):02d}:{int(minute):02d}:00\n"
            "Persistent=true\nRandomizedDelaySec=30min\n\n"
            "[Install]\nWantedBy=timers.target\n",
            private_folder=False,
        )
        enabled = False
        message = f"wrote {service} and {timer}"
        if _systemctl_user_works():
            subprocess.run(
                ["systemctl", "--user", "daemon-reload"],
                check=False,
                timeout=30,
                env=scrubbed_env(),
            )
            result = subprocess.run(
                ["systemctl", "--user", "enable", "--now", f"{UNIT}.timer"],
                capture_output=True,
                text=True,
                timeout=30,
                env=scrubbed_env(),
            )
            enabled = result.returncode == 0
            message += (
                "; timer enabled" if enabled else f"; enabling failed: {result.stderr.strip()}"
            )
        else:
            message += (
                "; no systemd user session is running here, enable it later with "
                f"`systemctl --user enable --now {UNIT}.timer`"
            )
        return Installed("systemd", [service, timer], None, enabled, message)
    line = f"{int(minute)} {int(hour)} * * * {shlex.join(command)} >/dev/null 2>&1"
    return Installed(
        "cron",
        [],
        line,
        False,
        "this machine has no systemd; add this line with `crontab -e`:\n" + line,
    )


def remove() -> list[Path]:
    """Disable the timer and delete the units; returns the files removed."""
    directory = _systemd_dir()
    removed = []
    if _systemctl_user_works():
        subprocess.run(
            ["systemctl", "--user", "disable", "--now", f"{UNIT}.timer"],
            capture_output=True,
            timeout=30,
            env=scrubbed_env(),
        )
    for name in (f"{UNIT}.timer", f"{UNIT}.service"):
        path = directory / name
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed
