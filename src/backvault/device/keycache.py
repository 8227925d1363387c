"""The device key cache: what unattended daily backups need to open a repository.

One entry per repository location: the repository's master key and its id (a key cached
for a location that now holds another repository is not used). It is kept through
secretstore — the OS keyring, else a 0600 file under ``config folder/device-keys/`` named
by a digest of the location — and ``remember`` says which. ``forget`` wipes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from backvault.crypto.aead import Key
from backvault.device import secretstore
from backvault.device.paths import config_dir


@dataclass(frozen=True)
class CachedKey:
    repo_id: str
    master_key: Key  # its repr shows no key material
    where: str  # "the OS keyring (<backend>)" or the file's path


def _entry_name(location: str) -> str:
    return f"repository:{location}"


def _file_for(location: str) -> Path:
    digest = hashlib.sha256(location.encode()).hexdigest()[:24]
    return config_dir() / "device-keys" / f"{digest}.json"


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
    return secretstore.store(_entry_name(location), _encode(repo_id, key), _file_for(location))


def recall(location: str) -> CachedKey | None:
    """The key cached for this location, or None (none, or unreadable)."""
    found = secretstore.load(_entry_name(location), _file_for(location))
    return _decode(*found) if found is not None else None


def forget(location: str) -> list[str]:
    """Wipe the cached key for this repository everywhere; returns what was removed."""
    return secretstore.delete(_entry_name(location), _file_for(location), "key file")
