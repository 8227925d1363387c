"""The client's computations of docs/realms.md: the derivations of "Key derivation and the
descriptor", registration, and the three phases of a recovery. Pure: byte strings in, byte
strings out; the HTTP orchestration is ``backvault.vaultclient.realms``.

Secrets (the root key k, the encryption scalar e, the unlock key) live only in local
variables of the function that needs them; Python cannot wipe memory, so the best this
module can do is not keep them anywhere longer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backvault.opaque import group, voprf
from backvault.opaque.errors import InvalidMessageError
from backvault.realms import shamir
from backvault.realms.descriptor import (
    SUITE,
    VERSION_SIZE,
    Descriptor,
    RealmEntry,
    check_threshold,
)

# The suite's Argon2id: fixed by SUITE, never taken from a realm or a descriptor.
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 65536
ARGON2_PARALLELISM = 4
STRETCH_SIZE = 64  # access_key ‖ encryption_seed
SALT_SIZE = 32
KEY_SIZE = 32
SLOT_SECRET_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 32
MAC_SIZE = 32
CIPHERTEXT_SIZE = NONCE_SIZE + SLOT_SECRET_SIZE + 16

SALT_LABEL = b"backvault-realms-v1 salt"
UNLOCK_LABEL = b"backvault-realms-v1 unlock"
ENCRYPTION_LABEL = b"backvault-realms-v1 encryption"
TAG_LABEL = b"backvault-realms-v1 tag"
SHARE_LABEL = b"backvault-realms-v1 share"

_GENERATOR = group.scalar_mult_base(group.scalar_from_public_int(1))


class RealmProtocolError(InvalidMessageError):
    """Something a realm sent fails the protocol's checks; ``realm_id`` names the realm."""

    def __init__(self, realm_id: bytes, message: str) -> None:
        super().__init__(f"realm {realm_id.hex()}: {message}")
        self.realm_id = realm_id
        self.reason = message


class EvaluationRejected(RealmProtocolError):
    """A realm's evaluation does not verify against its public key share in D."""


class ShareRejected(RealmProtocolError):
    """A realm's encryption share, MAC or ciphertext is not what was registered."""


class SecretDoesNotOpen(InvalidMessageError):
    """t shares that each passed their MAC still do not open the ciphertext."""


@dataclass(frozen=True)
class TestOnlyStretching:
    """Cheaper Argon2id parameters, for tests only: production code passes nothing and gets
    the suite's fixed parameters. There is deliberately no way to get these from settings,
    a realm or a descriptor."""

    __test__ = False  # not a pytest class

    time_cost: int = 1
    memory_cost_kib: int = 8
    parallelism: int = 1


def _lp(value: bytes) -> bytes:
    return group.i2osp(len(value), 2) + value


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA512(), length, salt=salt, info=info).derive(ikm)


def _hmac32(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha512).digest()[:32]


def salt(version: bytes, user_id: str) -> bytes:
    data = SALT_LABEL + _lp(SUITE) + version + _lp(user_id.encode())
    return hashlib.sha512(data).digest()[:SALT_SIZE]


def stretch(
    password: bytes,
    version: bytes,
    user_id: str,
    *,
    test_stretching: TestOnlyStretching | None = None,
) -> tuple[bytes, bytes]:
    """(access_key, encryption_seed) = Argon2id(password, salt(version, user_id)), 32 bytes
    each, with the suite's parameters."""
    if len(version) != VERSION_SIZE:
        raise ValueError(f"the version must be {VERSION_SIZE} bytes")
    params = test_stretching or TestOnlyStretching(
        ARGON2_TIME_COST, ARGON2_MEMORY_KIB, ARGON2_PARALLELISM
    )
    out = hash_secret_raw(
        secret=password,
        salt=salt(version, user_id),
        time_cost=params.time_cost,
        memory_cost=params.memory_cost_kib,
        parallelism=params.parallelism,
        hash_len=STRETCH_SIZE,
        type=Type.ID,
    )
    return out[:32], out[32:]


def _commitment_and_unlock_key(oprf_output: bytes, version: bytes) -> tuple[bytes, bytes]:
    both = _hkdf(oprf_output, version, UNLOCK_LABEL + _lp(SUITE), 64)
    return both[:32], both[32:]


def _encryption_key(encryption_seed: bytes, e: bytes, version: bytes) -> bytes:
    return _hkdf(encryption_seed + e, version, ENCRYPTION_LABEL + _lp(SUITE), KEY_SIZE)


class UnlockKey:
    """The unlock key of a registration, known only to whoever knows the password: it makes
    the per-realm tags and checks the share MACs."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "UnlockKey(<hidden>)"


def _tag(key: bytes, descriptor: Descriptor, realm_id: bytes) -> bytes:
    return _hmac32(key, TAG_LABEL + descriptor.version + realm_id)


def _share_mac(
    key: bytes, descriptor: Descriptor, entry: RealmEntry, e_j: bytes, ciphertext: bytes
) -> bytes:
    message = (
        SHARE_LABEL
        + descriptor.version
        + entry.realm_id
        + group.i2osp(entry.index, 1)
        + e_j
        + ciphertext
    )
    return _hmac32(key, message)


# --- registration ------------------------------------------------------------------------


@dataclass(frozen=True)
class RealmPayload:
    """What one realm receives at registration (``POST /realm/v1/register``)."""

    realm_id: bytes
    key_share: bytes  # k_j, secret
    tag_hash: bytes
    encryption_share: bytes  # e_j, secret
    share_mac: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return f"RealmPayload(realm_id={self.realm_id.hex()}, <shares hidden>)"


@dataclass(frozen=True)
class Registration:
    descriptor: Descriptor
    payloads: tuple[RealmPayload, ...]  # in descriptor order

    def payload(self, realm_id: bytes) -> RealmPayload:
        for payload in self.payloads:
            if payload.realm_id == realm_id:
                return payload
        raise KeyError(realm_id.hex())


def register(
    password: bytes,
    user_id: str,
    slot_secret: bytes,
    realm_ids: Sequence[bytes],
    threshold: int,
    allowed_guesses: int,
    *,
    test_stretching: TestOnlyStretching | None = None,
) -> Registration:
    """A new registration of ``slot_secret`` behind ``password`` at ``realm_ids`` (in that
    order: realm j gets Shamir index j)."""
    if len(slot_secret) != SLOT_SECRET_SIZE:
        raise ValueError(f"the slot secret must be {SLOT_SECRET_SIZE} bytes")
    check_threshold(threshold, len(realm_ids))
    version = secrets.token_bytes(VERSION_SIZE)
    indices = list(range(1, len(realm_ids) + 1))
    access_key, encryption_seed = stretch(
        password, version, user_id, test_stretching=test_stretching
    )

    k = group.random_scalar()
    key_shares = shamir.split(k, threshold, indices)
    oprf_output = voprf.evaluate(k, access_key)
    del k
    commitment, unlock_key = _commitment_and_unlock_key(oprf_output, version)
    descriptor = Descriptor(
        version,
        user_id,
        threshold,
        allowed_guesses,
        commitment,
        tuple(
            RealmEntry(realm_id, index, shamir.public_share(key_shares[index]))
            for realm_id, index in zip(realm_ids, indices, strict=True)
        ),
    )

    e = group.random_scalar()
    encryption_shares = shamir.split(e, threshold, indices)
    key = _encryption_key(encryption_seed, e, version)
    del e
    nonce = secrets.token_bytes(NONCE_SIZE)
    ciphertext = nonce + AESGCM(key).encrypt(nonce, slot_secret, descriptor.hash)
    del key

    payloads = tuple(
        RealmPayload(
            entry.realm_id,
            key_shares[entry.index],
            hashlib.sha256(_tag(unlock_key, descriptor, entry.realm_id)).digest(),
            encryption_shares[entry.index],
            _share_mac(unlock_key, descriptor, entry, encryption_shares[entry.index], ciphertext),
            ciphertext,
        )
        for entry in descriptor.realms
    )
    return Registration(descriptor, payloads)


# --- recovery ----------------------------------------------------------------------------


class Recovery:
    """One recovery attempt's client state: the stretched password and the blind. The same
    blinded element goes to every realm asked (docs/realms.md, phase 2)."""

    __slots__ = ("_access_key", "_blind", "_encryption_seed", "blinded_element", "descriptor")

    def __init__(
        self,
        descriptor: Descriptor,
        access_key: bytes,
        encryption_seed: bytes,
        blind: bytes,
        blinded_element: bytes,
    ) -> None:
        self.descriptor = descriptor
        self._access_key = access_key
        self._encryption_seed = encryption_seed
        self._blind = blind
        self.blinded_element = blinded_element

    def __repr__(self) -> str:
        return f"Recovery(version={self.descriptor.version.hex()}, <secrets hidden>)"


def begin_recovery(
    password: bytes,
    descriptor: Descriptor,
    *,
    test_stretching: TestOnlyStretching | None = None,
) -> Recovery:
    access_key, encryption_seed = stretch(
        password, descriptor.version, descriptor.user_id, test_stretching=test_stretching
    )
    blind = group.random_scalar()
    return Recovery(descriptor, access_key, encryption_seed, blind, voprf.blind(access_key, blind))


def check_evaluation(
    descriptor: Descriptor,
    realm_id: bytes,
    blinded_element: bytes,
    evaluated_element: bytes,
    proof: bytes,
) -> None:
    """Refuse (EvaluationRejected) an evaluation Z_j whose DLEQ proof does not show
    Z_j = k_j·B for the k_j behind pk_j in D."""
    entry = _entry(descriptor, realm_id)
    try:
        ok = voprf.verify_proof(
            _GENERATOR, entry.public_share, [blinded_element], [evaluated_element], proof
        )
    except InvalidMessageError as exc:
        raise EvaluationRejected(realm_id, f"malformed evaluation: {exc}") from None
    if not ok:
        raise EvaluationRejected(
            realm_id, "its evaluation's proof does not verify against its public key share"
        )


def unlock_key(recovery: Recovery, evaluations: Mapping[int, bytes]) -> UnlockKey | None:
    """From exactly t verified evaluations {x_j: Z_j}: the unlock key, or None when the
    commitment does not match (a wrong password)."""
    descriptor = recovery.descriptor
    _check_indices(descriptor, evaluations)
    combined = shamir.combine_elements(evaluations)
    output = voprf.unblind_and_hash(recovery._access_key, recovery._blind, combined)
    commitment, key = _commitment_and_unlock_key(output, descriptor.version)
    if not hmac.compare_digest(commitment, descriptor.commitment):
        return None
    return UnlockKey(key)


def tag(key: UnlockKey, descriptor: Descriptor, realm_id: bytes) -> bytes:
    """tag_j, which realm j checks (against its tag_hash) before it releases its share."""
    _entry(descriptor, realm_id)
    return _tag(key._key, descriptor, realm_id)


def check_share(
    key: UnlockKey,
    descriptor: Descriptor,
    realm_id: bytes,
    encryption_share: bytes,
    share_mac: bytes,
    ciphertext: bytes,
) -> None:
    """Refuse (ShareRejected) a share, MAC or ciphertext other than the registered ones."""
    entry = _entry(descriptor, realm_id)
    expected = _share_mac(key._key, descriptor, entry, encryption_share, ciphertext)
    if not hmac.compare_digest(expected, share_mac):
        raise ShareRejected(realm_id, "its encryption share does not match its MAC")
    try:
        group.deserialize_scalar(encryption_share, "encryption share")
    except InvalidMessageError as exc:  # only the registrant could have MACed it
        raise ShareRejected(realm_id, str(exc)) from None


def open_secret(
    recovery: Recovery, shares: Mapping[int, bytes], ciphertext: bytes, descriptor: Descriptor
) -> bytes:
    """The slot secret, from exactly t checked encryption shares {x_j: e_j}."""
    _check_indices(descriptor, shares)
    if descriptor.hash != recovery.descriptor.hash:
        raise ValueError("the recovery was begun for another descriptor")
    e = shamir.combine_scalars(shares)
    key = _encryption_key(recovery._encryption_seed, e, descriptor.version)
    del e
    if len(ciphertext) != CIPHERTEXT_SIZE:
        raise SecretDoesNotOpen("the ciphertext has the wrong size")
    try:
        return AESGCM(key).decrypt(
            ciphertext[:NONCE_SIZE], ciphertext[NONCE_SIZE:], descriptor.hash
        )
    except InvalidTag:
        raise SecretDoesNotOpen(
            "the realms' shares do not open the ciphertext (they were not made together)"
        ) from None


def names_exactly(descriptor: Descriptor, realm_ids: Sequence[bytes | None]) -> bool:
    """Does D name exactly these realms (in any order)? A realm not pinned yet (None: it
    could not be asked for its id) stands for any one id D names beyond the pinned ones."""
    named = [entry.realm_id for entry in descriptor.realms]
    pinned = [realm_id for realm_id in realm_ids if realm_id is not None]
    return (
        len(named) == len(realm_ids)
        and len(set(pinned)) == len(pinned)
        and set(pinned) <= set(named)
    )


def _entry(descriptor: Descriptor, realm_id: bytes) -> RealmEntry:
    for entry in descriptor.realms:
        if entry.realm_id == realm_id:
            return entry
    raise RealmProtocolError(realm_id, "is not in this registration's descriptor")


def _check_indices(descriptor: Descriptor, values: Mapping[int, bytes]) -> None:
    indices = set(values)
    if len(values) != descriptor.threshold:
        raise ValueError(f"exactly {descriptor.threshold} shares are combined, not {len(values)}")
    if not indices <= {entry.index for entry in descriptor.realms}:
        raise ValueError("a share's index is not in the descriptor")
