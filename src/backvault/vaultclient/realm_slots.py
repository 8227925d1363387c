"""The password path through threshold realms (docs/realms.md): a repository key slot whose
secret t of n realms give back after a counted recovery. The same interface as the single
vault's ``slots.PasswordSlots``, so the workflows (app/) and the command line use either
without knowing which: ``password_slots(vault)`` chooses by the settings.

Turning it on: a 256-bit random slot secret becomes the password of a new restic key file
(as 64 hex digits) and is registered at every realm (``RealmSet.register``); the key file
is removed again if the registration does not land. The device remembers the
registration's version (its key slot belongs to that one: phase 1 then refuses any other
descriptor, e.g. an old one brought back by a rolled-back realm), the realm ids it pinned,
and the attempt ids of its wrong tries (forgiven after a success).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from backvault.crypto.slotlabel import SlotLabel
from backvault.device import vault_state
from backvault.device.settings import VaultSettings
from backvault.repo.repository import KeySlot, Repository
from backvault.vaultclient.slots import PasswordSlots, RecordCheck

if TYPE_CHECKING:
    from backvault.realms.protocol import TestOnlyStretching
    from backvault.vaultclient.realms import RealmSet

LABEL_PREFIX = "realms:"
STATE_KEY = "realms"  # the device's vault-state entry for the registration


def password_slots(vault: VaultSettings) -> PasswordSlots | RealmSlots:
    """The password slots of the configured vault: realms when vault.realms is set."""
    return RealmSlots(vault) if vault.uses_realms else PasswordSlots(vault)


def _attempt_key(realm_id: bytes) -> str:
    return f"realm:{realm_id.hex()}"


@dataclass(frozen=True)
class RealmRecovery:
    """What a recovery through realms gives: the slot secret, and the realms that failed a
    phase (named, and replaced by others)."""

    secret: bytes = field(repr=False)
    problems: dict[str, str]
    # The single vault's recovery may move a legacy record; realms have none (same fields,
    # so the command line reports both alike).
    upgraded: bool | None = None
    problem: Exception | None = None


@dataclass
class RealmSlots:
    vault: VaultSettings
    verify: bool | str = True
    test_stretching: TestOnlyStretching | None = None  # tests only: cheap Argon2id

    @property
    def label_url(self) -> str:
        hosts = ",".join(urlsplit(realm.url).netloc for realm in self.vault.realms)
        return (LABEL_PREFIX + hosts)[:400]

    def realm_set(self) -> RealmSet:
        # httpx and the protocol load only when realms are called (most commands never do).
        from backvault.vaultclient.realms import RealmClient, RealmSet

        pins = vault_state.realm_pins()
        clients = [
            RealmClient(
                realm.url,
                realm.token,
                realm.realm_id or pins.get(realm.url),
                verify=self.verify,
                allow_plain_http=self.vault.allow_plain_http,
            )
            for realm in self.vault.realms
        ]
        realms = RealmSet(clients, self.vault.account, test_stretching=self.test_stretching)
        # A realm not pinned yet (a new device, realms given by URL) is asked for its id
        # now, trust on first use: its answers count only if the descriptor t realms agree
        # on names it, so a wrong realm at that URL can only be left out, not believed.
        unpinned = [client for client in clients if client.realm_id is None]
        if unpinned:
            pinned, _unreachable = realms.each(unpinned, RealmClient.pin)
            vault_state.pin_realms(pinned)
        return realms

    def _threshold(self) -> int:
        n = len(self.vault.realms)
        return self.vault.threshold or n // 2 + 1

    def enable(self, repo: Repository, password: bytes, max_attempts: int | None = None) -> str:
        """Add a realm key slot; returns its key id. Nothing is left half-done: if the
        registration does not land at every realm, the new key file is removed again."""
        slot_secret = secrets.token_bytes(32)
        key_id = repo.add_key(
            slot_secret.hex().encode(), SlotLabel.password(self.label_url, self.vault.account)
        )
        try:
            with self.realm_set() as realms:
                outcome = realms.register(
                    password, slot_secret, self._threshold(), allowed_guesses=max_attempts
                )
                vault_state.pin_realms(outcome.pinned)
                # Read it back through phase 1 before anyone removes the old key slot.
                realms.agree(outcome.descriptor.version)
        except BaseException:
            repo.remove_key(key_id)
            raise
        vault_state.remember_registration(
            STATE_KEY, self.vault.account, outcome.descriptor.version.hex()
        )
        return key_id

    def _expected_version(self) -> bytes | None:
        remembered = vault_state.registered_fingerprint(STATE_KEY, self.vault.account)
        try:
            return bytes.fromhex(remembered) if remembered else None
        except ValueError:
            return None

    def recover(self, password: bytes) -> RealmRecovery:
        """The slot secret behind ``password`` (RealmWrongPassword when it is wrong); the
        device's earlier wrong tries are presented for forgiveness."""
        account = self.vault.account
        with self.realm_set() as realms:
            earlier: dict[bytes, list[bytes]] = {}
            for realm in realms.realms:
                if realm.realm_id is None:
                    continue
                ids = vault_state.earlier_attempts(_attempt_key(realm.realm_id), account)
                earlier[realm.realm_id] = [bytes.fromhex(i) for i in ids if _is_hex(i)]
            recovered = realms.recover(
                password,
                earlier_attempts=earlier,
                on_attempt=lambda realm_id, attempt_id: vault_state.add_attempt(
                    _attempt_key(realm_id), account, attempt_id.hex()
                ),
                expected_version=self._expected_version(),
            )
            for realm in realms.realms:
                if realm.realm_id is not None:
                    vault_state.clear_attempts(_attempt_key(realm.realm_id), account)
        return RealmRecovery(recovered.secret, recovered.problems)

    def check_record(self) -> RecordCheck:
        """What the realms hold for this account (costs no attempt)."""
        status = self.status()
        remembered = vault_state.registered_fingerprint(STATE_KEY, self.vault.account)
        held = status.get("version")
        ours = None if remembered is None or not held else remembered == held
        return RecordCheck(status, remembered, ours)

    def status(self) -> dict[str, Any]:
        """Phase 1 over the realms, as the single vault's status reads: ``exists``,
        ``attempts_left`` (the bound over the realms' counts), and which realms did not
        answer or disagreed. Raises RealmsDisagree when no t realms agree and the
        registration is not erased (the realms may be down: nothing is said erased)."""
        from backvault.vaultclient.errors import RealmsDisagree

        with self.realm_set() as realms:
            survey = realms.survey()
            if survey.descriptor is None:
                if realms.erased(self._threshold(), survey):
                    return {"exists": False, "attempts_left": 0, "realms": survey.problems}
                realms.agree(self._expected_version())  # raises, naming every realm
                raise RealmsDisagree("no t realms agree", survey.problems)  # not reached
            left = realms.attempts_left(survey)
            d = survey.descriptor
            return {
                "exists": True,
                "attempts_left": left.guesses,
                "version": d.version.hex(),
                "threshold": d.threshold,
                "realms": len(d.realms),
                "allowed_per_realm": d.allowed_guesses,
                "unreachable": left.unreachable,
            }

    def delete_record(self) -> None:
        """Delete the registration at every realm (each holds it under its version)."""
        with self.realm_set() as realms:
            survey = realms.survey()
            versions = {
                answer.descriptor.version
                for answer in survey.answers.values()
                if answer.descriptor is not None
            }
            for version in versions:
                holding = [
                    realm
                    for realm in realms.realms
                    if (a := survey.answers.get(realm.url)) is not None
                    and a.descriptor is not None
                    and a.descriptor.version == version
                ]
                realms.delete(version, holding)
        vault_state.forget_registration(STATE_KEY, self.vault.account)

    def slots_of_account(self, repo: Repository, verified_only: bool = True) -> list[KeySlot]:
        return PasswordSlots(self.vault).slots_of_account(repo, verified_only)

    def unverified_slots_of_account(self, repo: Repository) -> list[KeySlot]:
        return PasswordSlots(self.vault).unverified_slots_of_account(repo)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
