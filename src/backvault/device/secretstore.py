"""Small secrets this device keeps for backvault (the device key cache, the vault token).

They go to the OS keyring (Secret Service, macOS Keychain, Windows Credential Locker)
through ``keyring``. Where no keyring backend exists (a headless server, a container) or
``BACKVAULT_KEYRING=file`` asks for it, they go to a file readable only by the user (0600,
in a 0700 folder), and the caller says so.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

SERVICE = "backvault"


def keyring_backend() -> Any | None:
    """The usable keyring backend, or None (no backend, or BACKVAULT_KEYRING=file)."""
    if os.environ.get("BACKVAULT_KEYRING", "").lower() == "file":
        return None
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
    except Exception:
        return None
    if isinstance(backend, fail.Keyring):
        return None
    if type(backend).__name__ == "ChainerBackend" and not getattr(backend, "backends", []):
        return None
    return backend


def keyring_description(backend: Any) -> str:
    return f"the OS keyring ({type(backend).__name__})"


def store(entry: str, value: str, fallback: Path) -> str:
    """Keep ``value`` under ``entry``; returns where it went, for the user."""
    backend = keyring_backend()
    if backend is not None:
        try:
            backend.set_password(SERVICE, entry, value)
            with contextlib.suppress(FileNotFoundError):
                wipe_file(fallback)
            return keyring_description(backend)
        except Exception:  # noqa: S110 - a locked or broken keyring: use the file
            pass
    write_private_file(fallback, value)
    return f"a file readable only by you ({fallback}), as this machine has no OS keyring"


def load(entry: str, fallback: Path) -> tuple[str, str] | None:
    """The value kept under ``entry`` and where it was found, or None."""
    backend = keyring_backend()
    if backend is not None:
        try:
            text = backend.get_password(SERVICE, entry)
        except Exception:
            text = None
        if text:
            return text, keyring_description(backend)
    try:
        return fallback.read_text(), str(fallback)
    except OSError:
        return None


def delete(entry: str, fallback: Path) -> list[str]:
    """Remove ``entry`` everywhere it may be; returns what was removed."""
    removed = []
    backend = keyring_backend()
    if backend is not None:
        try:
            if backend.get_password(SERVICE, entry) is not None:
                backend.delete_password(SERVICE, entry)
                removed.append("OS keyring entry")
        except Exception:  # noqa: S110 - nothing to remove there
            pass
    if fallback.exists():
        wipe_file(fallback)
        removed.append(f"file {fallback}")
    return removed


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to a 0600 file in a 0700 folder, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover could have been made with a wider mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def wipe_file(path: Path) -> None:
    """Overwrite, then unlink: a best effort on filesystems that write in place."""
    with contextlib.suppress(OSError), open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(0)
        handle.write(b"\0" * size)
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
