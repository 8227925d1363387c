"""Records going away outside a login: the holder deleting theirs, and the sweep that
applies expiry everywhere (erasing records whose every attempt is spent) and drops what no
longer counts for anything."""

from __future__ import annotations

import sqlalchemy as sa

from backvault.vault.records import SUCCEEDED, RecordStore
from backvault.vault.schema import attempts, logins, records, registrations


class RecordDeletion(RecordStore):
    """Deleting and sweeping records (a part of VaultService)."""

    def delete_record(self, account: str, client: str) -> bool:
        with self._transaction() as conn:
            row = self._lock_record(conn, account)
            if row is None:
                return False
            self._forget_record(conn, account)
            self._audit(conn, account, "record_deleted", client, None, "by the account holder")
        return True

    def sweep(self) -> int:
        """Apply expiry to every account with expired logins, drop expired registrations
        and attempts that count for nothing any more; returns records erased."""
        now = self.clock()
        with self.engine.begin() as conn:
            conn.execute(registrations.delete().where(registrations.c.expires_at < now))
            # Attempts that no longer count for anything: out of the cap's window, and
            # forgiven, successful or an earlier record's. Unforgiven ones of the current
            # record stay while it lives (its count holds them).
            conn.execute(
                attempts.delete().where(
                    attempts.c.started_at < now - self.guess_cap_days * 86400,
                    sa.or_(
                        attempts.c.forgiven.is_(True),
                        attempts.c.outcome == SUCCEEDED,
                        # an earlier record's: it counts for nothing out of the window
                        ~sa.exists().where(
                            records.c.account == attempts.c.account,
                            records.c.generation == attempts.c.generation,
                        ),
                    ),
                )
            )
        with self.engine.connect() as conn:
            names = [
                r[0]
                for r in conn.execute(
                    sa.select(logins.c.account).where(logins.c.expires_at < now).distinct()
                )
            ]
        erased = 0
        for name in names:
            with self._transaction() as conn:
                row = self._lock_record(conn, name)
                if row is None:
                    conn.execute(
                        logins.delete().where(logins.c.account == name, logins.c.expires_at < now)
                    )
                elif self._expire_and_maybe_erase(conn, row, now):
                    erased += 1
        return erased
