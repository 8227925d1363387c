"""The server side of OPAQUE-3DH, with every random input drawn from ``secrets``, and the
fake records (RFC 9807 Section 10.9) that answer for credential identifiers without one."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from backvault.opaque import group, protocol
from backvault.opaque.config import OpaqueConfig
from backvault.opaque.messages import (
    HASH_SIZE,
    KE1,
    KE2,
    KE3,
    NONCE_SIZE,
    SEED_SIZE,
    RegistrationRecord,
    RegistrationRequest,
    RegistrationResponse,
    ServerLoginState,
)


@dataclass(frozen=True)
class ServerKeyPair:
    private_key: bytes
    public_key: bytes

    def __repr__(self) -> str:
        return f"ServerKeyPair(public_key={self.public_key.hex()})"


def generate_server_key_pair() -> ServerKeyPair:
    """The server's long-term AKE key pair (RFC 9807 Section 6.4.1, from a random seed)."""
    private_key, public_key = protocol.derive_diffie_hellman_key_pair(
        secrets.token_bytes(SEED_SIZE)
    )
    return ServerKeyPair(private_key, public_key)


def server_key_pair_from_private_key(private_key: bytes) -> ServerKeyPair:
    group.deserialize_scalar(private_key, "server private key")
    return ServerKeyPair(private_key, group.scalar_mult_base(private_key))


def generate_oprf_seed() -> bytes:
    """The server's OPRF seed (Nh random bytes) from which per-user OPRF keys derive."""
    return secrets.token_bytes(HASH_SIZE)


def create_registration_response(
    request: RegistrationRequest,
    server_public_key: bytes,
    credential_identifier: bytes,
    oprf_seed: bytes,
) -> RegistrationResponse:
    """RFC 9807 CreateRegistrationResponse (deterministic by design)."""
    return protocol.create_registration_response(
        request, server_public_key, credential_identifier, oprf_seed
    )


def generate_ke2(
    config: OpaqueConfig,
    server_keys: ServerKeyPair,
    record: RegistrationRecord,
    credential_identifier: bytes,
    oprf_seed: bytes,
    ke1: KE1,
) -> tuple[KE2, ServerLoginState]:
    """RFC 9807 GenerateKE2."""
    return protocol.generate_ke2(
        config,
        server_keys.private_key,
        server_keys.public_key,
        record,
        credential_identifier,
        oprf_seed,
        ke1,
        masking_nonce=secrets.token_bytes(NONCE_SIZE),
        server_nonce=secrets.token_bytes(NONCE_SIZE),
        server_keyshare_seed=secrets.token_bytes(SEED_SIZE),
    )


def generate_fake_ke2(
    config: OpaqueConfig,
    server_keys: ServerKeyPair,
    credential_identifier: bytes,
    oprf_seed: bytes,
    ke1: KE1,
) -> tuple[KE2, ServerLoginState]:
    """KE2 for a credential identifier with no record (RFC 9807 Section 10.9): looks like a
    real answer, so responses do not reveal which accounts exist. KE3 never verifies."""
    _, fake_client_public_key = protocol.derive_diffie_hellman_key_pair(
        secrets.token_bytes(SEED_SIZE)
    )
    record = protocol.fake_registration_record(
        fake_client_public_key, secrets.token_bytes(HASH_SIZE)
    )
    return generate_ke2(config, server_keys, record, credential_identifier, oprf_seed, ke1)


def stable_fake_record(fake_record_seed: bytes, credential_identifier: bytes) -> RegistrationRecord:
    """The fake record of ``credential_identifier``: the same one at every call (derived from
    a secret seed of the server's), as RFC 9807 Section 10.9 recommends, so that repeated
    logins to an identifier without a record do not give its absence away by changing."""
    seed = hmac.new(fake_record_seed, credential_identifier, hashlib.sha512).digest()
    _, fake_client_public_key = protocol.derive_diffie_hellman_key_pair(seed[:SEED_SIZE])
    return protocol.fake_registration_record(fake_client_public_key, seed)


def generate_stable_fake_ke2(
    config: OpaqueConfig,
    server_keys: ServerKeyPair,
    fake_record_seed: bytes,
    credential_identifier: bytes,
    oprf_seed: bytes,
    ke1: KE1,
) -> tuple[KE2, ServerLoginState]:
    """KE2 under the stable fake record of ``credential_identifier`` (stable_fake_record).
    KE3 never verifies. The caller chooses an identifier no real record ever has, so that
    this path is no oracle under a real record's OPRF key."""
    record = stable_fake_record(fake_record_seed, credential_identifier)
    return generate_ke2(config, server_keys, record, credential_identifier, oprf_seed, ke1)


def server_finish(state: ServerLoginState, ke3: KE3) -> bytes:
    """RFC 9807 ServerFinish: the session key, or ClientAuthenticationError."""
    return protocol.server_finish(state, ke3)
