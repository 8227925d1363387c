"""Every sealed column of the vault's database, declared once, and the work done over all
of them: re-sealing under the current key version (``vault rotate-sealing-key``) and
counting the values each key version seals (before ``vault destroy-sealing-key``).

To add a sealed column, add one ``SealedColumn`` to ``SEALED_COLUMNS``: its table, the
column, and how to compute the sealing purpose (the associated data) from the row. The
primary key comes from the table. tests/test_vault_sealing.py fails while a ``sealed_*``
column of the schema is missing here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from backvault.vault.schema import (
    logins,
    realm_registrations,
    records,
    registrations,
    vault_keys,
)
from backvault.vault.sealing import (
    FORMAT_UNVERSIONED,
    FORMAT_VERSIONED,
    Sealer,
    SealingError,
    sealed_header,
)


@dataclass(frozen=True)
class SealedColumn:
    table: sa.Table
    column_name: str
    purpose: Callable[[Any], bytes]  # the row (all its columns) -> associated data

    @property
    def column(self) -> sa.Column[Any]:
        return self.table.c[self.column_name]

    @property
    def key(self) -> list[sa.Column[Any]]:
        return list(self.table.primary_key.columns)

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column_name}"


def record_purpose(account: str, generation: int) -> bytes:
    return f"record:{account}:{generation}".encode()


def login_purpose(account: str, login_id: str) -> bytes:
    return f"login:{account}:{login_id}".encode()


def registration_purpose(account: str, registration_key: str) -> bytes:
    return f"registration:{account}:{registration_key}".encode()


def realm_share_purpose(share: str, account: str, version: str) -> bytes:
    """``share``: key_share or encryption_share; ``version``: the registration's, in hex."""
    return f"realm:{share}:{account}:{version}".encode()


SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn(vault_keys, "sealed_oprf_seed", lambda _row: b"vault:oprf-seed"),
    SealedColumn(vault_keys, "sealed_server_private_key", lambda _row: b"vault:server-private-key"),
    SealedColumn(vault_keys, "sealed_fake_record_seed", lambda _row: b"vault:fake-seed"),
    SealedColumn(
        records, "sealed_payload", lambda row: record_purpose(row.account, row.generation)
    ),
    SealedColumn(logins, "sealed_state", lambda row: login_purpose(row.account, row.id)),
    SealedColumn(
        registrations, "sealed_state", lambda row: registration_purpose(row.account, row.id)
    ),
    SealedColumn(
        realm_registrations,
        "sealed_key_share",
        lambda row: realm_share_purpose("key_share", row.account, row.version),
    ),
    SealedColumn(
        realm_registrations,
        "sealed_encryption_share",
        lambda row: realm_share_purpose("encryption_share", row.account, row.version),
    ),
)


def _leading_bytes(column: sa.Column[Any], count: int) -> Any:
    return sa.func.substr(column, 1, count)


def values_by_key_version(engine: sa.Engine) -> dict[str, dict[int, int]]:
    """For each sealed column, how many values each key version seals (read from the
    values' headers; nothing is opened)."""
    with engine.connect() as conn:
        return count_by_key_version(conn)


def count_by_key_version(conn: sa.Connection) -> dict[str, dict[int, int]]:
    """values_by_key_version, inside a transaction of the caller's."""
    unversioned = bytes([FORMAT_UNVERSIONED])
    versioned = bytes([FORMAT_VERSIONED])
    found: dict[str, dict[int, int]] = {}
    for sealed in SEALED_COLUMNS:
        counts: dict[int, int] = {}
        old = conn.execute(
            sa.select(sa.func.count())
            .select_from(sealed.table)
            .where(_leading_bytes(sealed.column, 1) == unversioned)
        ).scalar_one()
        if old:
            counts[1] = int(old)
        header = _leading_bytes(sealed.column, 5)
        for prefix, count in conn.execute(
            sa.select(header, sa.func.count())
            .where(_leading_bytes(sealed.column, 1) == versioned)
            .group_by(header)
        ):
            version = int.from_bytes(bytes(prefix)[1:], "big")
            counts[version] = counts.get(version, 0) + int(count)
        found[sealed.name] = counts
    return found


def sample_sealed_value(conn: sa.Connection, version: int) -> tuple[bytes, bytes] | None:
    """One value sealed under ``version``, with its purpose — to find out which key really
    sealed it — or None."""
    headers = [sealed_header(version)]
    if version == 1:
        headers.append(bytes([FORMAT_UNVERSIONED]))
    for sealed in SEALED_COLUMNS:
        for header in headers:
            row = conn.execute(
                sa.select(sealed.table)
                .where(_leading_bytes(sealed.column, len(header)) == header)
                .limit(1)
            ).first()
            if row is not None:
                return bytes(row._mapping[sealed.column]), sealed.purpose(row)
    return None


def values_under(engine: sa.Engine, version: int) -> dict[str, int]:
    """The sealed columns holding values under ``version``, with their counts."""
    return {
        name: counts[version]
        for name, counts in values_by_key_version(engine).items()
        if counts.get(version)
    }


@dataclass
class ResealProgress:
    key_version: int
    resealed: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    finished: bool = False

    @property
    def total(self) -> int:
        return sum(self.resealed.values())


def reseal(
    engine: sa.Engine,
    sealer: Sealer,
    batch_size: int = 100,
    max_batches: int | None = None,
    progress: ResealProgress | None = None,
) -> ResealProgress:
    """Seal again, under the sealer's current key version, every value sealed under an
    older one. Each batch is its own short transaction: it locks its rows (``SELECT … FOR
    UPDATE``; on SQLite the write lock), opens and re-seals each value, writes it back only
    if it did not change meanwhile, and commits — so nodes keep serving, and a crash loses
    at most one uncommitted batch. Idempotent and resumable: a value already under the
    current version is never selected again.

    One call is one pass over each table in primary-key order (each batch starts after the
    last key of the one before, so a pass reads every row once); a row inserted meanwhile
    behind that point waits for the next pass."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    progress = progress or ResealProgress(sealer.current_version)
    for sealed in SEALED_COLUMNS:
        after: tuple[Any, ...] | None = None
        while True:
            if max_batches is not None and progress.batches >= max_batches:
                return progress
            progress.key_version = sealer.current_version
            current = sealed_header(progress.key_version)
            conditions = [
                sealed.column.is_not(None),
                _leading_bytes(sealed.column, len(current)) != current,
            ]
            if after is not None:
                conditions.append(sa.tuple_(*sealed.key) > sa.tuple_(*after))
            with engine.begin() as conn:
                rows = conn.execute(
                    sa.select(sealed.table)
                    .where(*conditions)
                    .order_by(*sealed.key)
                    .limit(batch_size)
                    .with_for_update()
                ).all()
                for row in rows:
                    old = bytes(row._mapping[sealed.column])
                    purpose = sealed.purpose(row)
                    try:
                        fresh = sealer.seal(sealer.open(old, purpose), purpose)
                    except SealingError as exc:
                        where = ", ".join(f"{c.name}={row._mapping[c]!r}" for c in sealed.key)
                        raise SealingError(f"{sealed.name} ({where}): {exc}") from exc
                    conn.execute(
                        sealed.table.update()
                        .where(*(c == row._mapping[c] for c in sealed.key), sealed.column == old)
                        .values({sealed.column_name: fresh})
                    )
            if not rows:
                break
            after = tuple(rows[-1]._mapping[c] for c in sealed.key)
            progress.batches += 1
            progress.resealed[sealed.name] = progress.resealed.get(sealed.name, 0) + len(rows)
    progress.finished = True
    return progress
