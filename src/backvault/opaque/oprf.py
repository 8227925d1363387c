"""The OPRF of RFC 9497, mode modeOPRF (0x00), suite ristretto255-SHA512.

Pure functions over byte strings; randomness (the blind) is a parameter so that the caller
decides where it comes from (``secrets`` in production, test vectors in tests).

The mode-independent steps (DeriveKeyPair, hashing the input to the group, the Finalize hash)
take a :class:`Context`, so that :mod:`.voprf` (modeVOPRF, 0x01) shares them with only its
own context string and domain separation tags.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from backvault.opaque import group
from backvault.opaque.errors import InvalidMessageError

MODE_OPRF = 0x00
SUITE_ID = b"ristretto255-SHA512"
OUTPUT_SIZE = 64  # Nh


@dataclass(frozen=True)
class Context:
    """The strings RFC 9497 derives from the protocol mode (Sections 3.1, 3.2.1, 2.2, 4.1).

    Every hash of the protocol is domain-separated by the mode, so an OPRF and a VOPRF
    evaluation under the same key never share a hash input; building them all here from the
    mode keeps the two modes from drifting apart.
    """

    mode: int
    context_string: bytes
    hash_to_group_dst: bytes
    hash_to_scalar_dst: bytes
    derive_key_pair_dst: bytes
    seed_dst: bytes

    @classmethod
    def for_mode(cls, mode: int) -> Context:
        context_string = b"OPRFV1-" + group.i2osp(mode, 1) + b"-" + SUITE_ID
        return cls(
            mode=mode,
            context_string=context_string,
            hash_to_group_dst=b"HashToGroup-" + context_string,
            hash_to_scalar_dst=b"HashToScalar-" + context_string,
            derive_key_pair_dst=b"DeriveKeyPair" + context_string,
            seed_dst=b"Seed-" + context_string,
        )


OPRF_CONTEXT = Context.for_mode(MODE_OPRF)
CONTEXT_STRING = OPRF_CONTEXT.context_string
HASH_TO_GROUP_DST = OPRF_CONTEXT.hash_to_group_dst
HASH_TO_SCALAR_DST = OPRF_CONTEXT.hash_to_scalar_dst
DERIVE_KEY_PAIR_DST = OPRF_CONTEXT.derive_key_pair_dst


def derive_key_pair_in(context: Context, seed: bytes, info: bytes) -> tuple[bytes, bytes]:
    """DeriveKeyPair (RFC 9497 Section 3.2.1) in the given mode: (private scalar, public
    element)."""
    derive_input = seed + group.i2osp(len(info), 2) + info
    for counter in range(256):
        private_key = group.hash_to_scalar(
            derive_input + group.i2osp(counter, 1), context.derive_key_pair_dst
        )
        if any(private_key):
            return private_key, group.scalar_mult_base(private_key)
    raise InvalidMessageError("DeriveKeyPair: no non-zero scalar after 256 tries")


def input_element_in(context: Context, oprf_input: bytes) -> bytes:
    """HashToGroup(input) in the given mode, refusing the identity (RFC 9497 Section 3.3.1:
    an input that maps to the identity would make every key give the same output)."""
    input_element = group.hash_to_group(oprf_input, context.hash_to_group_dst)
    if input_element == bytes(group.ELEMENT_SIZE):
        raise InvalidMessageError("OPRF input hashes to the identity element")
    return input_element


def finalize_hash(oprf_input: bytes, unblinded_element: bytes) -> bytes:
    """The Finalize/Evaluate hash (RFC 9497 Section 3.3.1), the same in every mode:
    Hash(len||input||len||unblinded||"Finalize")."""
    hash_input = (
        group.i2osp(len(oprf_input), 2)
        + oprf_input
        + group.i2osp(len(unblinded_element), 2)
        + unblinded_element
        + b"Finalize"
    )
    return hashlib.sha512(hash_input).digest()


def derive_key_pair(seed: bytes, info: bytes) -> tuple[bytes, bytes]:
    """DeriveKeyPair (RFC 9497 Section 3.2.1): returns (private scalar, public element)."""
    return derive_key_pair_in(OPRF_CONTEXT, seed, info)


def blind(oprf_input: bytes, blind_scalar: bytes) -> bytes:
    """Blind (RFC 9497 Section 3.3.1): r * HashToGroup(input), serialized."""
    group.deserialize_scalar(blind_scalar, "blind")
    return group.scalar_mult(blind_scalar, input_element_in(OPRF_CONTEXT, oprf_input))


def blind_evaluate(private_key: bytes, blinded_element: bytes) -> bytes:
    """BlindEvaluate (RFC 9497 Section 3.3.1): skS * blindedElement, serialized."""
    group.deserialize_element(blinded_element, "blinded element")
    return group.scalar_mult(private_key, blinded_element)


def finalize(oprf_input: bytes, blind_scalar: bytes, evaluated_element: bytes) -> bytes:
    """Finalize (RFC 9497 Section 3.3.1): Hash(len||input||len||unblinded||"Finalize")."""
    group.deserialize_element(evaluated_element, "evaluated element")
    unblinded = group.scalar_mult(group.scalar_inverse(blind_scalar), evaluated_element)
    return finalize_hash(oprf_input, unblinded)
