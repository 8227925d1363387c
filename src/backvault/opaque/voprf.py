"""The VOPRF of RFC 9497, mode modeVOPRF (0x01), suite ristretto255-SHA512.

A VOPRF is the OPRF of :mod:`.oprf` plus a DLEQ proof (RFC 9497 Section 2.2) that the server
evaluated with the private key of a public key the client already holds, so a server cannot
answer one client with another key (to tag or to partition clients) without being caught.
The threshold realms use it per share: every server proves its evaluation against its public
key share, and the client combines only evaluations whose proofs verify.

Pure functions over byte strings; randomness (blinds, the proof's random scalar) is a
parameter, so callers decide where it comes from (``group.random_scalar`` in production,
test vectors in tests). Every element and scalar received is checked (canonical, not the
identity, not zero) and refused with :class:`InvalidMessageError`; a proof that does not
verify never yields an output.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from backvault.opaque import group
from backvault.opaque.errors import InvalidMessageError, ProofVerificationError
from backvault.opaque.oprf import (
    Context,
    derive_key_pair_in,
    finalize_hash,
    input_element_in,
)

MODE_VOPRF = 0x01
VOPRF_CONTEXT = Context.for_mode(MODE_VOPRF)
CONTEXT_STRING = VOPRF_CONTEXT.context_string
PROOF_SIZE = 2 * group.SCALAR_SIZE  # c || s
OUTPUT_SIZE = 64  # Nh
_MAX_BATCH = 0xFFFF  # the composite transcript numbers elements with I2OSP(i, 2)
_GENERATOR = group.scalar_mult_base(group.scalar_from_public_int(1))


def derive_key_pair(seed: bytes, info: bytes) -> tuple[bytes, bytes]:
    """DeriveKeyPair (RFC 9497 Section 3.2.1) with the VOPRF mode's DST: (skS, pkS)."""
    return derive_key_pair_in(VOPRF_CONTEXT, seed, info)


def blind(voprf_input: bytes, blind_scalar: bytes) -> bytes:
    """Blind (RFC 9497 Section 3.3.2): r * HashToGroup(input), serialized."""
    group.deserialize_scalar(blind_scalar, "blind")
    return group.scalar_mult(blind_scalar, input_element_in(VOPRF_CONTEXT, voprf_input))


def _length_prefixed(value: bytes) -> bytes:
    return group.i2osp(len(value), 2) + value


def _checked_batch(cs: Sequence[bytes], ds: Sequence[bytes]) -> None:
    if not 1 <= len(cs) <= _MAX_BATCH:
        raise InvalidMessageError(f"a proof covers 1 to {_MAX_BATCH} elements, not {len(cs)}")
    if len(cs) != len(ds):
        raise InvalidMessageError(f"{len(cs)} blinded elements but {len(ds)} evaluated ones")
    for index, (c, d) in enumerate(zip(cs, ds, strict=True)):
        group.deserialize_element(c, f"blinded element {index}")
        group.deserialize_element(d, f"evaluated element {index}")


def _composite_weights(b: bytes, cs: Sequence[bytes], ds: Sequence[bytes]) -> list[bytes]:
    """The d_i of ComputeComposites (RFC 9497 Section 2.2.1): one hash-derived scalar per
    pair, bound to the public key B and to the whole pair, so that a batch proof is as strong
    as one proof per element."""
    seed = hashlib.sha512(_length_prefixed(b) + _length_prefixed(VOPRF_CONTEXT.seed_dst)).digest()
    weights = []
    for index, (c, d) in enumerate(zip(cs, ds, strict=True)):
        composite_transcript = (
            _length_prefixed(seed)
            + group.i2osp(index, 2)
            + _length_prefixed(c)
            + _length_prefixed(d)
            + b"Composite"
        )
        weights.append(group.hash_to_scalar(composite_transcript, VOPRF_CONTEXT.hash_to_scalar_dst))
    return weights


def _weighted_sum(weights: Sequence[bytes], elements: Sequence[bytes]) -> bytes:
    total = group.scalar_mult(weights[0], elements[0])
    for weight, element in zip(weights[1:], elements[1:], strict=True):
        total = group.element_add(total, group.scalar_mult(weight, element))
    return total


def _challenge(b: bytes, m: bytes, z: bytes, t2: bytes, t3: bytes) -> bytes:
    """The challenge c of GenerateProof/VerifyProof (RFC 9497 Section 2.2)."""
    transcript = b"".join(_length_prefixed(part) for part in (b, m, z, t2, t3)) + b"Challenge"
    return group.hash_to_scalar(transcript, VOPRF_CONTEXT.hash_to_scalar_dst)


def generate_proof(
    k: bytes, a: bytes, b: bytes, cs: Sequence[bytes], ds: Sequence[bytes], r: bytes
) -> bytes:
    """GenerateProof (RFC 9497 Section 2.2.1): a proof that B = k*A and D_i = k*C_i for all
    i, as the 64 bytes c || s. Uses ComputeCompositesFast (Z = k*M), which only the holder of
    k can compute. ``r`` must be fresh and secret for every proof: reusing it reveals k."""
    group.deserialize_scalar(k, "private key")
    group.deserialize_scalar(r, "proof random scalar")
    group.deserialize_element(a, "proof base A")
    group.deserialize_element(b, "proof public key B")
    _checked_batch(cs, ds)
    m = _weighted_sum(_composite_weights(b, cs, ds), cs)
    z = group.scalar_mult(k, m)
    t2 = group.scalar_mult(r, a)
    t3 = group.scalar_mult(r, m)
    c = _challenge(b, m, z, t2, t3)
    s = group.scalar_sub(r, group.scalar_mul(c, k))
    return c + s


def verify_proof(
    a: bytes, b: bytes, cs: Sequence[bytes], ds: Sequence[bytes], proof: bytes
) -> bool:
    """VerifyProof (RFC 9497 Section 2.2.2), with ComputeComposites (Z from the D_i).

    Returns False for a well-formed proof that does not verify; raises
    :class:`InvalidMessageError` for malformed input (a proof that is not two canonical,
    non-zero scalars; an identity or non-canonical element), which is just as much a refusal.
    """
    if len(proof) != PROOF_SIZE:
        raise InvalidMessageError(f"proof: expected {PROOF_SIZE} bytes, got {len(proof)}")
    c = group.deserialize_scalar(proof[: group.SCALAR_SIZE], "proof challenge c")
    s = group.deserialize_scalar(proof[group.SCALAR_SIZE :], "proof response s")
    group.deserialize_element(a, "proof base A")
    group.deserialize_element(b, "proof public key B")
    _checked_batch(cs, ds)
    weights = _composite_weights(b, cs, ds)
    m = _weighted_sum(weights, cs)
    z = _weighted_sum(weights, ds)
    t2 = group.element_add(group.scalar_mult(s, a), group.scalar_mult(c, b))
    t3 = group.element_add(group.scalar_mult(s, m), group.scalar_mult(c, z))
    return hmac.compare_digest(_challenge(b, m, z, t2, t3), c)


def blind_evaluate(
    private_key: bytes,
    public_key: bytes,
    blinded_elements: Sequence[bytes],
    proof_random_scalar: bytes,
) -> tuple[list[bytes], bytes]:
    """BlindEvaluate (RFC 9497 Section 3.3.2) of a batch: (skS * each element, one proof).

    Refuses a public key that is not skS*G, which could only produce proofs that fail."""
    group.deserialize_scalar(private_key, "private key")
    group.deserialize_element(public_key, "public key")
    if not hmac.compare_digest(group.scalar_mult_base(private_key), public_key):
        raise ValueError("the public key is not the private key's")
    if not 1 <= len(blinded_elements) <= _MAX_BATCH:
        raise InvalidMessageError(f"a batch holds 1 to {_MAX_BATCH} elements")
    evaluated = []
    for index, blinded in enumerate(blinded_elements):
        group.deserialize_element(blinded, f"blinded element {index}")
        evaluated.append(group.scalar_mult(private_key, blinded))
    proof = generate_proof(
        private_key, _GENERATOR, public_key, blinded_elements, evaluated, proof_random_scalar
    )
    return evaluated, proof


def unblind_and_hash(voprf_input: bytes, blind_scalar: bytes, evaluated_element: bytes) -> bytes:
    """The Finalize hash of RFC 9497 Section 3.3.2 WITHOUT the proof check.

    Only for an evaluated element whose correctness was established otherwise, such as a
    threshold evaluation combined from shares whose proofs were each verified against their
    public share; anything else must go through :func:`finalize`."""
    group.deserialize_scalar(blind_scalar, "blind")
    group.deserialize_element(evaluated_element, "evaluated element")
    unblinded = group.scalar_mult(group.scalar_inverse(blind_scalar), evaluated_element)
    return finalize_hash(voprf_input, unblinded)


def finalize_batch(
    inputs: Sequence[bytes],
    blinds: Sequence[bytes],
    evaluated_elements: Sequence[bytes],
    blinded_elements: Sequence[bytes],
    public_key: bytes,
    proof: bytes,
) -> list[bytes]:
    """Finalize (RFC 9497 Section 3.3.2) of a batch under one proof: verifies the proof,
    then unblinds and hashes each element; raises :class:`ProofVerificationError` (or
    :class:`InvalidMessageError` for malformed input) rather than return any output."""
    if not len(inputs) == len(blinds) == len(evaluated_elements) == len(blinded_elements):
        raise InvalidMessageError("inputs, blinds and elements differ in number")
    if not verify_proof(_GENERATOR, public_key, blinded_elements, evaluated_elements, proof):
        raise ProofVerificationError("the VOPRF proof does not verify for this public key")
    return [
        unblind_and_hash(voprf_input, blind_scalar, evaluated)
        for voprf_input, blind_scalar, evaluated in zip(
            inputs, blinds, evaluated_elements, strict=True
        )
    ]


def finalize(
    voprf_input: bytes,
    blind_scalar: bytes,
    evaluated_element: bytes,
    blinded_element: bytes,
    public_key: bytes,
    proof: bytes,
) -> bytes:
    """Finalize (RFC 9497 Section 3.3.2) of one element: :func:`finalize_batch` of one."""
    return finalize_batch(
        [voprf_input], [blind_scalar], [evaluated_element], [blinded_element], public_key, proof
    )[0]


def evaluate(private_key: bytes, voprf_input: bytes) -> bytes:
    """Evaluate (RFC 9497 Section 3.3.2): the output computed directly by the key holder,
    equal to what a client gets from Blind/BlindEvaluate/Finalize."""
    group.deserialize_scalar(private_key, "private key")
    evaluated = group.scalar_mult(private_key, input_element_in(VOPRF_CONTEXT, voprf_input))
    return finalize_hash(voprf_input, evaluated)
