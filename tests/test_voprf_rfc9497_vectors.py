"""RFC 9497 Appendix A.1.2 (ristretto255-SHA512, modeVOPRF), byte for byte, and the ways a
VOPRF evaluation must be refused: a tampered or foreign proof, a swapped evaluation, invalid
encodings."""

from __future__ import annotations

from typing import Any

import pytest

from backvault.opaque import group, oprf, voprf
from backvault.opaque.errors import InvalidMessageError, OpaqueError, ProofVerificationError
from tests.conftest import load_vectors

SUITE = load_vectors("voprf-ristretto255-sha512.json")
GENERATOR = group.scalar_mult_base(group.scalar_from_public_int(1))
SK = bytes.fromhex(SUITE["skSm"])
PK = bytes.fromhex(SUITE["pkSm"])
ORDER_BYTES = group.GROUP_ORDER.to_bytes(32, "little")
NON_CANONICAL_ELEMENT = bytes([0xFF] * 32)  # not a field element below p: never canonical
FIELD_PRIME = 2**255 - 19
# A valid encoding's field element s, written as p - s instead: the same point's "negative"
# representative, which ristretto255 decoding must refuse (RFC 9496 Section 4.3.1).
NEGATIVE_ENCODING = (FIELD_PRIME - int.from_bytes(PK, "little")).to_bytes(32, "little")
# s + p: not reduced modulo the field prime.
UNREDUCED_ENCODING = (int.from_bytes(bytes([0x01]) + bytes(31), "little") + FIELD_PRIME).to_bytes(
    32, "little"
)


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def as_list(value: str | list[str]) -> list[bytes]:
    return [h(item) for item in ([value] if isinstance(value, str) else value)]


VECTORS = SUITE["vectors"]
IDS = [v["rfc9497_section"] for v in VECTORS]


def test_rfc9497_context_string_depends_on_the_mode() -> None:
    assert h(SUITE["suite"]["contextString"]) == voprf.CONTEXT_STRING
    assert voprf.VOPRF_CONTEXT.hash_to_group_dst == b"HashToGroup-" + voprf.CONTEXT_STRING
    assert voprf.VOPRF_CONTEXT.hash_to_scalar_dst == b"HashToScalar-" + voprf.CONTEXT_STRING
    assert voprf.VOPRF_CONTEXT.seed_dst == b"Seed-" + voprf.CONTEXT_STRING
    assert voprf.CONTEXT_STRING != oprf.CONTEXT_STRING
    assert oprf.OPRF_CONTEXT.context_string == b"OPRFV1-\x00-ristretto255-SHA512"


def test_rfc9497_vector_derive_key_pair() -> None:
    private_key, public_key = voprf.derive_key_pair(h(SUITE["Seed"]), h(SUITE["KeyInfo"]))
    assert private_key.hex() == SUITE["skSm"]
    assert public_key.hex() == SUITE["pkSm"]
    # The mode is in the DST: the OPRF mode derives another key from the same seed.
    assert oprf.derive_key_pair(h(SUITE["Seed"]), h(SUITE["KeyInfo"]))[0] != private_key


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_rfc9497_vector_evaluation(vector: dict[str, Any]) -> None:
    inputs = as_list(vector["Input"])
    blinds = as_list(vector["Blind"])
    assert len(inputs) == vector["Batch"]
    blinded = [voprf.blind(i, b) for i, b in zip(inputs, blinds, strict=True)]
    assert blinded == as_list(vector["BlindedElement"])
    evaluated, proof = voprf.blind_evaluate(SK, PK, blinded, h(vector["ProofRandomScalar"]))
    assert evaluated == as_list(vector["EvaluationElement"])
    assert proof.hex() == vector["Proof"]
    assert voprf.verify_proof(GENERATOR, PK, blinded, evaluated, proof)
    outputs = voprf.finalize_batch(inputs, blinds, evaluated, blinded, PK, proof)
    assert outputs == as_list(vector["Output"])
    assert [voprf.evaluate(SK, i) for i in inputs] == outputs
    assert [
        voprf.unblind_and_hash(i, b, e) for i, b, e in zip(inputs, blinds, evaluated, strict=True)
    ] == outputs
    if vector["Batch"] == 1:
        output = voprf.finalize(inputs[0], blinds[0], evaluated[0], blinded[0], PK, proof)
        assert output.hex() == vector["Output"]


def test_rfc9497_vector_generate_proof_directly() -> None:
    vector = VECTORS[2]
    blinded = as_list(vector["BlindedElement"])
    evaluated = as_list(vector["EvaluationElement"])
    proof = voprf.generate_proof(
        SK, GENERATOR, PK, blinded, evaluated, h(vector["ProofRandomScalar"])
    )
    assert proof.hex() == vector["Proof"]


def _refused(
    blinded: list[bytes], evaluated: list[bytes], proof: bytes, public_key: bytes = PK
) -> bool:
    """True when VerifyProof refuses: False, or an invalid encoding (both are refusals)."""
    try:
        return not voprf.verify_proof(GENERATOR, public_key, blinded, evaluated, proof)
    except InvalidMessageError:
        return True


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_every_flipped_bit_of_the_proof_is_refused(vector: dict[str, Any]) -> None:
    blinded = as_list(vector["BlindedElement"])
    evaluated = as_list(vector["EvaluationElement"])
    inputs, blinds = as_list(vector["Input"]), as_list(vector["Blind"])
    proof = h(vector["Proof"])
    for position in range(voprf.PROOF_SIZE):
        for bit in (0x01, 0x80):
            tampered = bytearray(proof)
            tampered[position] ^= bit
            assert _refused(blinded, evaluated, bytes(tampered)), (position, bit)
            with pytest.raises(OpaqueError):
                voprf.finalize_batch(inputs, blinds, evaluated, blinded, PK, bytes(tampered))


def test_a_proof_for_another_public_key_is_refused() -> None:
    vector = VECTORS[0]
    blinded = as_list(vector["BlindedElement"])
    other_sk, other_pk = voprf.derive_key_pair(b"another seed", b"another key")
    evaluated, proof = voprf.blind_evaluate(other_sk, other_pk, blinded, group.random_scalar())
    assert voprf.verify_proof(GENERATOR, other_pk, blinded, evaluated, proof)
    assert _refused(blinded, evaluated, proof, public_key=PK)
    with pytest.raises(ProofVerificationError):
        voprf.finalize(h(vector["Input"]), h(vector["Blind"]), evaluated[0], blinded[0], PK, proof)


def test_a_swapped_evaluation_is_refused() -> None:
    vector = VECTORS[2]
    inputs, blinds = as_list(vector["Input"]), as_list(vector["Blind"])
    blinded = as_list(vector["BlindedElement"])
    evaluated = as_list(vector["EvaluationElement"])
    proof = h(vector["Proof"])
    swapped = list(reversed(evaluated))
    assert _refused(blinded, swapped, proof)
    with pytest.raises(ProofVerificationError):
        voprf.finalize_batch(inputs, blinds, swapped, blinded, PK, proof)
    # One element's evaluation presented with another's proof (vectors 1 and 2).
    single_1, single_2 = VECTORS[0], VECTORS[1]
    with pytest.raises(ProofVerificationError):
        voprf.finalize(
            h(single_1["Input"]),
            h(single_1["Blind"]),
            h(single_2["EvaluationElement"]),
            h(single_1["BlindedElement"]),
            PK,
            h(single_1["Proof"]),
        )
    # A correct element whose proof belongs to another evaluation.
    assert _refused(
        [h(single_1["BlindedElement"])], [h(single_1["EvaluationElement"])], h(single_2["Proof"])
    )


def test_a_batch_proof_does_not_cover_a_subset_or_a_reordering() -> None:
    vector = VECTORS[2]
    blinded = as_list(vector["BlindedElement"])
    evaluated = as_list(vector["EvaluationElement"])
    proof = h(vector["Proof"])
    assert _refused(blinded[:1], evaluated[:1], proof)
    assert _refused(blinded[::-1], evaluated[::-1], proof)


BAD_ELEMENTS = {
    "identity": bytes(32),
    "non-canonical": NON_CANONICAL_ELEMENT,
    "negative": NEGATIVE_ENCODING,
    "unreduced": UNREDUCED_ENCODING,
    "short": bytes(31),
    "long": bytes(33),
}

BAD_SCALARS = {
    "zero": bytes(32),
    "order": ORDER_BYTES,
    "unreduced": bytes([0xFF] * 32),
    "short": bytes(31),
}


@pytest.mark.parametrize("bad", list(BAD_ELEMENTS.values()), ids=list(BAD_ELEMENTS))
def test_invalid_elements_are_refused(bad: bytes) -> None:
    vector = VECTORS[0]
    blinded, evaluated = h(vector["BlindedElement"]), h(vector["EvaluationElement"])
    proof = h(vector["Proof"])
    inputs, blind = h(vector["Input"]), h(vector["Blind"])
    with pytest.raises(InvalidMessageError):
        voprf.blind_evaluate(SK, PK, [bad], group.random_scalar())
    with pytest.raises(InvalidMessageError):
        voprf.blind_evaluate(SK, bad, [blinded], group.random_scalar())
    with pytest.raises(InvalidMessageError):
        voprf.verify_proof(GENERATOR, PK, [bad], [evaluated], proof)
    with pytest.raises(InvalidMessageError):
        voprf.verify_proof(GENERATOR, PK, [blinded], [bad], proof)
    with pytest.raises(InvalidMessageError):
        voprf.verify_proof(GENERATOR, bad, [blinded], [evaluated], proof)
    with pytest.raises(InvalidMessageError):
        voprf.finalize(inputs, blind, bad, blinded, PK, proof)
    with pytest.raises(InvalidMessageError):
        voprf.finalize(inputs, blind, evaluated, blinded, bad, proof)
    with pytest.raises(InvalidMessageError):
        voprf.unblind_and_hash(inputs, blind, bad)
    with pytest.raises(InvalidMessageError):
        voprf.generate_proof(SK, GENERATOR, PK, [blinded], [bad], group.random_scalar())


@pytest.mark.parametrize("bad", list(BAD_SCALARS.values()), ids=list(BAD_SCALARS))
def test_invalid_scalars_are_refused(bad: bytes) -> None:
    vector = VECTORS[0]
    blinded, evaluated = h(vector["BlindedElement"]), h(vector["EvaluationElement"])
    proof = h(vector["Proof"])
    with pytest.raises(InvalidMessageError):
        voprf.blind(b"input", bad)
    with pytest.raises(InvalidMessageError):
        voprf.blind_evaluate(bad, PK, [blinded], group.random_scalar())
    with pytest.raises(InvalidMessageError):
        voprf.blind_evaluate(SK, PK, [blinded], bad)
    with pytest.raises(InvalidMessageError):
        voprf.evaluate(bad, b"input")
    with pytest.raises(InvalidMessageError):
        voprf.unblind_and_hash(b"input", bad, evaluated)
    if len(bad) == 32:
        for proof_with_bad_scalar in (bad + proof[32:], proof[:32] + bad):
            with pytest.raises(InvalidMessageError):
                voprf.verify_proof(GENERATOR, PK, [blinded], [evaluated], proof_with_bad_scalar)


def test_malformed_batches_and_proofs_are_refused() -> None:
    vector = VECTORS[2]
    blinded = as_list(vector["BlindedElement"])
    evaluated = as_list(vector["EvaluationElement"])
    proof = h(vector["Proof"])
    with pytest.raises(InvalidMessageError):
        voprf.verify_proof(GENERATOR, PK, blinded, evaluated[:1], proof)
    with pytest.raises(InvalidMessageError):
        voprf.verify_proof(GENERATOR, PK, [], [], proof)
    with pytest.raises(InvalidMessageError):
        voprf.verify_proof(GENERATOR, PK, blinded, evaluated, proof[:63])
    with pytest.raises(InvalidMessageError):
        voprf.blind_evaluate(SK, PK, [], group.random_scalar())
    with pytest.raises(InvalidMessageError):
        voprf.finalize_batch(as_list(vector["Input"]), [], evaluated, blinded, PK, proof)


def test_blind_evaluate_refuses_a_public_key_that_is_not_the_private_keys() -> None:
    _, other_pk = voprf.derive_key_pair(b"another seed", b"another key")
    with pytest.raises(ValueError, match="not the private key"):
        voprf.blind_evaluate(SK, other_pk, [h(VECTORS[0]["BlindedElement"])], group.random_scalar())


def test_fresh_randomness_round_trip() -> None:
    private_key, public_key = voprf.derive_key_pair(group.random_scalar(), b"round trip")
    blind = group.random_scalar()
    blinded = voprf.blind(b"password", blind)
    (evaluated,), proof = voprf.blind_evaluate(
        private_key, public_key, [blinded], group.random_scalar()
    )
    output = voprf.finalize(b"password", blind, evaluated, blinded, public_key, proof)
    assert output == voprf.evaluate(private_key, b"password")
    assert len(output) == voprf.OUTPUT_SIZE
    assert output != voprf.evaluate(private_key, b"passwore")
