"""OPAQUE-3DH (RFC 9807) for ristretto255-SHA512: the protocol's functions, one per RFC
function, with every random input as an explicit keyword argument.

This module is the deterministic core. Applications use :mod:`backvault.opaque.client` and
:mod:`backvault.opaque.server`, which draw every nonce, seed and blind from ``secrets``;
tests reach the explicit inputs through :mod:`backvault.opaque.testing`.

``trace``, where accepted, collects the RFC's named intermediate values for test vectors.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from backvault.opaque import group, oprf
from backvault.opaque.config import OpaqueConfig
from backvault.opaque.errors import (
    ClientAuthenticationError,
    EnvelopeRecoveryError,
    InvalidMessageError,
    ServerAuthenticationError,
)
from backvault.opaque.messages import (
    HASH_SIZE,
    KE1,
    KE2,
    KE3,
    MAC_SIZE,
    MASKED_RESPONSE_SIZE,
    NONCE_SIZE,
    PUBLIC_KEY_SIZE,
    AuthRequest,
    AuthResponse,
    CredentialRequest,
    CredentialResponse,
    Envelope,
    RegistrationRecord,
    RegistrationRequest,
    RegistrationResponse,
    ServerLoginState,
)

Trace = dict[str, bytes] | None


# --- RFC 9807 Section 2: cryptographic dependencies -------------------------------------


def extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-512 (RFC 5869): HMAC(salt, ikm); an empty salt means Nh zeros."""
    return hmac.new(salt or bytes(HASH_SIZE), ikm, hashlib.sha512).digest()


def expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-512 (RFC 5869), from ``cryptography``."""
    return HKDFExpand(hashes.SHA512(), length, info).derive(prk)


def mac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha512).digest()


def derive_diffie_hellman_key_pair(seed: bytes) -> tuple[bytes, bytes]:
    """DeriveDiffieHellmanKeyPair (RFC 9807 Section 6.4.1)."""
    return oprf.derive_key_pair(seed, b"OPAQUE-DeriveDiffieHellmanKeyPair")


def derive_oprf_key(oprf_seed: bytes, credential_identifier: bytes) -> bytes:
    """The per-credential OPRF key of CreateRegistrationResponse/CreateCredentialResponse."""
    seed = expand(oprf_seed, credential_identifier + b"OprfKey", group.SCALAR_SIZE)
    private_key, _ = oprf.derive_key_pair(seed, b"OPAQUE-DeriveKeyPair")
    return private_key


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _length_prefixed(data: bytes) -> bytes:
    return group.i2osp(len(data), 2) + data


# --- Section 4: client credential storage (envelope) ------------------------------------


@dataclass(frozen=True)
class CleartextCredentials:
    server_public_key: bytes
    server_identity: bytes
    client_identity: bytes

    def to_bytes(self) -> bytes:
        return (
            self.server_public_key
            + _length_prefixed(self.server_identity)
            + _length_prefixed(self.client_identity)
        )


def create_cleartext_credentials(
    server_public_key: bytes, client_public_key: bytes, config: OpaqueConfig
) -> CleartextCredentials:
    """CreateCleartextCredentials (Section 4.1.2): identities default to public keys."""
    return CleartextCredentials(
        server_public_key=server_public_key,
        server_identity=config.server_identity or server_public_key,
        client_identity=config.client_identity or client_public_key,
    )


def _envelope_keys(randomized_password: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    auth_key = expand(randomized_password, nonce + b"AuthKey", HASH_SIZE)
    export_key = expand(randomized_password, nonce + b"ExportKey", HASH_SIZE)
    seed = expand(randomized_password, nonce + b"PrivateKey", group.SCALAR_SIZE)
    return auth_key, export_key, seed


def store(
    randomized_password: bytes,
    server_public_key: bytes,
    config: OpaqueConfig,
    *,
    envelope_nonce: bytes,
    trace: Trace = None,
) -> tuple[Envelope, bytes, bytes, bytes]:
    """Store (Section 4.1.2): returns (envelope, client_public_key, masking_key, export_key)."""
    masking_key = expand(randomized_password, b"MaskingKey", HASH_SIZE)
    auth_key, export_key, seed = _envelope_keys(randomized_password, envelope_nonce)
    _, client_public_key = derive_diffie_hellman_key_pair(seed)
    credentials = create_cleartext_credentials(server_public_key, client_public_key, config)
    auth_tag = mac(auth_key, envelope_nonce + credentials.to_bytes())
    if trace is not None:
        trace.update(auth_key=auth_key, masking_key=masking_key)
    return Envelope(envelope_nonce, auth_tag), client_public_key, masking_key, export_key


def recover(
    randomized_password: bytes,
    server_public_key: bytes,
    envelope: Envelope,
    config: OpaqueConfig,
) -> tuple[bytes, CleartextCredentials, bytes]:
    """Recover (Section 4.1.3): (client_private_key, cleartext_credentials, export_key)."""
    auth_key, export_key, seed = _envelope_keys(randomized_password, envelope.nonce)
    client_private_key, client_public_key = derive_diffie_hellman_key_pair(seed)
    credentials = create_cleartext_credentials(server_public_key, client_public_key, config)
    expected_tag = mac(auth_key, envelope.nonce + credentials.to_bytes())
    if not hmac.compare_digest(envelope.auth_tag, expected_tag):
        raise EnvelopeRecoveryError("the envelope does not open: wrong password")
    return client_private_key, credentials, export_key


def _randomized_password(
    password: bytes, blind: bytes, evaluated_message: bytes, config: OpaqueConfig
) -> bytes:
    oprf_output = oprf.finalize(password, blind, evaluated_message)
    return extract(b"", oprf_output + config.ksf.stretch(oprf_output))


# --- Section 5: registration -------------------------------------------------------------


def create_registration_request(password: bytes, *, blind: bytes) -> RegistrationRequest:
    """CreateRegistrationRequest (Section 5.2.1); the caller keeps ``blind``."""
    return RegistrationRequest(oprf.blind(password, blind))


def create_registration_response(
    request: RegistrationRequest,
    server_public_key: bytes,
    credential_identifier: bytes,
    oprf_seed: bytes,
    *,
    trace: Trace = None,
) -> RegistrationResponse:
    """CreateRegistrationResponse (Section 5.2.2)."""
    oprf_key = derive_oprf_key(oprf_seed, credential_identifier)
    if trace is not None:
        trace["oprf_key"] = oprf_key
    evaluated = oprf.blind_evaluate(oprf_key, request.blinded_message)
    return RegistrationResponse(evaluated, server_public_key)


def finalize_registration_request(
    password: bytes,
    blind: bytes,
    response: RegistrationResponse,
    config: OpaqueConfig,
    *,
    envelope_nonce: bytes,
    trace: Trace = None,
) -> tuple[RegistrationRecord, bytes]:
    """FinalizeRegistrationRequest (Section 5.2.3): returns (record, export_key)."""
    randomized_password = _randomized_password(password, blind, response.evaluated_message, config)
    envelope, client_public_key, masking_key, export_key = store(
        randomized_password,
        response.server_public_key,
        config,
        envelope_nonce=envelope_nonce,
        trace=trace,
    )
    if trace is not None:
        trace["randomized_password"] = randomized_password
    return RegistrationRecord(client_public_key, masking_key, envelope), export_key


# --- Section 6: online authenticated key exchange ----------------------------------------


@dataclass(frozen=True)
class ClientLoginState:
    """What the client keeps between KE1 and KE2 (Section 6.4.2). Secret; memory only."""

    password: bytes
    blind: bytes
    client_secret: bytes
    ke1: KE1

    def __repr__(self) -> str:
        return "ClientLoginState(<secret>)"


def generate_ke1(
    password: bytes, *, blind: bytes, client_nonce: bytes, client_keyshare_seed: bytes
) -> tuple[KE1, ClientLoginState]:
    """GenerateKE1 (Section 6.4.3): CreateCredentialRequest + AuthClientStart."""
    credential_request = CredentialRequest(oprf.blind(password, blind))
    client_secret, client_public_keyshare = derive_diffie_hellman_key_pair(client_keyshare_seed)
    ke1 = KE1(credential_request, AuthRequest(client_nonce, client_public_keyshare))
    return ke1, ClientLoginState(password, blind, client_secret, ke1)


def create_credential_response(
    request: CredentialRequest,
    server_public_key: bytes,
    record: RegistrationRecord,
    credential_identifier: bytes,
    oprf_seed: bytes,
    *,
    masking_nonce: bytes,
) -> CredentialResponse:
    """CreateCredentialResponse (Section 6.3.2.2)."""
    oprf_key = derive_oprf_key(oprf_seed, credential_identifier)
    evaluated = oprf.blind_evaluate(oprf_key, request.blinded_message)
    pad = expand(record.masking_key, masking_nonce + b"CredentialResponsePad", MASKED_RESPONSE_SIZE)
    masked = _xor(pad, server_public_key + record.envelope.to_bytes())
    return CredentialResponse(evaluated, masking_nonce, masked)


def _preamble(
    config: OpaqueConfig,
    credentials: CleartextCredentials,
    ke1: KE1,
    credential_response: CredentialResponse,
    server_nonce: bytes,
    server_public_keyshare: bytes,
) -> bytes:
    """Preamble (Section 6.4.1)."""
    return (
        b"OPAQUEv1-"
        + _length_prefixed(config.context)
        + _length_prefixed(credentials.client_identity)
        + ke1.to_bytes()
        + _length_prefixed(credentials.server_identity)
        + credential_response.to_bytes()
        + server_nonce
        + server_public_keyshare
    )


def _expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    full_label = b"OPAQUE-" + label
    custom = (
        group.i2osp(length, 2)
        + group.i2osp(len(full_label), 1)
        + full_label
        + group.i2osp(len(context), 1)
        + context
    )
    return expand(secret, custom, length)


def _derive_keys(ikm: bytes, preamble: bytes, trace: Trace) -> tuple[bytes, bytes, bytes]:
    """DeriveKeys (Section 6.4.2): (Km2, Km3, session_key)."""
    prk = extract(b"", ikm)
    preamble_hash = hashlib.sha512(preamble).digest()
    handshake_secret = _expand_label(prk, b"HandshakeSecret", preamble_hash, HASH_SIZE)
    session_key = _expand_label(prk, b"SessionKey", preamble_hash, HASH_SIZE)
    km2 = _expand_label(handshake_secret, b"ServerMAC", b"", HASH_SIZE)
    km3 = _expand_label(handshake_secret, b"ClientMAC", b"", HASH_SIZE)
    if trace is not None:
        trace.update(handshake_secret=handshake_secret, server_mac_key=km2, client_mac_key=km3)
    return km2, km3, session_key


def generate_ke2(
    config: OpaqueConfig,
    server_private_key: bytes,
    server_public_key: bytes,
    record: RegistrationRecord,
    credential_identifier: bytes,
    oprf_seed: bytes,
    ke1: KE1,
    *,
    masking_nonce: bytes,
    server_nonce: bytes,
    server_keyshare_seed: bytes,
    trace: Trace = None,
) -> tuple[KE2, ServerLoginState]:
    """GenerateKE2 (Section 6.4.3): CreateCredentialResponse + AuthServerRespond."""
    credential_response = create_credential_response(
        ke1.credential_request,
        server_public_key,
        record,
        credential_identifier,
        oprf_seed,
        masking_nonce=masking_nonce,
    )
    credentials = create_cleartext_credentials(server_public_key, record.client_public_key, config)
    server_secret, server_public_keyshare = derive_diffie_hellman_key_pair(server_keyshare_seed)
    preamble = _preamble(
        config, credentials, ke1, credential_response, server_nonce, server_public_keyshare
    )
    client_keyshare = ke1.auth_request.client_public_keyshare
    ikm = (
        group.scalar_mult(server_secret, client_keyshare)
        + group.scalar_mult(server_private_key, client_keyshare)
        + group.scalar_mult(server_secret, record.client_public_key)
    )
    km2, km3, session_key = _derive_keys(ikm, preamble, trace)
    server_mac = mac(km2, hashlib.sha512(preamble).digest())
    expected_client_mac = mac(km3, hashlib.sha512(preamble + server_mac).digest())
    ke2 = KE2(credential_response, AuthResponse(server_nonce, server_public_keyshare, server_mac))
    return ke2, ServerLoginState(expected_client_mac, session_key)


def fake_registration_record(client_public_key: bytes, masking_key: bytes) -> RegistrationRecord:
    """The record a server uses for an unknown credential identifier (Section 10.9): a
    random client key and masking key and an all-zero envelope."""
    return RegistrationRecord(
        client_public_key,
        masking_key,
        Envelope(bytes(NONCE_SIZE), bytes(MAC_SIZE)),
    )


def generate_ke3(
    state: ClientLoginState, ke2: KE2, config: OpaqueConfig, *, trace: Trace = None
) -> tuple[KE3, bytes, bytes]:
    """GenerateKE3 (Section 6.4.3): RecoverCredentials + AuthClientFinalize.

    Returns (ke3, session_key, export_key).
    """
    response = ke2.credential_response
    randomized_password = _randomized_password(
        state.password, state.blind, response.evaluated_message, config
    )
    masking_key = expand(randomized_password, b"MaskingKey", HASH_SIZE)
    pad = expand(
        masking_key, response.masking_nonce + b"CredentialResponsePad", MASKED_RESPONSE_SIZE
    )
    unmasked = _xor(pad, response.masked_response)
    server_public_key_bytes = unmasked[:PUBLIC_KEY_SIZE]
    try:
        server_public_key = group.deserialize_element(server_public_key_bytes)
    except InvalidMessageError as exc:
        # A wrong password unmasks garbage: report it as what it is.
        raise EnvelopeRecoveryError("the envelope does not open: wrong password") from exc
    envelope = Envelope.from_bytes(unmasked[PUBLIC_KEY_SIZE:])
    client_private_key, credentials, export_key = recover(
        randomized_password, server_public_key, envelope, config
    )
    auth = ke2.auth_response
    ikm = (
        group.scalar_mult(state.client_secret, auth.server_public_keyshare)
        + group.scalar_mult(state.client_secret, server_public_key)
        + group.scalar_mult(client_private_key, auth.server_public_keyshare)
    )
    preamble = _preamble(
        config,
        credentials,
        state.ke1,
        response,
        auth.server_nonce,
        auth.server_public_keyshare,
    )
    km2, km3, session_key = _derive_keys(ikm, preamble, trace)
    expected_server_mac = mac(km2, hashlib.sha512(preamble).digest())
    if not hmac.compare_digest(auth.server_mac, expected_server_mac):
        raise ServerAuthenticationError("the server's KE2 MAC does not verify")
    client_mac = mac(km3, hashlib.sha512(preamble + expected_server_mac).digest())
    return KE3(client_mac), session_key, export_key


def server_finish(state: ServerLoginState, ke3: KE3) -> bytes:
    """ServerFinish (Section 6.4.4): returns session_key once KE3 verifies."""
    if not hmac.compare_digest(ke3.client_mac, state.expected_client_mac):
        raise ClientAuthenticationError("the client's KE3 MAC does not verify")
    return state.session_key
