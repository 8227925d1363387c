"""Creating a repository (``backvault init``): the repository with its 64-digit recovery
key, this device's key cache, and optionally a password slot whose secret only the vault
gives back."""

from __future__ import annotations

from dataclasses import dataclass, field

from backvault.crypto import recovery_key
from backvault.crypto.slotlabel import SlotLabel
from backvault.device import keycache
from backvault.device.settings import VaultSettings
from backvault.repo.repository import Repository
from backvault.storage import open_backend
from backvault.vaultclient.realm_slots import password_slots


@dataclass(frozen=True)
class Created:
    location: str
    repo_id: str
    # The recovery key to show once; None when the password is the only way back.
    recovery_secret: bytes | None = field(repr=False)
    recovery_key_id: str | None
    password_key_id: str | None
    device_cache: str  # where this device keeps the key ("" if it does not)
    # The repository exists, but turning the password on failed with this.
    password_problem: Exception | None
    # Realms a degraded registration missed (URL -> why); delivered later.
    missed_realms: dict[str, str] = field(default_factory=dict)


def create_repository(
    location: str,
    remember: bool,
    vault: VaultSettings | None = None,
    password: str | None = None,
    max_attempts: int | None = None,
    keep_recovery_key: bool = True,
    allow_degraded: bool = False,
) -> Created:
    """Create the repository. With ``vault`` and ``password``, also a password slot; without
    ``keep_recovery_key`` the recovery key's slot is removed again once that slot exists."""
    backend = open_backend(location)
    secret = recovery_key.generate()
    repo = Repository.init(backend, recovery_key.canonical(secret).encode(), SlotLabel.recovery())
    recovery_id = repo.key_id
    where = keycache.remember(backend.location, repo.config.id, repo.key) if remember else ""
    password_slot = None
    problem: Exception | None = None
    missed: dict[str, str] = {}
    if vault is not None and password is not None:
        try:
            slots = password_slots(vault)
            password_slot = slots.enable(repo, password.encode(), max_attempts, allow_degraded)
            missed = getattr(slots, "missed", {})
        except Exception as exc:  # reported with the repository, which exists now
            problem = exc
    keep = keep_recovery_key or password_slot is None
    if not keep and recovery_id:
        repo.remove_key(recovery_id)
    return Created(
        location=backend.location,
        repo_id=repo.config.id,
        recovery_secret=secret if keep else None,
        recovery_key_id=recovery_id if keep else None,
        password_key_id=password_slot,
        device_cache=where,
        password_problem=problem,
        missed_realms=missed,
    )
