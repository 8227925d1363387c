"""OPAQUE-3DH messages (RFC 9807 Sections 4, 5 and 6) for ristretto255-SHA512.

Each message serializes to, and parses from, the RFC's exact byte layout. Parsing checks
lengths and every group element (canonical, not the identity), and raises
:class:`~backvault.opaque.errors.InvalidMessageError` for anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from backvault.opaque import group
from backvault.opaque.errors import InvalidMessageError

NONCE_SIZE = 32  # Nn
SEED_SIZE = 32  # Nseed
HASH_SIZE = 64  # Nh
MAC_SIZE = 64  # Nm
PUBLIC_KEY_SIZE = 32  # Npk
PRIVATE_KEY_SIZE = 32  # Nsk
ELEMENT_SIZE = group.ELEMENT_SIZE  # Noe
ENVELOPE_SIZE = NONCE_SIZE + MAC_SIZE
MASKED_RESPONSE_SIZE = PUBLIC_KEY_SIZE + ENVELOPE_SIZE

# Field kinds: an int is opaque bytes of that length; ELEMENT is a group element that is
# validated on parse; a Message subclass is a nested message.
ELEMENT = "element"


class Message:
    """Fixed-layout message: subclasses list ``LAYOUT`` as (field name, kind) pairs."""

    LAYOUT: ClassVar[tuple[tuple[str, Any], ...]]

    @classmethod
    def size(cls) -> int:
        total = 0
        for _, kind in cls.LAYOUT:
            if kind == ELEMENT:
                total += ELEMENT_SIZE
            elif isinstance(kind, int):
                total += kind
            else:
                total += kind.size()
        return total

    def to_bytes(self) -> bytes:
        parts = []
        for name, kind in self.LAYOUT:
            value = getattr(self, name)
            parts.append(value.to_bytes() if isinstance(kind, type) else value)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidMessageError(f"{cls.__name__}: expected bytes")
        data = bytes(data)
        if len(data) != cls.size():
            raise InvalidMessageError(
                f"{cls.__name__}: expected {cls.size()} bytes, got {len(data)}"
            )
        values: dict[str, Any] = {}
        offset = 0
        for name, kind in cls.LAYOUT:
            if kind == ELEMENT:
                chunk = data[offset : offset + ELEMENT_SIZE]
                values[name] = group.deserialize_element(chunk, f"{cls.__name__}.{name}")
                offset += ELEMENT_SIZE
            elif isinstance(kind, int):
                values[name] = data[offset : offset + kind]
                offset += kind
            else:
                size = kind.size()
                values[name] = kind.from_bytes(data[offset : offset + size])
                offset += size
        return cls(**values)

    def _check(self) -> None:
        """Validate field sizes when a message is built in code rather than parsed."""
        for name, kind in self.LAYOUT:
            value = getattr(self, name)
            if isinstance(kind, int) or kind == ELEMENT:
                size = ELEMENT_SIZE if kind == ELEMENT else kind
                if not isinstance(value, bytes) or len(value) != size:
                    raise InvalidMessageError(
                        f"{type(self).__name__}.{name}: expected {size} bytes"
                    )
                if kind == ELEMENT:
                    group.deserialize_element(value, f"{type(self).__name__}.{name}")
            elif not isinstance(value, kind):
                raise InvalidMessageError(f"{type(self).__name__}.{name}: expected {kind.__name__}")

    def __post_init__(self) -> None:
        self._check()

    def __repr__(self) -> str:
        # Messages can carry MACs and masked secrets: show the size, never the contents.
        return f"{type(self).__name__}(<{self.size()} bytes>)"

    def __bytes__(self) -> bytes:
        return self.to_bytes()


@dataclass(frozen=True, repr=False)
class RegistrationRequest(Message):
    LAYOUT = (("blinded_message", ELEMENT),)
    blinded_message: bytes


@dataclass(frozen=True, repr=False)
class RegistrationResponse(Message):
    LAYOUT = (("evaluated_message", ELEMENT), ("server_public_key", ELEMENT))
    evaluated_message: bytes
    server_public_key: bytes


@dataclass(frozen=True, repr=False)
class Envelope(Message):
    LAYOUT = (("nonce", NONCE_SIZE), ("auth_tag", MAC_SIZE))
    nonce: bytes
    auth_tag: bytes


@dataclass(frozen=True, repr=False)
class RegistrationRecord(Message):
    LAYOUT = (("client_public_key", ELEMENT), ("masking_key", HASH_SIZE), ("envelope", Envelope))
    client_public_key: bytes
    masking_key: bytes
    envelope: Envelope

    def fingerprint(self) -> str:
        """A public name for this record (SHA-256, hex): the client that made it and the
        server that stores it compute the same, so the client can tell later whether the
        server still holds the record it registered. Reveals nothing usable: the record's
        secrets are hashed, and testing a password against them needs the OPRF key."""
        return hashlib.sha256(b"backvault record fingerprint v1\0" + self.to_bytes()).hexdigest()


@dataclass(frozen=True, repr=False)
class CredentialRequest(Message):
    LAYOUT = (("blinded_message", ELEMENT),)
    blinded_message: bytes


@dataclass(frozen=True, repr=False)
class CredentialResponse(Message):
    LAYOUT = (
        ("evaluated_message", ELEMENT),
        ("masking_nonce", NONCE_SIZE),
        ("masked_response", MASKED_RESPONSE_SIZE),
    )
    evaluated_message: bytes
    masking_nonce: bytes
    masked_response: bytes


@dataclass(frozen=True, repr=False)
class AuthRequest(Message):
    LAYOUT = (("client_nonce", NONCE_SIZE), ("client_public_keyshare", ELEMENT))
    client_nonce: bytes
    client_public_keyshare: bytes


@dataclass(frozen=True, repr=False)
class AuthResponse(Message):
    LAYOUT = (
        ("server_nonce", NONCE_SIZE),
        ("server_public_keyshare", ELEMENT),
        ("server_mac", MAC_SIZE),
    )
    server_nonce: bytes
    server_public_keyshare: bytes
    server_mac: bytes


@dataclass(frozen=True, repr=False)
class KE1(Message):
    LAYOUT = (("credential_request", CredentialRequest), ("auth_request", AuthRequest))
    credential_request: CredentialRequest
    auth_request: AuthRequest


@dataclass(frozen=True, repr=False)
class KE2(Message):
    LAYOUT = (("credential_response", CredentialResponse), ("auth_response", AuthResponse))
    credential_response: CredentialResponse
    auth_response: AuthResponse


@dataclass(frozen=True, repr=False)
class KE3(Message):
    LAYOUT = (("client_mac", MAC_SIZE),)
    client_mac: bytes


@dataclass(frozen=True, repr=False)
class ServerLoginState(Message):
    """What the server keeps between KE2 and KE3 (RFC 9807 Section 6.4.2's state).

    Secret: a vault stores it sealed and deletes it after one use.
    """

    LAYOUT = (("expected_client_mac", MAC_SIZE), ("session_key", HASH_SIZE))
    expected_client_mac: bytes
    session_key: bytes


ALL_MESSAGES: tuple[type[Message], ...] = (
    RegistrationRequest,
    RegistrationResponse,
    Envelope,
    RegistrationRecord,
    CredentialRequest,
    CredentialResponse,
    AuthRequest,
    AuthResponse,
    KE1,
    KE2,
    KE3,
    ServerLoginState,
)
