"""RFC 9497 Appendix A.1.1 (ristretto255-SHA512, modeOPRF), byte for byte."""

from __future__ import annotations

import pytest

from backvault.opaque import oprf
from tests.conftest import load_vectors

SUITE = load_vectors("oprf-ristretto255-sha512.json")


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def test_rfc9497_context_strings() -> None:
    assert h(SUITE["suite"]["contextString"]) == oprf.CONTEXT_STRING
    assert h(SUITE["suite"]["hashToGroupDST"]) == oprf.HASH_TO_GROUP_DST


def test_rfc9497_vector_derive_key_pair() -> None:
    private_key, public_key = oprf.derive_key_pair(h(SUITE["Seed"]), h(SUITE["KeyInfo"]))
    assert private_key.hex() == SUITE["skSm"]
    assert len(public_key) == 32


@pytest.mark.parametrize("vector", SUITE["vectors"], ids=lambda v: v["rfc9497_section"])
def test_rfc9497_vector_evaluation(vector: dict[str, str]) -> None:
    private_key = h(SUITE["skSm"])
    blinded = oprf.blind(h(vector["Input"]), h(vector["Blind"]))
    assert blinded.hex() == vector["BlindedElement"]
    evaluated = oprf.blind_evaluate(private_key, blinded)
    assert evaluated.hex() == vector["EvaluationElement"]
    output = oprf.finalize(h(vector["Input"]), h(vector["Blind"]), evaluated)
    assert output.hex() == vector["Output"]
