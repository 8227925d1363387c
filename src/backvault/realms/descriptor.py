"""The public descriptor of a realm registration (docs/realms.md, "Descriptor D"): what
every realm stores identically, and the only source of t, the indices and the public key
shares a client uses. Pure: encoding, decoding and the rules a descriptor must keep."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from backvault.opaque import group
from backvault.opaque.errors import InvalidMessageError

SUITE = b"backvault-realms-v1:ristretto255-SHA512:VOPRF:Argon2id-t3-m65536-p4"
MAGIC = b"BVRD"
DESCRIPTOR_VERSION = 1
VERSION_SIZE = 16  # a registration's random version
REALM_ID_SIZE = 16
COMMITMENT_SIZE = 32
MAX_REALMS = 16
MAX_USER_ID = 1024  # bytes of UTF-8


class DescriptorError(InvalidMessageError):
    """A descriptor that does not decode exactly or breaks a rule of the suite."""


def check_threshold(threshold: int, realms: int) -> None:
    """t > n/2 (two disjoint quorums cannot both act) and t ≥ 2 (one realm is never
    enough), 2 ≤ n ≤ MAX_REALMS."""
    if not 2 <= realms <= MAX_REALMS:
        raise DescriptorError(f"{realms} realms: use between 2 and {MAX_REALMS}")
    if threshold < 2 or threshold > realms or 2 * threshold <= realms:
        raise DescriptorError(
            f"a threshold of {threshold} of {realms} realms is refused: it must be more than "
            f"half of them and at least 2 (for {realms} realms: {realms // 2 + 1} or more)"
        )


@dataclass(frozen=True)
class RealmEntry:
    realm_id: bytes  # 16 bytes
    index: int  # Shamir index x_j, 1..n
    public_share: bytes  # pk_j = k_j·G


@dataclass(frozen=True)
class Descriptor:
    version: bytes
    user_id: str
    threshold: int
    allowed_guesses: int  # G_r, the same at every realm
    commitment: bytes
    realms: tuple[RealmEntry, ...]

    def __post_init__(self) -> None:
        validate(self)

    def encode(self) -> bytes:
        user = self.user_id.encode()
        out = [
            MAGIC,
            group.i2osp(DESCRIPTOR_VERSION, 1),
            _lp(SUITE),
            self.version,
            _lp(user),
            group.i2osp(self.threshold, 1),
            group.i2osp(len(self.realms), 1),
            group.i2osp(self.allowed_guesses, 2),
            self.commitment,
        ]
        for realm in self.realms:
            out += [realm.realm_id, group.i2osp(realm.index, 1), realm.public_share]
        return b"".join(out)

    @property
    def hash(self) -> bytes:
        """descriptor_hash = SHA-256(D): what realms' answers are grouped by, and the
        AEAD's associated data."""
        return hashlib.sha256(self.encode()).digest()

    def entry(self, realm_id: bytes) -> RealmEntry:
        for realm in self.realms:
            if realm.realm_id == realm_id:
                return realm
        raise DescriptorError(f"realm {realm_id.hex()} is not in this registration")


def validate(d: Descriptor) -> None:
    if len(d.version) != VERSION_SIZE:
        raise DescriptorError(f"the version must be {VERSION_SIZE} bytes")
    user = d.user_id.encode()
    if not user or len(user) > MAX_USER_ID:
        raise DescriptorError("the user id must be 1 to 1024 bytes of UTF-8")
    check_threshold(d.threshold, len(d.realms))
    if not 1 <= d.allowed_guesses <= 0xFFFF:
        raise DescriptorError("the allowed guesses per realm must be 1 to 65535")
    if len(d.commitment) != COMMITMENT_SIZE:
        raise DescriptorError(f"the commitment must be {COMMITMENT_SIZE} bytes")
    seen = set()
    for position, realm in enumerate(d.realms, start=1):
        if len(realm.realm_id) != REALM_ID_SIZE:
            raise DescriptorError(f"realm ids are {REALM_ID_SIZE} bytes")
        if realm.realm_id in seen:
            raise DescriptorError(f"realm {realm.realm_id.hex()} appears twice")
        seen.add(realm.realm_id)
        if realm.index != position:
            raise DescriptorError("the realms' indices must be 1..n in order")
        try:
            group.deserialize_element(realm.public_share, "public key share")
        except InvalidMessageError as exc:
            raise DescriptorError(str(exc)) from None


def decode(data: bytes) -> Descriptor:
    """The descriptor in ``data``, which must encode exactly one valid descriptor of this
    suite (DescriptorError otherwise)."""
    reader = _Reader(data)
    if reader.take(len(MAGIC)) != MAGIC or reader.take(1)[0] != DESCRIPTOR_VERSION:
        raise DescriptorError("not a version 1 realm descriptor")
    if reader.take_lp() != SUITE:
        raise DescriptorError("the descriptor names another suite")
    version = reader.take(VERSION_SIZE)
    try:
        user_id = reader.take_lp().decode()
    except UnicodeDecodeError:
        raise DescriptorError("the user id is not UTF-8") from None
    threshold, count = reader.take(1)[0], reader.take(1)[0]
    allowed = int.from_bytes(reader.take(2), "big")
    commitment = reader.take(COMMITMENT_SIZE)
    if count > MAX_REALMS:
        raise DescriptorError(f"{count} realms: at most {MAX_REALMS}")
    realms = tuple(
        RealmEntry(
            reader.take(REALM_ID_SIZE),
            reader.take(1)[0],
            reader.take(group.ELEMENT_SIZE),
        )
        for _ in range(count)
    )
    if not reader.done():
        raise DescriptorError("trailing bytes after the descriptor")
    descriptor = Descriptor(version, user_id, threshold, allowed, commitment, realms)
    if descriptor.encode() != data:  # one encoding only
        raise DescriptorError("the descriptor is not in its canonical encoding")
    return descriptor


def _lp(value: bytes) -> bytes:
    return group.i2osp(len(value), 2) + value


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise DescriptorError("the descriptor is truncated")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def take_lp(self) -> bytes:
        return self.take(int.from_bytes(self.take(2), "big"))

    def done(self) -> bool:
        return self.at == len(self.data)
