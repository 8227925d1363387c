"""Where backvault keeps its per-user files."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    explicit = os.environ.get("BACKVAULT_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "backvault"


def cache_dir() -> Path:
    explicit = os.environ.get("BACKVAULT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "backvault"


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
