"""RFC 9807 Appendix C (OPAQUE-3DH, ristretto255-SHA512): every output and intermediate,
byte for byte, through the deterministic path."""

from __future__ import annotations

from typing import Any

import pytest

from backvault.opaque import (
    KE1,
    KE2,
    KE3,
    IdentityKSF,
    OpaqueConfig,
    RegistrationRecord,
    RegistrationRequest,
    RegistrationResponse,
)
from backvault.opaque import testing as det
from tests.conftest import load_vectors

ALL = load_vectors("opaque-3dh-ristretto255-sha512.json")["vectors"]
REAL = [v for v in ALL if v["kind"] == "real"]
FAKE = [v for v in ALL if v["kind"] == "fake"]


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def config_for(vector: dict[str, Any]) -> OpaqueConfig:
    inputs = vector["inputs"]
    assert vector["config"]["KSF"] == "Identity"
    return OpaqueConfig(
        context=h(vector["config"]["Context"]),
        ksf=IdentityKSF(),
        client_identity=h(inputs["client_identity"]) if "client_identity" in inputs else None,
        server_identity=h(inputs["server_identity"]) if "server_identity" in inputs else None,
    )


def run_real_vector(vector: dict[str, Any]) -> dict[str, bytes]:
    """Runs registration and login with the vector's inputs; returns every value named in
    the vector (outputs and intermediates)."""
    i = {k: h(v) for k, v in vector["inputs"].items()}
    config = config_for(vector)
    got: dict[str, bytes] = {}
    trace: dict[str, bytes] = {}

    request = det.create_registration_request(i["password"], blind=i["blind_registration"])
    response = det.create_registration_response(
        request, i["server_public_key"], i["credential_identifier"], i["oprf_seed"], trace=trace
    )
    record, export_key_at_registration = det.finalize_registration_request(
        i["password"],
        i["blind_registration"],
        response,
        config,
        envelope_nonce=i["envelope_nonce"],
        trace=trace,
    )
    got.update(
        registration_request=request.to_bytes(),
        registration_response=response.to_bytes(),
        registration_upload=record.to_bytes(),
        client_public_key=record.client_public_key,
        envelope=record.envelope.to_bytes(),
    )

    ke1, client_state = det.generate_ke1(
        i["password"],
        blind=i["blind_login"],
        client_nonce=i["client_nonce"],
        client_keyshare_seed=i["client_keyshare_seed"],
    )
    server_trace: dict[str, bytes] = {}
    ke2, server_state = det.generate_ke2(
        config,
        i["server_private_key"],
        i["server_public_key"],
        record,
        i["credential_identifier"],
        i["oprf_seed"],
        ke1,
        masking_nonce=i["masking_nonce"],
        server_nonce=i["server_nonce"],
        server_keyshare_seed=i["server_keyshare_seed"],
        trace=server_trace,
    )
    client_trace: dict[str, bytes] = {}
    ke3, client_session_key, export_key = det.generate_ke3(
        client_state, ke2, config, trace=client_trace
    )
    server_session_key = det.server_finish(server_state, ke3)

    assert client_trace == server_trace, "both sides derive the same handshake keys"
    assert export_key == export_key_at_registration
    assert client_session_key == server_session_key
    got.update(trace)
    got.update(server_trace)
    got.update(
        KE1=ke1.to_bytes(),
        KE2=ke2.to_bytes(),
        KE3=ke3.to_bytes(),
        export_key=export_key,
        session_key=server_session_key,
    )
    return got


@pytest.mark.parametrize("vector", REAL, ids=lambda v: v["rfc9807_section"])
def test_rfc9807_real_vector_outputs(vector: dict[str, Any]) -> None:
    got = run_real_vector(vector)
    for name, expected in vector["outputs"].items():
        assert got[name].hex() == expected, name


@pytest.mark.parametrize("vector", REAL, ids=lambda v: v["rfc9807_section"])
def test_rfc9807_real_vector_intermediates(vector: dict[str, Any]) -> None:
    got = run_real_vector(vector)
    expected = {**vector["intermediates"], **vector["extra_intermediates_not_in_rfc"]}
    assert set(expected) <= set(got)
    for name, value in expected.items():
        assert got[name].hex() == value, name


@pytest.mark.parametrize("vector", REAL, ids=lambda v: v["rfc9807_section"])
def test_rfc9807_vector_messages_parse_back(vector: dict[str, Any]) -> None:
    outputs = vector["outputs"]
    for cls, name in [
        (RegistrationRequest, "registration_request"),
        (RegistrationResponse, "registration_response"),
        (RegistrationRecord, "registration_upload"),
        (KE1, "KE1"),
        (KE2, "KE2"),
        (KE3, "KE3"),
    ]:
        assert cls.from_bytes(h(outputs[name])).to_bytes().hex() == outputs[name]


@pytest.mark.parametrize("vector", FAKE, ids=lambda v: v["rfc9807_section"])
def test_rfc9807_fake_vector_ke2(vector: dict[str, Any]) -> None:
    i = {k: h(v) for k, v in vector["inputs"].items()}
    config = config_for(vector)
    record = det.fake_registration_record(i["client_public_key"], i["masking_key"])
    ke2, _ = det.generate_ke2(
        config,
        i["server_private_key"],
        i["server_public_key"],
        record,
        i["credential_identifier"],
        i["oprf_seed"],
        KE1.from_bytes(i["KE1"]),
        masking_nonce=i["masking_nonce"],
        server_nonce=i["server_nonce"],
        server_keyshare_seed=i["server_keyshare_seed"],
    )
    assert ke2.to_bytes().hex() == vector["outputs"]["KE2"]
