"""Deterministic entry points for test vectors and reproducible tests.

Production code must never import this module: it lets the caller choose nonces, seeds and
blinds, which in real use must come from ``secrets``. ``backvault.opaque.client`` and
``backvault.opaque.server`` offer no way to pass them. A test (tests/test_layers.py) checks
that nothing under ``src/`` imports this module.
"""

from __future__ import annotations

from backvault.opaque.protocol import (
    create_credential_response,
    create_registration_request,
    create_registration_response,
    derive_diffie_hellman_key_pair,
    derive_oprf_key,
    fake_registration_record,
    finalize_registration_request,
    generate_ke1,
    generate_ke2,
    generate_ke3,
    server_finish,
)

__all__ = [
    "create_credential_response",
    "create_registration_request",
    "create_registration_response",
    "derive_diffie_hellman_key_pair",
    "derive_oprf_key",
    "fake_registration_record",
    "finalize_registration_request",
    "generate_ke1",
    "generate_ke2",
    "generate_ke3",
    "server_finish",
]
