"""Small secrets this device keeps for backvault (the device key cache, the vault token).

They go to the OS keyring (Secret Service, macOS Keychain, Windows Credential Locker)
through ``keyring``. Where no keyring backend exists (a headless server, a container), where
it is locked or broken, or where ``BACKVAULT_KEYRING=file`` asks for it, they go to a file
readable only by the user (hardening.private_files: 0600, in a 0700 folder), and the caller
tells the user which. Each secret has one entry name in the keyring and one fallback file,
both chosen by the caller; a secret stored in one place is wiped from the other.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from backvault.device.environment import EnvironmentSettings
from backvault.hardening.private_files import wipe_file, write_private_file

SERVICE = "backvault"


def keyring_backend() -> Any | None:
    """The usable keyring backend, or None (no backend, or BACKVAULT_KEYRING=file)."""
    if not EnvironmentSettings.load().uses_keyring:
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


def _keyring_description(backend: Any) -> str:
    return f"the OS keyring ({type(backend).__name__})"


def store(entry: str, value: str, fallback: Path) -> str:
    """Keep ``value`` under ``entry``; returns where it went, for the user."""
    backend = keyring_backend()
    if backend is not None:
        try:
            backend.set_password(SERVICE, entry, value)
            with contextlib.suppress(FileNotFoundError):
                wipe_file(fallback)
            return _keyring_description(backend)
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
            return text, _keyring_description(backend)
    try:
        return fallback.read_text(), str(fallback)
    except OSError:
        return None


def delete(entry: str, fallback: Path, file_label: str = "file") -> list[str]:
    """Remove ``entry`` everywhere it may be; returns what was removed, for the user
    ("OS keyring entry", "<file_label> <path>")."""
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
        removed.append(f"{file_label} {fallback}")
    return removed
