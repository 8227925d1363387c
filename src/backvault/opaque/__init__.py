"""OPRF (RFC 9497, modeOPRF, ristretto255-SHA512) and OPAQUE-3DH (RFC 9807).

Pure functions and message types; no I/O. Use :mod:`.client` on the device and
:mod:`.server` in the vault. See docs/opaque.md.
"""

from backvault.opaque.config import Argon2idKSF, IdentityKSF, KeyStretching, OpaqueConfig
from backvault.opaque.errors import (
    AuthenticationError,
    ClientAuthenticationError,
    EnvelopeRecoveryError,
    InvalidMessageError,
    OpaqueError,
    ServerAuthenticationError,
)
from backvault.opaque.messages import (
    KE1,
    KE2,
    KE3,
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

__all__ = [
    "KE1",
    "KE2",
    "KE3",
    "Argon2idKSF",
    "AuthRequest",
    "AuthResponse",
    "AuthenticationError",
    "ClientAuthenticationError",
    "CredentialRequest",
    "CredentialResponse",
    "Envelope",
    "EnvelopeRecoveryError",
    "IdentityKSF",
    "InvalidMessageError",
    "KeyStretching",
    "OpaqueConfig",
    "OpaqueError",
    "RegistrationRecord",
    "RegistrationRequest",
    "RegistrationResponse",
    "ServerAuthenticationError",
    "ServerLoginState",
]
