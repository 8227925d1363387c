"""The password path: a repository key slot whose secret only the vault can give back.

Turning it on: a 256-bit random slot secret becomes the password of a new restic key file
(as 64 hex digits). The secret is encrypted (AES-256-GCM) under a key derived (HKDF-SHA512)
from OPAQUE's ``export_key`` and that ciphertext is registered with the vault beside the
OPAQUE record. Getting it back needs a successful OPAQUE login, which the vault counts.

The password itself protects nothing stored anywhere: no key file opens with it, and no
hash or KDF output of it is written. Only the vault, through OPAQUE, can check it.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backvault.crypto.slotlabel import PASSWORD, SlotLabel
from backvault.device import vault_state
from backvault.device.settings import VaultSettings
from backvault.opaque import OpaqueConfig
from backvault.repo.repository import KeySlot, Repository
from backvault.vaultclient.errors import UnwrapFailed, VaultRefused, VaultUnavailable

if TYPE_CHECKING:
    from backvault.vaultclient.http import LoginResult, VaultClient

WRAP_INFO = b"backvault vault-slot wrap v1"
WRAP_VERSION = 1
MIN_LENGTH = 6
MIN_SCORE = 2  # zxcvbn: refuse passwords guessable within about 10^6 tries


class WeakPassword(ValueError):
    pass


def _wrap_key(export_key: bytes) -> bytes:
    return HKDF(hashes.SHA512(), 32, salt=None, info=WRAP_INFO).derive(export_key)


def _aad(account: str) -> bytes:
    return b"backvault vault slot:" + account.encode()


def wrap_slot_secret(export_key: bytes, slot_secret: bytes, account: str) -> bytes:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_wrap_key(export_key)).encrypt(nonce, slot_secret, _aad(account))
    return bytes([WRAP_VERSION]) + nonce + sealed


def unwrap_slot_secret(export_key: bytes, wrapped: bytes, account: str) -> bytes:
    if len(wrapped) < 1 + 12 + 16 or wrapped[0] != WRAP_VERSION:
        raise UnwrapFailed("the vault returned a malformed wrapped secret")
    try:
        return AESGCM(_wrap_key(export_key)).decrypt(wrapped[1:13], wrapped[13:], _aad(account))
    except InvalidTag as exc:
        raise UnwrapFailed("the secret from the vault does not open with this password") from exc


def check_strength(password: str) -> str:
    """Refuse passwords an online attacker would guess within the limit; return advice."""
    from zxcvbn import zxcvbn

    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"use at least {MIN_LENGTH} characters")
    result = zxcvbn(password[:100])
    feedback = result.get("feedback", {})
    advice = " ".join([feedback.get("warning") or "", *(feedback.get("suggestions") or [])]).strip()
    if result["score"] < MIN_SCORE:
        raise WeakPassword("this password is too easy to guess" + (f": {advice}" if advice else ""))
    labels = {2: "fair", 3: "good", 4: "strong"}
    return f"password strength: {labels[result['score']]}" + (f" ({advice})" if advice else "")


@dataclass(frozen=True)
class Recovery:
    secret: bytes
    login: LoginResult
    # None: the record was current; True: it was moved to a fresh credential identifier;
    # False: moving it failed (``problem``), to be tried again at the next login.
    upgraded: bool | None
    problem: Exception | None

    def __repr__(self) -> str:
        return f"Recovery(<secret>, upgraded={self.upgraded})"


LEGACY_UPGRADED = (
    "this vault record was made before each record had its own OPRF key (its key derives "
    "from the account name, and an older vault evaluated it for anyone holding the account "
    "token): it has now been registered again under a fresh key, same password, count kept. "
    "If anyone else may have held your account token before the vault was upgraded, change "
    "your password (`backvault password change`)"
)


@dataclass(frozen=True)
class RecordCheck:
    status: dict[str, Any]  # GET /v1/record
    remembered: str | None  # the fingerprint this device registered, if it did
    ours: bool | None  # None: this device cannot tell (it did not register the record)


def is_password_slot(slot: KeySlot) -> bool:
    return slot.label is not None and slot.label.kind == PASSWORD


def is_verified_password_slot(slot: KeySlot) -> bool:
    """A password slot whose kind the master key vouches for (not clear names)."""
    return is_password_slot(slot) and slot.label is not None and not slot.label.from_clear_names


@dataclass
class PasswordSlots:
    vault: VaultSettings
    opaque_config: OpaqueConfig | None = None
    verify: bool | str = True

    def client(self) -> VaultClient:
        # httpx loads only when a vault is called (most commands never do).
        from backvault.vaultclient.http import VaultClient

        return VaultClient(
            self.vault.url,
            self.vault.token,
            self.opaque_config,
            verify=self.verify,
            allow_plain_http=self.vault.allow_plain_http,
        )

    def enable(
        self,
        repo: Repository,
        password: bytes,
        max_attempts: int | None = None,
        allow_degraded: bool = False,
    ) -> str:
        """Add a vault key slot; returns its key id. Nothing is left half-done: if the vault
        refuses, the new key file is removed again. (``allow_degraded`` is for realms: one
        vault has no partial registration.)"""
        if allow_degraded:
            raise ValueError("a degraded registration needs realms (vault.realms)")
        slot_secret = secrets.token_bytes(32)
        # The vault and account go into the slot's sealed label, not its clear names.
        key_id = repo.add_key(
            slot_secret.hex().encode(), SlotLabel.password(self.vault.url, self.vault.account)
        )
        try:
            with self.client() as vault:
                registration = vault.register(
                    password,
                    lambda export_key: wrap_slot_secret(
                        export_key, slot_secret, self.vault.account
                    ),
                    max_attempts,
                )
        except BaseException:
            repo.remove_key(key_id)
            raise
        vault_state.remember_registration(
            self.vault.url, self.vault.account, registration.fingerprint
        )
        return key_id

    def login(self, password: bytes) -> LoginResult:
        """Log in to the vault, presenting this device's earlier wrong tries so that a
        success forgives them (VaultRefused on a wrong password)."""
        url, account = self.vault.url, self.vault.account
        with self.client() as vault:
            result = vault.login(
                password,
                vault_state.earlier_attempts(url, account),
                on_started=lambda login_id: vault_state.add_attempt(url, account, login_id),
            )
        vault_state.clear_attempts(url, account)
        return result

    def recover(self, password: bytes) -> Recovery:
        """Log in to the vault and unwrap the slot secret (VaultRefused on a wrong password).

        A record made before per-registration credential identifiers answers under an OPRF
        key derived from the account name, which an old vault's registration endpoint
        evaluated for anyone holding the token: guesses collected then could still be
        tested against it. Right after a successful login such a record is registered
        again — same password, same slot secret, its count kept — under a fresh
        identifier; no key file changes."""
        result = self.login(password)
        secret = unwrap_slot_secret(result.export_key, result.wrapped_secret, self.vault.account)
        upgraded: bool | None = None
        problem: Exception | None = None
        if result.legacy_record:
            try:
                with self.client() as vault:
                    registration = vault.register(
                        password,
                        lambda export_key: wrap_slot_secret(export_key, secret, self.vault.account),
                        result.max_attempts or None,
                        keep_count=True,
                        replaces=result.fingerprint,
                    )
                vault_state.remember_registration(
                    self.vault.url, self.vault.account, registration.fingerprint
                )
                upgraded = True
            except (VaultRefused, VaultUnavailable) as exc:
                upgraded, problem = False, exc
        return Recovery(secret, result, upgraded, problem)

    def check_record(self) -> RecordCheck:
        """What the vault holds for this account, compared with what this device
        registered; costs no attempt."""
        status = self.status()
        remembered = vault_state.registered_fingerprint(self.vault.url, self.vault.account)
        held = str(status.get("fingerprint") or "")
        ours = None if remembered is None else hmac.compare_digest(remembered, held)
        return RecordCheck(status, remembered, ours)

    def status(self) -> dict[str, object]:
        with self.client() as vault:
            return vault.status()

    def delete_record(self) -> None:
        with self.client() as vault:
            try:
                vault.delete_record()
            except VaultRefused as exc:
                if exc.status != 404:
                    raise
        vault_state.forget_registration(self.vault.url, self.vault.account)

    def slots_of_account(self, repo: Repository, verified_only: bool = True) -> list[KeySlot]:
        """This account's password slots, as their sealed labels say. ``verified_only``
        leaves out slots whose kind an earlier version wrote in clear (anyone who can write
        the storage can forge those): never remove a slot on their word."""
        return [
            s
            for s in repo.list_keys()
            if is_password_slot(s)
            and s.label is not None
            and s.label.account == self.vault.account
            and (not verified_only or not s.label.from_clear_names)
        ]

    def unverified_slots_of_account(self, repo: Repository) -> list[KeySlot]:
        verified = {s.id for s in self.slots_of_account(repo)}
        return [s for s in self.slots_of_account(repo, False) if s.id not in verified]
