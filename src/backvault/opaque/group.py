"""ristretto255 group operations (libsodium) and the hash-to-group/scalar maps of RFC 9497.

Every group operation goes through libsodium; this module only adds the encoding checks the
RFCs require (canonical, non-identity elements; canonical, non-zero scalars) and
``expand_message_xmd`` of RFC 9380 Section 5.3.1, which is a construction over SHA-512, not a
primitive of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import pysodium

from backvault.opaque.errors import InvalidMessageError

ELEMENT_SIZE = 32  # Noe
SCALAR_SIZE = 32  # Nok / Nsk
# The prime order of the ristretto255 group (RFC 9496 Section 4.1).
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
_IDENTITY = bytes(ELEMENT_SIZE)
_ZERO_SCALAR = bytes(SCALAR_SIZE)
_SHA512_BLOCK = 128
_SHA512_SIZE = 64


def i2osp(value: int, length: int) -> bytes:
    """Integer to big-endian octet string of exactly ``length`` bytes (RFC 8017)."""
    if value < 0 or value >= 1 << (8 * length):
        raise ValueError(f"{value} does not fit in {length} bytes")
    return value.to_bytes(length, "big")


def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """expand_message_xmd with SHA-512 (RFC 9380 Section 5.3.1)."""
    ell = -(-length // _SHA512_SIZE)
    if ell > 255 or length > 65535 or len(dst) > 255:
        raise ValueError("expand_message_xmd: requested length or DST too long")
    dst_prime = dst + i2osp(len(dst), 1)
    msg_prime = bytes(_SHA512_BLOCK) + msg + i2osp(length, 2) + b"\x00" + dst_prime
    b0 = hashlib.sha512(msg_prime).digest()
    blocks = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, blocks[-1], strict=True))
        blocks.append(hashlib.sha512(mixed + i2osp(i, 1) + dst_prime).digest())
    return b"".join(blocks)[:length]


def hash_to_group(msg: bytes, dst: bytes) -> bytes:
    """hash_to_ristretto255 (RFC 9380 Appendix B): 64 uniform bytes through the one-way map."""
    return bytes(pysodium.crypto_core_ristretto255_from_hash(expand_message_xmd(msg, dst, 64)))


def hash_to_scalar(msg: bytes, dst: bytes) -> bytes:
    """HashToScalar of RFC 9497 Section 4.1: 64 uniform bytes, little-endian, mod the order."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_reduce(expand_message_xmd(msg, dst, 64)))


def deserialize_element(data: bytes, what: str = "element") -> bytes:
    """Check an encoded element: 32 bytes, canonical, on the group, not the identity."""
    if len(data) != ELEMENT_SIZE:
        raise InvalidMessageError(f"{what}: expected {ELEMENT_SIZE} bytes, got {len(data)}")
    if data == _IDENTITY:
        raise InvalidMessageError(f"{what}: the identity element is not allowed")
    if not pysodium.crypto_core_ristretto255_is_valid_point(data):
        raise InvalidMessageError(f"{what}: not a canonical ristretto255 encoding")
    return bytes(data)


def deserialize_scalar(data: bytes, what: str = "scalar") -> bytes:
    """Check an encoded scalar: 32 bytes, little-endian, in [1, order - 1]."""
    if len(data) != SCALAR_SIZE:
        raise InvalidMessageError(f"{what}: expected {SCALAR_SIZE} bytes, got {len(data)}")
    # Scalars are often secret (keys, blinds, key shares): the checks go through libsodium
    # and constant-time comparisons rather than Python integers. Reducing data || 0^32 gives
    # data mod the order, which equals data exactly when data is reduced.
    reduced = bytes(pysodium.crypto_core_ristretto255_scalar_reduce(bytes(data) + _ZERO_SCALAR))
    if not hmac.compare_digest(reduced, bytes(data)):
        raise InvalidMessageError(f"{what}: not reduced modulo the group order")
    if hmac.compare_digest(reduced, _ZERO_SCALAR):
        raise InvalidMessageError(f"{what}: the zero scalar is not allowed")
    return bytes(data)


def random_scalar() -> bytes:
    """A uniformly random non-zero scalar, from ``secrets``."""
    while True:
        scalar = bytes(pysodium.crypto_core_ristretto255_scalar_reduce(secrets.token_bytes(64)))
        if any(scalar):
            return scalar


def scalar_mult(scalar: bytes, element: bytes) -> bytes:
    """scalar * element; libsodium refuses an identity result, which we report as invalid."""
    try:
        return bytes(pysodium.crypto_scalarmult_ristretto255(scalar, element))
    except ValueError as exc:
        raise InvalidMessageError("scalar multiplication gave the identity element") from exc


def scalar_mult_base(scalar: bytes) -> bytes:
    try:
        return bytes(pysodium.crypto_scalarmult_ristretto255_base(scalar))
    except ValueError as exc:
        raise InvalidMessageError("scalar multiplication gave the identity element") from exc


def scalar_inverse(scalar: bytes) -> bytes:
    try:
        return bytes(pysodium.crypto_core_ristretto255_scalar_invert(scalar))
    except ValueError as exc:
        raise InvalidMessageError("the zero scalar has no inverse") from exc


def scalar_from_public_int(value: int) -> bytes:
    """A public integer (a Shamir index, a counter) as a scalar; never use it for secrets,
    whose arithmetic must stay inside libsodium."""
    if isinstance(value, bool) or not 0 <= value < GROUP_ORDER:
        raise ValueError(f"{value!r} is not an integer in [0, order)")
    return value.to_bytes(SCALAR_SIZE, "little")


def scalar_add(a: bytes, b: bytes) -> bytes:
    """a + b mod the order (libsodium, constant time)."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_add(a, b))


def scalar_sub(a: bytes, b: bytes) -> bytes:
    """a - b mod the order (libsodium, constant time)."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_sub(a, b))


def scalar_mul(a: bytes, b: bytes) -> bytes:
    """a * b mod the order (libsodium, constant time)."""
    return bytes(pysodium.crypto_core_ristretto255_scalar_mul(a, b))


def element_add(p: bytes, q: bytes) -> bytes:
    """p + q in the group (libsodium); the identity is a possible result, encoded as zeros."""
    try:
        return bytes(pysodium.crypto_core_ristretto255_add(p, q))
    except ValueError as exc:
        raise InvalidMessageError("element addition: not a ristretto255 encoding") from exc
