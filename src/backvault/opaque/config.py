"""OPAQUE configuration: context string, optional identities, key-stretching function."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from argon2.low_level import Type, hash_secret_raw

from backvault.opaque.messages import HASH_SIZE

DEFAULT_CONTEXT = b"backvault OPAQUE-3DH ristretto255-SHA512 v1"


class KeyStretching(Protocol):
    """The KSF of RFC 9807 Section 2.3: Stretch(msg) -> Nh bytes."""

    @property
    def name(self) -> str: ...

    def stretch(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class IdentityKSF:
    """Stretch(x) = x, as in the RFC's test vectors. Never use it for real passwords."""

    name: str = "Identity"

    def stretch(self, data: bytes) -> bytes:
        return data


@dataclass(frozen=True)
class Argon2idKSF:
    """Argon2id (RFC 9106) with a fixed all-zero salt, as RFC 9807 Section 4.3 allows: the
    OPRF output it stretches is already unique per user and server.

    Defaults are RFC 9106's second recommended option ("memory-constrained": t=3, m=64 MiB,
    p=4), the profile the opaque-ke family ships.
    """

    time_cost: int = 3
    memory_cost_kib: int = 64 * 1024
    parallelism: int = 4
    salt: bytes = field(default=bytes(16))
    name: str = "Argon2id"

    def stretch(self, data: bytes) -> bytes:
        return hash_secret_raw(
            secret=data,
            salt=self.salt,
            time_cost=self.time_cost,
            memory_cost=self.memory_cost_kib,
            parallelism=self.parallelism,
            hash_len=HASH_SIZE,
            type=Type.ID,
        )


@dataclass(frozen=True)
class OpaqueConfig:
    """Everything both sides must agree on.

    ``client_identity``/``server_identity`` of None mean the RFC's default, the party's
    public key. ``context`` goes into the handshake preamble, binding each run to this
    deployment.
    """

    context: bytes = DEFAULT_CONTEXT
    ksf: KeyStretching = field(default_factory=Argon2idKSF)
    client_identity: bytes | None = None
    server_identity: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("client_identity", "server_identity"):
            value = getattr(self, name)
            if value is not None and not 0 < len(value) < 1 << 16:
                raise ValueError(f"{name} must be 1 to 65535 bytes")
        if len(self.context) >= 1 << 16:
            raise ValueError("context must be shorter than 65536 bytes")
