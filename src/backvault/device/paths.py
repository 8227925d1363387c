"""Where backvault keeps its per-user files: the config folder (settings, the fallback
files of the key cache and the vault token, the vault state) and the cache folder (what a
run can rebuild: the SQLite state cache, temporary copies).

The XDG folders, through platformdirs: ``$XDG_CONFIG_HOME/backvault`` (else
``~/.config/backvault``) and ``$XDG_CACHE_HOME/backvault`` (else ``~/.cache/backvault``),
unless ``BACKVAULT_CONFIG_DIR`` / ``BACKVAULT_CACHE_DIR`` name others. The XDG layout
holds on every system, macOS included, because that is where earlier versions kept these
files (platformdirs' native macOS folders would lose them); systemd reads user units
from the XDG config folder too (``user_config_home``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from platformdirs.unix import Unix

from backvault.device.environment import EnvironmentSettings

APP_NAME = "backvault"


def _configured(name: str) -> Path | None:
    """BACKVAULT_CONFIG_DIR or BACKVAULT_CACHE_DIR, through the settings."""
    folder: Path | None = getattr(EnvironmentSettings.load(), name)
    return folder


def user_config_home() -> Path:
    """``$XDG_CONFIG_HOME``, else ``~/.config``: the folder every program's settings are in."""
    return Path(Unix().user_config_dir)


def config_dir() -> Path:
    return _configured("config_dir") or Path(Unix(APP_NAME).user_config_dir)


def cache_dir() -> Path:
    return _configured("cache_dir") or Path(Unix(APP_NAME).user_cache_dir)


def repository_cache_dir(repository_id: str) -> Path | None:
    """This device's cache folder for one repository (its SQLite state, its index cache);
    None for an id that is not 64 hex digits, as every repository's is: the id comes from
    the repository's config, which whoever holds the master key may write, and must never
    name a folder elsewhere (``/home/me/.ssh``, ``../..``)."""
    if not _REPOSITORY_ID.fullmatch(repository_id):
        return None
    return cache_dir() / repository_id


_REPOSITORY_ID = re.compile(r"[0-9a-f]{64}")


def private_temp_dir() -> Path:
    """Where temporary copies go (the consistent copy of a chat database): a folder only
    this user may enter, under their cache folder, never the world-readable /tmp."""
    path = cache_dir() / "tmp"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to another user; remove it or set BACKVAULT_CACHE_DIR to a "
            "folder of your own"
        )
    os.chmod(path, 0o700)
    return path
