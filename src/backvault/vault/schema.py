"""The vault's tables (SQLAlchemy Core) and its migrations.

Every secret column holds sealed bytes only (see sealing/). Migrations are numbered and
run in order inside one transaction; on PostgreSQL an advisory lock lets several nodes
start at once without racing. ``_v1`` creates the tables as they are defined now, except
``records``, which it creates as version 1 had it; later migrations add only what an older
database lacks, so they hold whichever version a database starts from.
"""

from __future__ import annotations

import secrets
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

# Account names as stored in records, logins and audit: a built-in name (up to 128
# characters) or "jwt:" and a JWT subject (up to 128).
ACCOUNT_KEY = sa.String(160)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("token_expires_at", sa.Float, nullable=True),  # None: never
    sa.Column("token_revoked_at", sa.Float, nullable=True),
)

records = sa.Table(
    "records",
    metadata,
    sa.Column("account", ACCOUNT_KEY, primary_key=True),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("sealed_payload", sa.LargeBinary, nullable=False),
    sa.Column("attempts_used", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # The account name the record's OPRF credential identifier was derived from, when it
    # is not ``account``: records made by a JWT subject before the namespaces were
    # separated keep their bare name here after `vault migrate-jwt-records`.
    sa.Column("credential_name", sa.String(128), nullable=True),
    # 1: a record from before per-registration credential identifiers (its OPRF key
    # derives from the account name; kept for login only); 2: the sealed payload starts
    # with the record's own random credential identifier.
    sa.Column("credential_format", sa.Integer, nullable=False, server_default="1"),
    # SHA-256 over the OPAQUE record, which the registering client computes too: how it
    # tells that the record is still the one it registered. Public, like the record's
    # existence.
    sa.Column("fingerprint", sa.String(64), nullable=True),
    sa.Column("last_success_at", sa.Float, nullable=True),
)

logins = sa.Table(
    "logins",
    metadata,
    # SHA-256 of the login id (hex): the id is the client's proof of its attempt, so a
    # reader of the database cannot finish or spoil a pending login, nor claim it.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account", ACCOUNT_KEY, nullable=False, index=True),
    sa.Column("generation", sa.Integer, nullable=False),  # -1: a fake login (no record)
    sa.Column("sealed_state", sa.LargeBinary, nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

# A registration in progress: the fresh credential identifier its start evaluated the OPRF
# under, sealed, until the finish that presents the handle (whose SHA-256 is the id).
registrations = sa.Table(
    "registrations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account", ACCOUNT_KEY, nullable=False, index=True),
    sa.Column("sealed_state", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    # Who started it (the address, truncated if the vault truncates addresses): a flood
    # of starts from one place pushes out only that place's own registrations.
    sa.Column("client", sa.String(64), nullable=False, server_default=""),
)

# Every login attempt on a record, kept while the record lives: what a success may
# forgive (only attempts whose login id the succeeding client presents) and what the
# rolling cap counts. The id is the SHA-256 of the login id, which is the client's proof.
attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account", ACCOUNT_KEY, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=True),
    # pending, failed, expired or succeeded
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("forgiven", sa.Boolean, nullable=False, default=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Index("attempts_by_account", "account", "generation", "started_at"),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("account", ACCOUNT_KEY, nullable=False, index=True),
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


# Every sealing-key version the vault made (or, once, adopted), with the key's check value
# (sealing/): nodes use only keys whose version is recorded here with a matching check
# value, so a key planted in the HSM or the key folder is never used. Rows are never
# deleted: a destroyed version keeps its number, which is never made again.
sealing_key_versions = sa.Table(
    "sealing_key_versions",
    metadata,
    sa.Column("key_version", sa.BigInteger, primary_key=True, autoincrement=False),
    # hex; NULL while a rotation that reserved the version has not made its key yet
    sa.Column("check_value", sa.String(64), nullable=True),
    # "created", "first start" (the one key found at the first start) or "adopted" (values
    # were sealed under it before versions were recorded)
    sa.Column("origin", sa.String(16), nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.Column("destroyed_at", sa.Float, nullable=True),
    # hex: the vouch for this version (sealing.VOUCH_CONTEXT), sealed under the key of the
    # lower version that vouches for it (its own, for the first version); NULL in records
    # from before vouches, until the next start chains them (key_versions.py)
    sa.Column("vouch", sa.String(200), nullable=True),
)


# --- realms (docs/realms.md) ---------------------------------------------------------

# The realm id: 16 random bytes made once, at the first start that needs it (one row).
realm_identity = sa.Table(
    "realm_identity",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("realm_id", sa.String(32), nullable=False),  # lower-case hex
    sa.Column("created_at", sa.Float, nullable=False),
)

# One realm registration per account: the one it holds now, or the tombstone of an erased
# one (state "erased": the version, the counts, every secret column NULL). The key share
# and the encryption share are sealed; the descriptor, tag hash, share MAC and ciphertext
# are kept in clear (docs/realms.md, "Registration"). ``registration`` is the identity the
# realm made for it (16 random bytes, hex): the version is the client's choice, so what an
# unlock may forgive is tied to this instead.
realm_registrations = sa.Table(
    "realm_registrations",
    metadata,
    sa.Column("account", ACCOUNT_KEY, primary_key=True),
    sa.Column("version", sa.String(32), nullable=False),  # lower-case hex of 16 bytes
    # Made by the realm at registration (nullable only because ``_v9`` adds it); never NULL
    # in a row this code writes.
    sa.Column("registration", sa.String(32), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),  # registered or erased
    sa.Column("descriptor", sa.LargeBinary, nullable=True),
    # NULL once the last allowed evaluation erased it (or the registration was erased)
    sa.Column("sealed_key_share", sa.LargeBinary, nullable=True),
    sa.Column("tag_hash", sa.LargeBinary, nullable=True),
    sa.Column("sealed_encryption_share", sa.LargeBinary, nullable=True),
    sa.Column("share_mac", sa.LargeBinary, nullable=True),
    sa.Column("ciphertext", sa.LargeBinary, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("allowed", sa.Integer, nullable=False),  # G_r, from the descriptor
    # Set when the key share is erased: phase 3 is answered until then, then the sweep
    # (or the next request) leaves a tombstone.
    sa.Column("window_ends_at", sa.Float, nullable=True, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Every counted evaluation: what an unlock may forgive (only ids its client presents, of
# this account and of the registration identity the unlock's registration has) and what
# the rolling cap counts. The id is the SHA-256 (hex) of the attempt id given to the
# client, which is the client's proof.
realm_attempts = sa.Table(
    "realm_attempts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("account", ACCOUNT_KEY, nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    # realm_registrations.registration of the registration evaluated; NULL only for
    # attempts from before ``_v9`` that no current registration can claim (never forgiven).
    sa.Column("registration", sa.String(32), nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("forgiven", sa.Boolean, nullable=False, default=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Index("realm_attempts_by_account", "account", "started_at"),
)

# Every version an account has registered at this realm: a registration under one of them
# is refused (409 version_reused), so that no registration can pass for an earlier one.
# Kept while the version's attempts are (or the account's row names it, or it was
# registered within the cap's window); deleting the registration does not remove it.
realm_used_versions = sa.Table(
    "realm_used_versions",
    metadata,
    sa.Column("account", ACCOUNT_KEY, primary_key=True),
    sa.Column("version", sa.String(32), primary_key=True),  # lower-case hex of 16 bytes
    sa.Column("registered_at", sa.Float, nullable=False),
)


def _v1(conn: Connection) -> None:
    # The records table as version 1 made it (version 2 adds columns).
    records_v1 = sa.Table(
        "records",
        sa.MetaData(),
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("sealed_payload", sa.LargeBinary, nullable=False),
        sa.Column("attempts_used", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    metadata.create_all(conn, tables=[vault_keys, accounts, logins, audit])
    records_v1.create(conn)


def _add_missing_columns(conn: Connection, table: sa.Table, names: list[str]) -> None:
    present = {column["name"] for column in sa.inspect(conn).get_columns(table.name)}
    for name in names:
        if name in present:
            continue
        column = table.c[name]
        kind = column.type.compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


def _v2_credential_identifiers(conn: Connection) -> None:
    """Per-registration credential identifiers (the OPRF key of a record is its own),
    pending registrations, and the attempt history behind forgiveness and the cap."""
    present = {column["name"] for column in sa.inspect(conn).get_columns("records")}
    if "credential_format" not in present:
        # Every record that exists now derives its OPRF key from its account name.
        conn.execute(
            sa.text("ALTER TABLE records ADD COLUMN credential_format INTEGER NOT NULL DEFAULT 1")
        )
    _add_missing_columns(conn, records, ["fingerprint", "last_success_at"])
    metadata.create_all(conn, tables=[registrations, attempts])


def _v3_account_tokens(conn: Connection) -> None:
    """Built-in tokens that expire and can be revoked."""
    _add_missing_columns(conn, accounts, ["token_expires_at", "token_revoked_at"])


def _v4_jwt_namespace(conn: Connection) -> None:
    """JWT subjects are stored as "jwt:SUBJECT": account columns grow to fit the prefix
    (SQLite does not enforce VARCHAR lengths), and a record moved out of the shared
    namespace remembers the name its credential identifier came from."""
    if conn.dialect.name == "postgresql":
        for table in (records, logins, audit):
            conn.execute(
                sa.text(f"ALTER TABLE {table.name} ALTER COLUMN account TYPE VARCHAR(160)")
            )
    _add_missing_columns(conn, records, ["credential_name"])


def _v5_sealing_key_usage(conn: Connection) -> None:
    """Seals counted per sealing-key version (the GCM nonce bound), and an index for the
    audit retention sweep."""
    metadata.create_all(conn, tables=[sealing_key_usage])
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_audit_at ON audit (at)"))


def _v6_sealing_key_versions(conn: Connection) -> None:
    """The sealing-key versions the vault made. Empty after this migration: the next start
    adopts the versions values are sealed under (key_versions.py)."""
    # The table as this migration made it (``_v7`` adds the vouch).
    sa.Table(
        "sealing_key_versions",
        sa.MetaData(),
        sa.Column("key_version", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("check_value", sa.String(64), nullable=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.Float, nullable=False),
        sa.Column("destroyed_at", sa.Float, nullable=True),
    ).create(conn, checkfirst=True)


def _v7_sealing_key_vouches(conn: Connection) -> None:
    """Each sealing-key version vouched for by the key of the version before it. Records
    from before have none: the next start chains them (key_versions.py)."""
    _add_missing_columns(conn, sealing_key_versions, ["vouch"])


def _v8_realms(conn: Connection) -> None:
    """Realm mode (docs/realms.md): the realm id, realm registrations and their attempts."""
    metadata.create_all(conn, tables=[realm_identity, realm_registrations, realm_attempts])


def _v9_realm_registration_identity(conn: Connection) -> None:
    """Realm registrations get an identity the realm makes, attempts name it, and the
    versions each account used are kept (docs/realms.md, "Registration")."""
    _add_missing_columns(conn, realm_registrations, ["registration"])
    _add_missing_columns(conn, realm_attempts, ["registration"])
    metadata.create_all(conn, tables=[realm_used_versions])
    held = conn.execute(
        sa.select(
            realm_registrations.c.account,
            realm_registrations.c.version,
            realm_registrations.c.created_at,
        ).where(realm_registrations.c.registration.is_(None))
    ).all()
    for account, version, created_at in held:
        made = secrets.token_hex(16)
        conn.execute(
            realm_registrations.update()
            .where(realm_registrations.c.account == account)
            .values(registration=made)
        )
        # A registration's row is (re)written with created_at = now, so attempts older
        # than that under the same version belong to an earlier registration: they stay
        # unclaimed, and no unlock can forgive them.
        conn.execute(
            realm_attempts.update()
            .where(
                realm_attempts.c.account == account,
                realm_attempts.c.version == version,
                realm_attempts.c.started_at >= created_at,
                realm_attempts.c.registration.is_(None),
            )
            .values(registration=made)
        )
    known = {
        (account, version)
        for account, version in conn.execute(
            sa.select(realm_used_versions.c.account, realm_used_versions.c.version)
        )
    }
    used: dict[tuple[str, str], float] = {}
    for account, version, at in [
        *held,
        *conn.execute(
            sa.select(
                realm_attempts.c.account,
                realm_attempts.c.version,
                sa.func.min(realm_attempts.c.started_at),
            ).group_by(realm_attempts.c.account, realm_attempts.c.version)
        ),
    ]:
        if (account, version) not in known:
            used[(account, version)] = min(at, used.get((account, version), at))
    for (account, version), at in used.items():
        conn.execute(
            realm_used_versions.insert().values(account=account, version=version, registered_at=at)
        )


MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1,
    _v2_credential_identifiers,
    _v3_account_tokens,
    _v4_jwt_namespace,
    _v5_sealing_key_usage,
    _v6_sealing_key_versions,
    _v7_sealing_key_vouches,
    _v8_realms,
    _v9_realm_registration_identity,
]
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
