"""Exceptions of the OPAQUE/OPRF library.

Every rejection of malformed protocol input raises :class:`InvalidMessageError`, so callers
(the vault's HTTP layer, the client) can map it to one clear error without inspecting text.
"""


class OpaqueError(Exception):
    """Base class of every error raised by :mod:`backvault.opaque`."""


class InvalidMessageError(OpaqueError, ValueError):
    """Input bytes are not a valid encoding: wrong length, non-canonical or identity element,
    out-of-range or zero scalar."""


class AuthenticationError(OpaqueError):
    """A MAC did not verify: wrong password, a tampered message, or a replay."""


class EnvelopeRecoveryError(AuthenticationError):
    """The client could not open its envelope (RFC 9807 Section 4.1.3): almost always a wrong
    password, or a response that the server (or someone between) tampered with."""


class ServerAuthenticationError(AuthenticationError):
    """The server's MAC in KE2 is wrong (RFC 9807 Section 6.4.4)."""


class ClientAuthenticationError(AuthenticationError):
    """The client's MAC in KE3 is wrong (RFC 9807 Section 6.4.3): wrong password or replay."""


class ProofVerificationError(OpaqueError):
    """A VOPRF DLEQ proof (RFC 9497 Section 2.2) did not verify: the evaluation was not made
    with the private key of the public key the client holds, so its output is refused."""
