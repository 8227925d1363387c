"""What this device remembers about its vault records, per vault URL and account:

- the fingerprint of the record it registered, so that `password check` can tell, before
  spending an attempt, whether the vault still holds that record (a holder of the account
  token can replace it);
- the login ids of its wrong tries since its last success, which a later success presents
  so the vault forgives them (and only them: other people's guesses stay counted).

Login ids prove to the vault which attempts were ours; they open nothing. The file is
still private to the user (0600 in a 0700 folder), like the rest of the settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from backvault.device.paths import config_dir
from backvault.hardening.private_files import write_private_file

# A recovery rarely takes more than the vault's limit; keep a margin, not a history.
MAX_REMEMBERED_ATTEMPTS = 256


def state_path() -> Path:
    return config_dir() / "vault-state.json"


def _entry(url: str, account: str) -> str:
    return f"{url.rstrip('/')} {account}"


def _load() -> dict[str, Any]:
    try:
        doc = json.loads(state_path().read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _save(doc: dict[str, Any]) -> None:
    write_private_file(state_path(), json.dumps(doc, indent=1))


def _section(doc: dict[str, Any], url: str, account: str) -> dict[str, Any]:
    """This vault account's part of the file; a part that is not what this module writes
    (edited by hand, damaged) starts again empty rather than stopping a login."""
    if not isinstance(doc.get("vaults"), dict):
        doc["vaults"] = {}
    entries = doc["vaults"]
    if not isinstance(entries.get(_entry(url, account)), dict):
        entries[_entry(url, account)] = {}
    section: dict[str, Any] = entries[_entry(url, account)]
    return section


def remember_registration(url: str, account: str, fingerprint: str) -> None:
    """A new record: its fingerprint, and no wrong tries yet."""
    doc = _load()
    section = _section(doc, url, account)
    section["fingerprint"] = fingerprint
    section["registered_at"] = time.time()
    section["attempts"] = []
    _save(doc)


def registered_fingerprint(url: str, account: str) -> str | None:
    value = _section(_load(), url, account).get("fingerprint")
    return value if isinstance(value, str) else None


def forget_registration(url: str, account: str) -> None:
    doc = _load()
    vaults = doc.get("vaults")
    if isinstance(vaults, dict):
        vaults.pop(_entry(url, account), None)
    _save(doc)


def earlier_attempts(url: str, account: str) -> list[str]:
    value = _section(_load(), url, account).get("attempts", [])
    return [str(v) for v in value] if isinstance(value, list) else []


def add_attempt(url: str, account: str, login_id: str) -> None:
    """Keep a login id the moment the vault has counted it (before KE3 is even made)."""
    doc = _load()
    section = _section(doc, url, account)
    ids = [str(v) for v in section.get("attempts", []) if isinstance(v, str)]
    ids.append(login_id)
    section["attempts"] = ids[-MAX_REMEMBERED_ATTEMPTS:]
    _save(doc)


def clear_attempts(url: str, account: str) -> None:
    doc = _load()
    _section(doc, url, account)["attempts"] = []
    _save(doc)


# --- threshold realms (docs/realms.md) ---------------------------------------------------
# The realm id each realm URL had when this device first registered there (trust on first
# use, as SSH's known_hosts): a realm at that URL with another id is refused afterwards.
# Settings may pin instead (``ID@URL`` in vault.realms); this is for realms given by URL.


def realm_pins() -> dict[str, bytes]:
    pins = _load().get("realm_pins")
    if not isinstance(pins, dict):
        return {}
    found = {}
    for url, value in pins.items():
        try:
            found[str(url)] = bytes.fromhex(str(value))
        except ValueError:
            continue  # damaged by hand: that realm is pinned again at the next registration
    return found


def pin_realms(pins: dict[str, bytes]) -> None:
    if not pins:
        return
    doc = _load()
    known = doc.get("realm_pins")
    if not isinstance(known, dict):
        known = doc["realm_pins"] = {}
    for url, realm_id in pins.items():
        known[url.rstrip("/")] = realm_id.hex()
    _save(doc)


# Degraded realm registrations: the payloads of the realms that missed one, sealed under
# the repository's master key by the caller (this module never sees them in clear), kept
# per repository until they are delivered.


def pending_deliveries(repo_id: str) -> list[str]:
    value = _load().get("realm_pending", {})
    items = value.get(repo_id, []) if isinstance(value, dict) else []
    return [str(item) for item in items] if isinstance(items, list) else []


def set_pending_deliveries(repo_id: str, sealed: list[str]) -> None:
    doc = _load()
    pending = doc.get("realm_pending")
    if not isinstance(pending, dict):
        pending = doc["realm_pending"] = {}
    if sealed:
        pending[repo_id] = sealed
    else:
        pending.pop(repo_id, None)
    _save(doc)
