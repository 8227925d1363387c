"""What the account holder (and the operator) can read about a record: its status (count,
attempts left, fingerprint, the rolling cap), its audit log, and how many records still
predate per-registration credential identifiers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from backvault.vault.outcomes import Status
from backvault.vault.records import LEGACY_FORMAT, RecordStore
from backvault.vault.schema import audit, records


class RecordStatus(RecordStore):
    """Reading a record's state (a part of VaultService)."""

    def status(self, account: str) -> Status:
        now = self.clock()
        with self._transaction() as conn:
            row = self._lock_record(conn, account)
            if row is not None and self._expire_and_maybe_erase(conn, row, now):
                row = None
            if row is None:
                return Status(False, 0, 0, 0, 0, None, None)
            fingerprint = row.fingerprint
            if fingerprint is None:
                # A record from before fingerprints were stored: name it once.
                fingerprint = self._open_record(row).record.fingerprint()
                conn.execute(
                    records.update()
                    .where(records.c.account == account)
                    .values(fingerprint=fingerprint)
                )
            pending = self._live_logins(conn, account, row.generation, now)
            in_window = self._guesses_in_window(conn, account, now)
            counted_since = self._counted_since(conn, account, row.generation)
            return Status(
                True,
                row.attempts_used,
                self._attempts_left(row, row.attempts_used, in_window),
                row.max_attempts,
                pending,
                row.created_at,
                row.updated_at,
                fingerprint,
                row.credential_format == LEGACY_FORMAT,
                counted_since,
                row.last_success_at,
                in_window,
                self.guess_cap,
                self.guess_cap_days,
            )

    def audit_log(
        self, account: str, limit: int = 1000, events: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """The most recent ``limit`` events (of the kinds in ``events``, if given), oldest
        first."""
        query = sa.select(audit).where(audit.c.account == account)
        if events:
            query = query.where(audit.c.event.in_(list(events)))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(audit.c.id.desc()).limit(limit)).all()
        return [
            {
                "at": r.at,
                "event": r.event,
                "client": r.client,
                "attempts_left": r.attempts_left,
                "detail": r.detail,
            }
            for r in reversed(rows)
        ]

    def legacy_record_count(self) -> int:
        """Records made before per-registration credential identifiers."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(records)
                    .where(records.c.credential_format == LEGACY_FORMAT)
                ).scalar_one()
            )
