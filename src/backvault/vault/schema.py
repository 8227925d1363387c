"""The vault's tables (SQLAlchemy Core) and its migrations.

Every secret column holds sealed bytes only (see sealing.py). Migrations are numbered and
run in order inside one transaction; on PostgreSQL an advisory lock lets several nodes
start at once without racing.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

vault_keys = sa.Table(
    "vault_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sealed_oprf_seed", sa.LargeBinary, nullable=False),
    sa.Column("sealed_server_private_key", sa.LargeBinary, nullable=False),
    sa.Column("sealed_fake_record_seed", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

records = sa.Table(
    "records",
    metadata,
    sa.Column("account", sa.String(128), primary_key=True),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("sealed_payload", sa.LargeBinary, nullable=False),
    sa.Column("attempts_used", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

logins = sa.Table(
    "logins",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account", sa.String(128), nullable=False, index=True),
    sa.Column("generation", sa.Integer, nullable=False),  # -1: a fake login (no record)
    sa.Column("sealed_state", sa.LargeBinary, nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("account", sa.String(128), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("attempts_left", sa.Integer, nullable=True),
    sa.Column("detail", sa.String(200), nullable=False, default=""),
)


# Seals made under each sealing-key version, summed over every node (each node adds what
# it sealed at every sweep): AES-GCM with random nonces allows 2^32 per key version, and a
# version must not be destroyed while a node still seals under it (``updated_at``).
sealing_key_usage = sa.Table(
    "sealing_key_usage",
    metadata,
    sa.Column("key_version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seals", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[vault_keys, accounts, records, logins, audit])


def _v2(conn: Connection) -> None:
    metadata.create_all(conn, tables=[sealing_key_usage])
    # The retention sweep deletes audit rows by age.
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_audit_at ON audit (at)"))


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2]
CURRENT_VERSION = len(MIGRATIONS)


def migrate(engine: sa.Engine) -> int:
    """Bring the schema to the current version; returns the version it started from."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7462811)"))
        metadata.create_all(conn, tables=[schema_version])
        row = conn.execute(sa.select(schema_version.c.version)).first()
        start = row[0] if row else 0
        if start > CURRENT_VERSION:
            raise RuntimeError(
                f"the database schema is version {start}, newer than this vault "
                f"({CURRENT_VERSION}); upgrade backvault"
            )
        for number in range(start, CURRENT_VERSION):
            MIGRATIONS[number](conn)
        if row is None:
            conn.execute(schema_version.insert().values(version=CURRENT_VERSION))
        elif start != CURRENT_VERSION:
            conn.execute(schema_version.update().values(version=CURRENT_VERSION))
    return start
