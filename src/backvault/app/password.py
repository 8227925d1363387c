"""The password the vault keeps: turning it on (or changing it — the same path: a new slot
secret and vault record, the account's earlier password slots removed), turning it off,
and checking it.

The vault holds one record per account, so once a new one is registered the earlier
password slots of that account open nothing and go. Slots an earlier version named password
slots in clear are never removed on that word (whoever can write the storage could have
renamed the recovery key so): they are reported instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backvault.app.errors import AppError, NoPasswordSlot
from backvault.app.keys import relabel_legacy_keys
from backvault.device.settings import VaultSettings
from backvault.repo.repository import KeySlot, Repository
from backvault.vaultclient.realm_slots import RealmRecovery, RealmSlots, password_slots
from backvault.vaultclient.slots import RecordCheck, Recovery


@dataclass(frozen=True)
class PasswordSet:
    key_id: str
    replaced: list[str]  # the account's earlier password slots, removed
    unverified: list[KeySlot]  # named password slots in clear by an earlier version: kept
    renamed: dict[str, str]  # legacy key files relabelled: old id -> new id
    # Realms only: the realms a degraded registration missed (URL -> why; delivered
    # later), and what went wrong deleting the single vault's record when moving to realms.
    missed_realms: dict[str, str] = field(default_factory=dict)
    cleanup_problem: Exception | None = None


def require_password_slot(repo: Repository, vault: VaultSettings) -> None:
    """Changing a password needs one to change (checked before asking for the new one)."""
    if not password_slots(vault).slots_of_account(repo, verified_only=False):
        raise NoPasswordSlot(
            "this repository has no password slot for this account; add one with "
            "`backvault key add --password`"
        )


def set_password(
    repo: Repository,
    vault: VaultSettings,
    password: str,
    max_attempts: int | None,
    allow_degraded: bool = False,
) -> PasswordSet:
    """Add a password slot for ``password`` (replacing the vault's record for the account)
    and remove the account's earlier password slots. ``allow_degraded``: with realms, t of
    n are enough; the others get theirs later (see RealmSlots.enable)."""
    slots = password_slots(vault)
    old = slots.slots_of_account(repo)
    key_id = slots.enable(repo, password.encode(), max_attempts, allow_degraded)
    for slot in old:
        repo.remove_key(slot.id)
    unverified = slots.unverified_slots_of_account(repo)
    missed = getattr(slots, "missed", {})
    problem = getattr(slots, "cleanup_problem", None)
    return PasswordSet(
        key_id, [s.id for s in old], unverified, relabel_legacy_keys(repo), missed, problem
    )


def deliver_pending(repo: Repository, vault: VaultSettings) -> tuple[list[str], dict[str, str]]:
    """Realms only: deliver what a degraded registration left for the realms that missed
    it (realms delivered to, realms still waiting and why); nothing to do otherwise."""
    if not vault.uses_realms:
        return [], {}
    from backvault.vaultclient.realm_slots import RealmSlots

    return RealmSlots(vault).deliver_pending(repo)


@dataclass(frozen=True)
class PasswordDisabled:
    removed: list[str]
    unverified: list[KeySlot]


def disable_password(repo: Repository, vault: VaultSettings) -> PasswordDisabled:
    """Erase the vault record and remove the account's password slots; refused when the
    password is the repository's only key."""
    slots = password_slots(vault)
    mine = slots.slots_of_account(repo)
    if not [s for s in repo.list_keys() if s not in mine]:
        raise AppError(
            "refusing: the password is the only key of this repository; add a 64-digit key "
            "first (`backvault key add`)"
        )
    slots.delete_record()
    if isinstance(slots, RealmSlots):
        slots.forget_pending(repo)
    for slot in mine:
        repo.remove_key(slot.id)
    return PasswordDisabled([s.id for s in mine], slots.unverified_slots_of_account(repo))


def vault_record(vault: VaultSettings) -> RecordCheck:
    """What the vault holds for the account, compared with what this device registered;
    costs no attempt."""
    return password_slots(vault).check_record()


def check_password(vault: VaultSettings, password: str) -> Recovery | RealmRecovery:
    """A real login (a wrong password uses an attempt; a right one forgives this device's
    wrong tries)."""
    return password_slots(vault).recover(password.encode())
