"""Records that JWT subjects made before they had their own namespace (``jwt:NAME``): found,
and moved there with their counters, audit history and OPRF key
(``backvault vault migrate-jwt-records``)."""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa

from backvault.vault.accounts import JWT_NAMESPACE, check_account_name
from backvault.vault.outcomes import BadRequest, MigratedRecords
from backvault.vault.records import RecordStore
from backvault.vault.schema import accounts, attempts, audit, logins, records, registrations


class JwtRecordMigration(RecordStore):
    """Moving old JWT records to their namespace (a part of VaultService)."""

    def legacy_jwt_records(self) -> list[str]:
        """Records keyed by a bare name that no built-in account owns: JWT subjects'
        records were keyed so before they had their own namespace, and JWT tokens no
        longer reach them there."""
        with self.engine.connect() as conn:
            return [
                str(name)
                for (name,) in conn.execute(
                    sa.select(records.c.account)
                    .where(
                        ~records.c.account.startswith(JWT_NAMESPACE, autoescape=True),
                        ~sa.exists().where(accounts.c.name == records.c.account),
                    )
                    .order_by(records.c.account)
                )
            ]

    def migrate_jwt_records(self, names: list[str] | None = None) -> MigratedRecords:
        """Move legacy JWT records (all, or the ``names`` given) to their subjects'
        namespace ``jwt:NAME``, with their counters, audit history and OPRF key (the
        password keeps working). Pending logins on them are dropped; they stay counted."""
        legacy = self.legacy_jwt_records()
        moving_all = names is None
        if names is None:
            names = legacy
        for name in names:
            check_account_name(name)
            if name in legacy:
                continue
            with self.engine.connect() as conn:
                exists = conn.execute(
                    sa.select(records.c.account).where(records.c.account == name)
                ).first()
            if exists is not None:
                raise BadRequest(
                    f"the record {name!r} belongs to the built-in account {name!r} and stays "
                    "with it"
                )
            raise BadRequest(f"there is no record {name!r} to move")
        result = MigratedRecords([], [])
        for name in names:
            outcome = self._move_record(name, JWT_NAMESPACE + name)
            if outcome == "moved":
                result.moved.append(name)
            elif outcome == "kept":
                result.kept.append(name)
        if moving_all:
            # The history of subjects whose record is gone (erased, deleted) moves too.
            with self.engine.begin() as conn:
                conn.execute(
                    audit.update()
                    .where(
                        ~audit.c.account.startswith(JWT_NAMESPACE, autoescape=True),
                        ~sa.exists().where(accounts.c.name == audit.c.account),
                        ~sa.exists().where(records.c.account == audit.c.account),
                    )
                    .values(account=sa.literal(JWT_NAMESPACE) + audit.c.account)
                )
        return result

    def _move_record(self, old: str, new: str) -> Literal["moved", "kept", "gone"]:
        """Rename a record (re-sealed: its sealing purpose names the account). "kept" if
        the new name already has a record (made after the upgrade): both stay."""
        now = self.clock()
        with self.engine.begin() as conn:
            row = self._lock_record(conn, old)
            if row is None:
                return "gone"  # erased or deleted meanwhile
            if self._lock_record(conn, new) is not None:
                return "kept"
            payload = self.sealer.open(
                row.sealed_payload, self._record_purpose(old, row.generation)
            )
            conn.execute(logins.delete().where(logins.c.account == old))
            self._expire_pending_attempts(conn, old)  # their logins are gone; still counted
            conn.execute(registrations.delete().where(registrations.c.account == old))
            conn.execute(attempts.update().where(attempts.c.account == old).values(account=new))
            conn.execute(
                records.update()
                .where(records.c.account == old)
                .values(
                    account=new,
                    sealed_payload=self.sealer.seal(
                        payload, self._record_purpose(new, row.generation)
                    ),
                    credential_name=row.credential_name or old,
                    updated_at=now,
                )
            )
            conn.execute(audit.update().where(audit.c.account == old).values(account=new))
            self._audit(
                conn,
                new,
                "record_moved",
                "operator",
                row.max_attempts - row.attempts_used,
                f"from {old!r}, the namespace JWT subjects once shared with built-in names",
            )
        return "moved"
