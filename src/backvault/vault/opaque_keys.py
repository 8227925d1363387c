"""The vault's long-term OPAQUE keys: the OPRF seed, the server's AKE key pair and the seed
of the fake records (answers for accounts without one). Made once, by the first node to
start, and kept sealed in the database (table vault_keys); every node opens the same ones."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from backvault.opaque import server as opaque_server
from backvault.vault.schema import vault_keys
from backvault.vault.sealing import Sealer

log = logging.getLogger("backvault.vault")

# Held while the first node creates the keys, so that two nodes starting at once agree.
_KEYS_LOCK = 7462812


@dataclass(frozen=True)
class OpaqueKeys:
    oprf_seed: bytes
    server: opaque_server.ServerKeyPair
    fake_record_seed: bytes

    def __repr__(self) -> str:
        return f"OpaqueKeys(server={self.server!r})"


def load_or_create_keys(
    engine: sa.Engine, sealer: Sealer, clock: Callable[[], float]
) -> OpaqueKeys:
    """The vault's keys, opened from the database, or made and sealed there if it has none."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_KEYS_LOCK})"))
        row = conn.execute(sa.select(vault_keys).where(vault_keys.c.id == 1)).first()
        if row is None:
            keys = opaque_server.generate_server_key_pair()
            seed = opaque_server.generate_oprf_seed()
            fake_seed = secrets.token_bytes(32)
            conn.execute(
                vault_keys.insert().values(
                    id=1,
                    sealed_oprf_seed=sealer.seal(seed, b"vault:oprf-seed"),
                    sealed_server_private_key=sealer.seal(
                        keys.private_key, b"vault:server-private-key"
                    ),
                    sealed_fake_record_seed=sealer.seal(fake_seed, b"vault:fake-seed"),
                    created_at=clock(),
                )
            )
            log.info("created the vault's OPRF seed and server key pair (sealed)")
        else:
            seed = sealer.open(row.sealed_oprf_seed, b"vault:oprf-seed")
            keys = opaque_server.server_key_pair_from_private_key(
                sealer.open(row.sealed_server_private_key, b"vault:server-private-key")
            )
            fake_seed = sealer.open(row.sealed_fake_record_seed, b"vault:fake-seed")
    return OpaqueKeys(seed, keys, fake_seed)
