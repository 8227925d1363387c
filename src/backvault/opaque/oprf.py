"""The OPRF of RFC 9497, mode modeOPRF (0x00), suite ristretto255-SHA512.

Pure functions over byte strings; randomness (the blind) is a parameter so that the caller
decides where it comes from (``secrets`` in production, test vectors in tests).
"""

from __future__ import annotations

import hashlib

from backvault.opaque import group
from backvault.opaque.errors import InvalidMessageError

MODE_OPRF = 0x00
SUITE_ID = b"ristretto255-SHA512"
CONTEXT_STRING = b"OPRFV1-" + group.i2osp(MODE_OPRF, 1) + b"-" + SUITE_ID
HASH_TO_GROUP_DST = b"HashToGroup-" + CONTEXT_STRING
HASH_TO_SCALAR_DST = b"HashToScalar-" + CONTEXT_STRING
DERIVE_KEY_PAIR_DST = b"DeriveKeyPair" + CONTEXT_STRING
OUTPUT_SIZE = 64  # Nh


def derive_key_pair(seed: bytes, info: bytes) -> tuple[bytes, bytes]:
    """DeriveKeyPair (RFC 9497 Section 3.2.1): returns (private scalar, public element)."""
    derive_input = seed + group.i2osp(len(info), 2) + info
    for counter in range(256):
        private_key = group.hash_to_scalar(
            derive_input + group.i2osp(counter, 1), DERIVE_KEY_PAIR_DST
        )
        if any(private_key):
            return private_key, group.scalar_mult_base(private_key)
    raise InvalidMessageError("DeriveKeyPair: no non-zero scalar after 256 tries")


def blind(oprf_input: bytes, blind_scalar: bytes) -> bytes:
    """Blind (RFC 9497 Section 3.3.1): r * HashToGroup(input), serialized."""
    group.deserialize_scalar(blind_scalar, "blind")
    input_element = group.hash_to_group(oprf_input, HASH_TO_GROUP_DST)
    if input_element == bytes(group.ELEMENT_SIZE):
        raise InvalidMessageError("OPRF input hashes to the identity element")
    return group.scalar_mult(blind_scalar, input_element)


def blind_evaluate(private_key: bytes, blinded_element: bytes) -> bytes:
    """BlindEvaluate (RFC 9497 Section 3.3.1): skS * blindedElement, serialized."""
    group.deserialize_element(blinded_element, "blinded element")
    return group.scalar_mult(private_key, blinded_element)


def finalize(oprf_input: bytes, blind_scalar: bytes, evaluated_element: bytes) -> bytes:
    """Finalize (RFC 9497 Section 3.3.1): Hash(len||input||len||unblinded||"Finalize")."""
    group.deserialize_element(evaluated_element, "evaluated element")
    unblinded = group.scalar_mult(group.scalar_inverse(blind_scalar), evaluated_element)
    hash_input = (
        group.i2osp(len(oprf_input), 2)
        + oprf_input
        + group.i2osp(len(unblinded), 2)
        + unblinded
        + b"Finalize"
    )
    return hashlib.sha512(hash_input).digest()
