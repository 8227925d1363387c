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

import base64
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from backvault.crypto.aead import AuthenticationFailed
from backvault.crypto.slotlabel import SlotLabel
from backvault.device import vault_state
from backvault.device.settings import VaultSettings
from backvault.repo.repository import KeySlot, Repository
from backvault.vaultclient.slots import PasswordSlots, RecordCheck

if TYPE_CHECKING:
    from backvault.realms.protocol import TestOnlyStretching
    from backvault.vaultclient.realms import PendingDelivery, RealmSet

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
    # The recovery used the last attempts: fewer than t realms can evaluate this
    # registration again (a realm erases its key share at its limit, even for a right
    # password), so the password must be set again.
    spent: bool = False
    # The single vault's recovery may move a legacy record; realms have none (same fields,
    # so the command line reports both alike).
    upgraded: bool | None = None
    problem: Exception | None = None


@dataclass
class RealmSlots:
    vault: VaultSettings
    verify: bool | str = True
    test_stretching: TestOnlyStretching | None = None  # tests only: cheap Argon2id
    # After ``enable``: the realms a degraded registration missed (URL -> why), and what
    # went wrong deleting the single vault's record, if anything.
    missed: dict[str, str] = field(default_factory=dict)
    cleanup_problem: Exception | None = None

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
        realms = RealmSet(
            clients,
            self.vault.account,
            min_threshold=self._threshold(),
            test_stretching=self.test_stretching,
        )
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

    def enable(
        self,
        repo: Repository,
        password: bytes,
        max_attempts: int | None = None,
        allow_degraded: bool = False,
    ) -> str:
        """Add a realm key slot; returns its key id. Nothing is left half-done: if the
        registration does not land at every realm (or, with ``allow_degraded``, at t of
        them), the new key file is removed again. A degraded registration's payloads for
        the realms that missed it are kept on this device, sealed under the repository's
        master key, and delivered later (``deliver_pending``)."""
        slot_secret = secrets.token_bytes(32)
        key_id = repo.add_key(
            slot_secret.hex().encode(), SlotLabel.password(self.label_url, self.vault.account)
        )
        try:
            with self.realm_set() as realms:
                outcome = realms.register(
                    password,
                    slot_secret,
                    self._threshold(),
                    allowed_guesses=max_attempts,
                    allow_degraded=allow_degraded,
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
        # Whatever an earlier degraded registration left for later is replaced by this one.
        vault_state.set_pending_deliveries(
            repo.config.id, [_seal_pending(repo, pending) for pending in outcome.pending]
        )
        self.missed = {
            pending.url: outcome.problems.get(pending.url, "") for pending in outcome.pending
        }
        self.single_vault_cleanup()
        return key_id

    def single_vault_cleanup(self) -> None:
        """Moving from the single vault to realms: its OPAQUE record goes once the realms
        hold the password (the account's old password slot is removed by the caller)."""
        single = self.vault.single_vault
        if single is None:
            return
        try:
            PasswordSlots(single).delete_record()
        except Exception as exc:  # the realms hold the password; report, do not undo
            self.cleanup_problem = exc
        else:
            self.cleanup_problem = None

    def deliver_pending(self, repo: Repository) -> tuple[list[str], dict[str, str]]:
        """Deliver what a degraded registration left for the realms that missed it;
        returns (realms delivered to, realms still waiting and why)."""
        from backvault.vaultclient.realms import RealmFailure

        sealed = vault_state.pending_deliveries(repo.config.id)
        if not sealed:
            return [], {}
        delivered: list[str] = []
        waiting: dict[str, str] = {}
        keep: list[str] = []
        with self.realm_set() as realms:
            for item in sealed:
                try:
                    pending = _open_pending(repo, item)
                except ValueError:
                    continue  # not sealed under this master key: not ours to deliver
                try:
                    realms.deliver(pending)
                    delivered.append(pending.url)
                except (*RealmFailure, ValueError) as exc:
                    waiting[pending.url] = str(exc)
                    keep.append(item)
        vault_state.set_pending_deliveries(repo.config.id, keep)
        return delivered, waiting

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
                # Not bound to the version this device registered: another device of the
                # owner may have changed the password since (`password check` and the
                # opening say so, as with one vault). An old registration brought back by
                # rolled-back realms gives a secret whose key slot left the repository.
                expected_version=None,
            )
            # Forgotten only where a realm forgave them (it answered phase 3): a realm that
            # was down still counts them, and is presented them at the next success.
            for realm in realms.realms:
                if realm.realm_id is not None and realm.url in recovered.unlocked:
                    vault_state.clear_attempts(_attempt_key(realm.realm_id), account)
            after = realms.survey()
            spent = after.descriptor is None or realms.attempts_left(after).guesses == 0
        return RealmRecovery(recovered.secret, recovered.problems, spent)

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
                realms.agree()  # raises, naming every realm
                raise RealmsDisagree("no t realms agree", survey.problems)  # not reached
            left = realms.attempts_left(survey)
            d = survey.descriptor
            # Realms that answered and can never evaluate this registration again (spent,
            # erased, or holding none): with n-t+1 of them, no t realms ever can.
            gone = sum(
                1
                for answer in survey.answers.values()
                if answer.state != "registered"
                or (
                    answer.descriptor is not None
                    and answer.descriptor.version == d.version
                    and answer.attempts_left == 0
                )
            )
            if gone >= len(realms.realms) - d.threshold + 1:
                return {"exists": False, "attempts_left": 0, "realms": survey.problems}
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

    def forget_pending(self, repo: Repository) -> None:
        """Drop what a degraded registration left to deliver (the password is off, or
        replaced: delivering it would bring the old registration back at that realm)."""
        vault_state.set_pending_deliveries(repo.config.id, [])

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


def _seal_pending(repo: Repository, pending: PendingDelivery) -> str:
    payload = pending.payload
    doc = {
        "url": pending.url,
        "realm_id": pending.realm_id.hex(),
        "descriptor": pending.descriptor_bytes.hex(),
        "expected_version": pending.expected_version.hex() if pending.expected_version else None,
        "key_share": payload.key_share.hex(),
        "tag_hash": payload.tag_hash.hex(),
        "encryption_share": payload.encryption_share.hex(),
        "share_mac": payload.share_mac.hex(),
        "ciphertext": payload.ciphertext.hex(),
    }
    return base64.b64encode(repo.key.seal(json.dumps(doc).encode())).decode()


def _open_pending(repo: Repository, item: str) -> PendingDelivery:
    """A pending delivery sealed by ``_seal_pending`` (ValueError if it does not open)."""
    from backvault.realms.protocol import RealmPayload
    from backvault.vaultclient.realms import PendingDelivery

    try:
        doc = json.loads(repo.key.open(base64.b64decode(item, validate=True)))
        expected = doc["expected_version"]
        return PendingDelivery(
            str(doc["url"]),
            bytes.fromhex(doc["realm_id"]),
            bytes.fromhex(doc["descriptor"]),
            RealmPayload(
                bytes.fromhex(doc["realm_id"]),
                bytes.fromhex(doc["key_share"]),
                bytes.fromhex(doc["tag_hash"]),
                bytes.fromhex(doc["encryption_share"]),
                bytes.fromhex(doc["share_mac"]),
                bytes.fromhex(doc["ciphertext"]),
            ),
            bytes.fromhex(expected) if expected else None,
        )
    except (AuthenticationFailed, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"a pending realm delivery does not open: {exc}") from None
