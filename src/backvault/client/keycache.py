"""The device key cache: what unattended daily backups need to open a repository.

It holds the repository's master key, bound to the repository's location and id, in the
OS keyring (Secret Service, macOS Keychain, Windows Credential Locker) through
``keyring``. Where no keyring backend exists (a headless server, a container), it falls
back to a file readable only by the user (0600, in a 0700 folder under the user's config
folder), and says so. ``forget`` wipes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto.aead import Key
from .paths import config_dir

SERVICE = "backvault"


@dataclass(frozen=True)
class CachedKey:
    repo_id: str
    master_key: Key
    where: str  # "keyring (<backend>)" or "file <path>"


def _entry_name(location: str) -> str:
    return f"repository:{location}"


def _file_for(location: str) -> Path:
    digest = hashlib.sha256(location.encode()).hexdigest()[:24]
    return config_dir() / "device-keys" / f"{digest}.json"


def _keyring_backend() -> Any | None:
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


def _encode(repo_id: str, key: Key) -> str:
    return json.dumps({"repo_id": repo_id, "master_key": key.to_json()})


def _decode(text: str, where: str) -> CachedKey | None:
    try:
        doc = json.loads(text)
        return CachedKey(str(doc["repo_id"]), Key.from_json(doc["master_key"]), where)
    except (ValueError, KeyError, TypeError):
        return None


def remember(location: str, repo_id: str, key: Key) -> str:
    """Store the key for this repository; returns where it went, for the user."""
    backend = _keyring_backend()
    if backend is not None:
        try:
            backend.set_password(SERVICE, _entry_name(location), _encode(repo_id, key))
            with contextlib.suppress(FileNotFoundError):
                _file_for(location).unlink()
            return f"the OS keyring ({type(backend).__name__})"
        except Exception:  # noqa: S110 - a locked or broken keyring: use the file
            pass
    path = _file_for(location)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(_encode(repo_id, key))
    os.replace(tmp, path)
    return f"a file readable only by you ({path}), as this machine has no OS keyring"


def recall(location: str) -> CachedKey | None:
    backend = _keyring_backend()
    if backend is not None:
        try:
            text = backend.get_password(SERVICE, _entry_name(location))
        except Exception:
            text = None
        if text:
            return _decode(text, f"keyring ({type(backend).__name__})")
    path = _file_for(location)
    try:
        return _decode(path.read_text(), f"file {path}")
    except OSError:
        return None


def forget(location: str) -> list[str]:
    """Wipe the cached key for this repository everywhere; returns what was removed."""
    removed = []
    backend = _keyring_backend()
    if backend is not None:
        try:
            if backend.get_password(SERVICE, _entry_name(location)) is not None:
                backend.delete_password(SERVICE, _entry_name(location))
                removed.append("OS keyring entry")
        except Exception:  # noqa: S110 - nothing to remove there
            pass
    path = _file_for(location)
    if path.exists():
        # Overwrite before unlinking: a best effort on filesystems that write in place.
        with contextlib.suppress(OSError), open(path, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(0)
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()
        removed.append(f"key file {path}")
    return removed
