"""What each node's sweeper does besides expiring logins: adding up the seals made per
sealing-key version (the AES-GCM nonce budget), and deleting audit events past retention."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from backvault.vault.metrics import SEALING_KEY_SEALS
from backvault.vault.schema import attempts, audit, realm_attempts, sealing_key_usage
from backvault.vault.sealing import SEALS_PER_KEY_LIMIT, SEALS_PER_KEY_WARNING, Sealer

DAY = 86400.0
AUDIT_PURGE_BATCH = 5000


def record_seal_counts(engine: sa.Engine, sealer: Sealer, now: float) -> dict[int, int]:
    """Add the seals this process made since the last call to the durable per-version
    totals, and return the totals (all nodes). Seals made in the last moments before a
    crash are not counted: the totals are a close lower bound."""
    counts = sealer.take_seal_counts()
    if counts:
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        with engine.begin() as conn:
            for version, added in sorted(counts.items()):
                statement = insert(sealing_key_usage).values(
                    key_version=version, seals=added, updated_at=now
                )
                conn.execute(
                    statement.on_conflict_do_update(
                        index_elements=[sealing_key_usage.c.key_version],
                        set_={"seals": sealing_key_usage.c.seals + added, "updated_at": now},
                    )
                )
    return seal_totals(engine)


def seal_totals(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        totals = {
            int(version): int(seals)
            for version, seals in conn.execute(
                sa.select(sealing_key_usage.c.key_version, sealing_key_usage.c.seals)
            )
        }
    for version, seals in totals.items():
        SEALING_KEY_SEALS.labels(key_version=str(version)).set(seals)
    return totals


def last_seal_at(engine: sa.Engine, version: int) -> float | None:
    """When a node last reported a seal under ``version`` (None: never)."""
    with engine.connect() as conn:
        value = conn.execute(
            sa.select(sealing_key_usage.c.updated_at).where(
                sealing_key_usage.c.key_version == version
            )
        ).scalar_one_or_none()
    return None if value is None else float(value)


def nonce_budget_warning(totals: dict[int, int], current_version: int) -> str | None:
    """A warning once the current key version has sealed half of what AES-GCM with random
    96-bit nonces allows (2^32)."""
    used = totals.get(current_version, 0)
    if used < SEALS_PER_KEY_WARNING:
        return None
    return (
        f"sealing key version {current_version} has sealed {used} values; AES-GCM with "
        f"random nonces allows {SEALS_PER_KEY_LIMIT} per key: run "
        "`backvault vault rotate-sealing-key` soon"
    )


def purge_audit(engine: sa.Engine, retention_days: float, now: float) -> int:
    """Delete audit events older than ``retention_days`` (0 keeps them forever), in
    batches so that no transaction holds the database for long. Returns how many."""
    if retention_days <= 0:
        return 0
    cutoff = now - retention_days * DAY
    deleted = 0
    while True:
        with engine.begin() as conn:
            batch = (
                sa.select(audit.c.id)
                .where(audit.c.at < cutoff)
                .limit(AUDIT_PURGE_BATCH)
                .scalar_subquery()
            )
            result = conn.execute(audit.delete().where(audit.c.id.in_(batch)))
        deleted += max(result.rowcount, 0)
        if result.rowcount < AUDIT_PURGE_BATCH:
            break
    # Attempts outlive the audit while they still count (an unforgiven one stays for as long
    # as its record): their client address goes with the retention period all the same.
    with engine.begin() as conn:
        for table in (attempts, realm_attempts):
            conn.execute(
                table.update()
                .where(table.c.started_at < cutoff, table.c.client != "")
                .values(client="")
            )
    return deleted
