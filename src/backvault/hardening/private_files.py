"""Files only this user may read: written whole or not at all, and wiped when removed.

Every small private file backvault keeps (the client's settings, the device key cache's
fallback file, the vault token's fallback file, the vault-state file, the SQLite state
cache, the vault's sealing-key files) is written here, one way:

- in a folder only the user may enter (0700, tightened if it was wider), unless the folder
  belongs to another program's layout (systemd's unit folder);
- under a fresh temporary name created with ``O_EXCL | O_NOFOLLOW`` and mode 0600, so a
  leftover or a symlink planted there is never followed or written through, and two writers
  never share a temporary file;
- flushed to disk (``fsync``) before it is renamed over the old file, and the folder
  flushed after, so a crash leaves the old file or the new one, never a torn one;
- renamed with ``os.replace``, which replaces a symlink at the target instead of following
  it (or, with ``exclusive=True``, linked into place so an existing file is never replaced).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def make_private_dir(path: Path) -> str | None:
    """Create ``path`` (and its parents) as 0700, or tighten an existing one; says what
    it changed, for the operator."""
    if not path.exists():
        path.mkdir(parents=True, mode=PRIVATE_DIR_MODE)
        os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & PRIVATE_DIR_MODE)
        return f"{path} was mode {mode:04o}; now {mode & PRIVATE_DIR_MODE:04o}"
    return None


def write_private_file(
    path: Path,
    data: bytes | str | Iterable[bytes],
    *,
    exclusive: bool = False,
    private_folder: bool = True,
    durable: bool = True,
) -> None:
    """Write ``data`` (text is UTF-8; parts, one after another, as they come: if taking
    one raises, nothing is written) to ``path`` as
    a 0600 file in a 0700 folder, atomically and durably. With ``exclusive``, raise FileExistsError rather than replace
    a file already there (a new key must never overwrite another). With ``private_folder``
    False, a folder that is not ours to tighten (systemd's unit folder) is created if
    missing but its mode left alone. With ``durable`` False (a cache, which a crash may
    lose), nothing is flushed to disk: the rename still replaces the old file whole."""
    content = [data.encode()] if isinstance(data, str) else data
    if isinstance(content, bytes):
        content = [content]
    if private_folder:
        make_private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in content:
                handle.write(part)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if exclusive:
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    if durable:
        fsync_dir(path.parent)


def wipe_file(path: Path, *, best_effort: bool = True) -> None:
    """Overwrite with zeros, sync, then unlink (and sync the folder), so that the file's
    blocks do not simply become free space: a best effort on filesystems that write in
    place (copy-on-write filesystems, SSD wear levelling and backups may still keep
    copies). With ``best_effort`` False (a sealing key being destroyed), a file that cannot
    be overwritten is an error, not a plain unlink."""
    try:
        with open(path, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(0)
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        if not best_effort:
            raise
    path.unlink()
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or unlink in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
