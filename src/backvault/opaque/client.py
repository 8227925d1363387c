"""The client side of OPAQUE-3DH, with every random input drawn from ``secrets``."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from backvault.opaque import group, protocol
from backvault.opaque.config import OpaqueConfig
from backvault.opaque.messages import (
    KE1,
    KE2,
    KE3,
    NONCE_SIZE,
    SEED_SIZE,
    RegistrationRecord,
    RegistrationRequest,
    RegistrationResponse,
)
from backvault.opaque.protocol import ClientLoginState


@dataclass(frozen=True)
class ClientRegistrationState:
    """What the client keeps between its registration request and the server's response."""

    password: bytes
    blind: bytes

    def __repr__(self) -> str:
        return "ClientRegistrationState(<secret>)"


@dataclass(frozen=True)
class LoginResult:
    ke3: KE3
    session_key: bytes
    export_key: bytes

    def __repr__(self) -> str:
        return "LoginResult(<secret>)"


def create_registration_request(
    password: bytes,
) -> tuple[RegistrationRequest, ClientRegistrationState]:
    """RFC 9807 CreateRegistrationRequest."""
    blind = group.random_scalar()
    request = protocol.create_registration_request(password, blind=blind)
    return request, ClientRegistrationState(password, blind)


def finalize_registration_request(
    state: ClientRegistrationState, response: RegistrationResponse, config: OpaqueConfig
) -> tuple[RegistrationRecord, bytes]:
    """RFC 9807 FinalizeRegistrationRequest: returns (record to upload, export_key)."""
    return protocol.finalize_registration_request(
        state.password,
        state.blind,
        response,
        config,
        envelope_nonce=secrets.token_bytes(NONCE_SIZE),
    )


def generate_ke1(password: bytes) -> tuple[KE1, ClientLoginState]:
    """RFC 9807 GenerateKE1."""
    return protocol.generate_ke1(
        password,
        blind=group.random_scalar(),
        client_nonce=secrets.token_bytes(NONCE_SIZE),
        client_keyshare_seed=secrets.token_bytes(SEED_SIZE),
    )


def generate_ke3(state: ClientLoginState, ke2: KE2, config: OpaqueConfig) -> LoginResult:
    """RFC 9807 GenerateKE3. Raises EnvelopeRecoveryError on a wrong password."""
    ke3, session_key, export_key = protocol.generate_ke3(state, ke2, config)
    return LoginResult(ke3, session_key, export_key)


__all__ = [
    "ClientLoginState",
    "ClientRegistrationState",
    "LoginResult",
    "create_registration_request",
    "finalize_registration_request",
    "generate_ke1",
    "generate_ke3",
]
