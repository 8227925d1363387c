"""A repository's key slots: what each is, adding a recovery key, removing a slot by an
ID prefix (never the last one), and checking a 64-digit key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backvault.app.errors import AmbiguousKeySlot, LastKeySlot, NoSuchKeySlot
from backvault.app.opening import open_with_text
from backvault.crypto import recovery_key
from backvault.crypto.slotlabel import SlotLabel
from backvault.device.settings import VaultSettings
from backvault.repo.ids import AmbiguousPrefix, PrefixNotFound, resolve_prefix
from backvault.repo.repository import KeySlot, Repository
from backvault.storage import open_backend
from backvault.vaultclient.realm_slots import password_slots
from backvault.vaultclient.slots import is_password_slot, is_verified_password_slot

LIST_HINT = "see `backvault key list`"


def slot_kind(slot: KeySlot) -> str:
    """What a slot is, from its sealed label (or an earlier version's clear names)."""
    if slot.label is not None:
        return slot.label.describe()
    return f"restic password ({slot.username}@{slot.hostname})"


def relabel_legacy_keys(repo: Repository) -> dict[str, str]:
    """Commands that write key files also take the clear names (kind, account, vault URL,
    device) out of the key files earlier versions wrote; old id -> new id."""
    return dict(repo.relabel_legacy_keys())


@dataclass(frozen=True)
class AddedRecoveryKey:
    key_id: str
    secret: bytes = field(repr=False)
    renamed: dict[str, str]


def add_recovery_key(repo: Repository) -> AddedRecoveryKey:
    """Another 64-digit key (the data is not re-uploaded)."""
    secret = recovery_key.generate()
    key_id = repo.add_key(recovery_key.canonical(secret).encode(), SlotLabel.recovery())
    return AddedRecoveryKey(key_id, secret, relabel_legacy_keys(repo))


def find_slot(slots: list[KeySlot], prefix: str) -> KeySlot:
    """The one slot whose ID starts with ``prefix`` (at least four digits)."""
    try:
        slot_id = resolve_prefix((s.id for s in slots), prefix, "key slot", LIST_HINT)
    except AmbiguousPrefix as exc:
        raise AmbiguousKeySlot(str(exc)) from None
    except PrefixNotFound as exc:
        raise NoSuchKeySlot(str(exc)) from None
    return next(s for s in slots if s.id == slot_id)


@dataclass(frozen=True)
class RemovedSlot:
    slot: KeySlot
    kind: str
    # A slot an earlier version named a password slot in clear: its vault record was left.
    record_left_alone: bool


def remove_slot(repo: Repository, prefix: str, vault: Callable[[], VaultSettings]) -> RemovedSlot:
    """Remove the slot ``prefix`` names, never the last one. A password slot's vault record
    is erased too (``vault()`` says which vault), unless only clear names call it one."""
    slots = repo.list_keys()
    target = find_slot(slots, prefix)
    if len(slots) == 1:
        raise LastKeySlot(
            "refusing to remove the last key slot: without it nobody could ever open the "
            "repository again; add another key first (`backvault key add`)"
        )
    if is_verified_password_slot(target):
        # The vault record is what makes this slot usable: erase it too.
        password_slots(vault()).delete_record()
    repo.remove_key(target.id)
    left_alone = is_password_slot(target) and not is_verified_password_slot(target)
    return RemovedSlot(target, slot_kind(target), left_alone)


@dataclass(frozen=True)
class KeyCheck:
    repo_id: str
    key_id: str | None
    restic_password: str = field(repr=False)  # the key as 64 lowercase hex digits


def check_key(location: str, text: str) -> KeyCheck:
    """Check that a 64-digit key opens the repository; its canonical form."""
    repo = open_with_text(open_backend(location), text)
    canonical = recovery_key.canonical(recovery_key.parse(text))
    return KeyCheck(repo.config.id, repo.key_id, canonical)
