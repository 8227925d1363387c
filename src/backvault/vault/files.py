"""Private files of the vault (sealing keys, the SQLite database): folders 0700, files 0600
from the moment they exist, written atomically, overwritten before they are removed."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def make_private_dir(path: Path) -> str | None:
    """Create ``path`` as 0700, or tighten an existing one; says what it changed."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        return f"{path} was mode {mode:04o}; now {mode & 0o700:04o}"
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, mode 0600 from its creation. Written under a
    temporary name, synced, then linked into place: a reader never sees it half-written,
    and an existing ``path`` is never replaced (FileExistsError) — two writers cannot
    overwrite each other's file."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_dir(path.parent)


def overwrite_and_remove(path: Path, size: int) -> None:
    """Overwrite the first ``size`` bytes of ``path`` with zeros, sync, then remove it, so
    that its blocks do not simply become free space. (Copy-on-write filesystems, SSD wear
    levelling and backups may still keep copies: see the operator guide.)"""
    with open(path, "r+b") as handle:
        handle.write(bytes(size))
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
    fsync_dir(path.parent)
