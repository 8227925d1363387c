"""The record store as the guess-limit state machine sees it: a locked record row, its
sealed payload opened, the attempts that count against it (per record, and within the
rolling cap's window), the audit trail, and the erasure rule — a record whose every allowed
attempt is spent (or whose cap is reached), with none still pending, is erased, and the
database's files scrubbed of it after the commit.

``RecordStore`` is the base of ``VaultService`` and of the parts that share these rules:
accounts (accounts.py), status and audit (status.py), deletion and sweeping (deletion.py),
moving old JWT records (jwt_migration.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backvault.opaque import RegistrationRecord
from backvault.vault.metrics import count_audit_event
from backvault.vault.retry import retry
from backvault.vault.schema import attempts, audit, logins, records
from backvault.vault.sealed_columns import login_purpose, record_purpose, registration_purpose
from backvault.vault.sealing import Sealer

log = logging.getLogger("backvault.vault")

RECORD_SIZE = RegistrationRecord.size()
CREDENTIAL_ID_SIZE = 32

LEGACY_FORMAT = 1  # OPRF key derived from the account name (records made before v2)
CURRENT_FORMAT = 2  # the record's own random credential identifier, sealed with it
PAYLOAD_V2 = b"\x02"

PENDING, FAILED, EXPIRED, SUCCEEDED = "pending", "failed", "expired", "succeeded"


def legacy_credential_identifier(account: str) -> bytes:
    """The identifier every record had before identifiers were per registration."""
    return b"backvault-account:" + account.encode()


def handle_digest(handle: str) -> str:
    """Login ids and registration handles are kept as SHA-256: a reader of the database
    cannot present them."""
    return hashlib.sha256(handle.encode()).hexdigest()


@dataclass(frozen=True)
class OpenRecord:
    credential_identifier: bytes
    record: RegistrationRecord
    wrapped_secret: bytes

    def __repr__(self) -> str:
        return f"OpenRecord(fingerprint={self.record.fingerprint()})"


class _CheckpointBusy(Exception):
    """Another connection is reading: the write-ahead log cannot be truncated yet."""


class RecordStore:
    """The database, the sealer and the clock, with the rules every part of the vault that
    touches a record applies the same way."""

    def __init__(
        self,
        engine: sa.Engine,
        sealer: Sealer,
        clock: Callable[[], float],
        guess_cap: int,
        guess_cap_days: float,
    ) -> None:
        self.engine = engine
        self.sealer = sealer
        self.clock = clock
        self.guess_cap = guess_cap
        self.guess_cap_days = guess_cap_days

    def ready(self) -> bool:
        with self.engine.connect() as conn:
            conn.execute(sa.select(1))
        # Reachability only: a seal per probe would spend GCM nonces and HSM capacity.
        self.sealer.check()
        return True

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A transaction; if it erased a record and committed, the database's files are
        scrubbed of the erased bytes right after (see _scrub)."""
        with self.engine.begin() as conn:
            conn.info.pop("erased", None)
            try:
                yield conn
            finally:
                erased = conn.info.pop("erased", False)
        if erased:
            self._scrub()

    def _scrub(self) -> None:
        """SQLite overwrites deleted rows in the database file (secure_delete), but earlier
        versions of their pages stay in the write-ahead log until a checkpoint: copy the
        log into the database and truncate it. (PostgreSQL keeps dead tuples until VACUUM:
        see docs/operator-guide.md, "Erasure".)"""
        if self.engine.dialect.name != "sqlite":
            return

        def checkpoint() -> None:
            raw = self.engine.raw_connection()
            try:
                cursor = raw.cursor()
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                result = cursor.fetchone()
                busy = bool(result and result[0])
                cursor.close()
            finally:
                raw.close()
            if busy:
                raise _CheckpointBusy

        try:
            retry(checkpoint, attempts=20, on=_CheckpointBusy, pause=0.05, growing=False)
        except _CheckpointBusy:
            log.warning("could not truncate the write-ahead log after an erase; will retry later")

    def _audit(
        self,
        conn: Connection,
        account: str,
        event: str,
        client: str,
        attempts_left: int | None = None,
        detail: str = "",
    ) -> None:
        conn.execute(
            audit.insert().values(
                account=account,
                at=self.clock(),
                event=event,
                client=client[:64],
                attempts_left=attempts_left,
                detail=detail[:200],
            )
        )
        count_audit_event(event)  # every audited event passes here: the metrics' one source
        log.info(
            "audit",
            extra={
                "event": event,
                "account": account,
                "client": client,
                "attempts_left": attempts_left,
            },
        )

    def _lock_record(self, conn: Connection, account: str) -> Any:
        return conn.execute(
            sa.select(records).where(records.c.account == account).with_for_update()
        ).first()

    # The sealing purposes (associated data) are declared with the sealed columns.
    _record_purpose = staticmethod(record_purpose)
    _login_purpose = staticmethod(login_purpose)
    _registration_purpose = staticmethod(registration_purpose)

    def _open_record(self, row: Any) -> OpenRecord:
        payload = self.sealer.open(
            row.sealed_payload, self._record_purpose(row.account, row.generation)
        )
        if row.credential_format == LEGACY_FORMAT:
            # A record moved to the JWT namespace keeps the name its key came from.
            credential_id = legacy_credential_identifier(row.credential_name or row.account)
        else:
            if payload[:1] != PAYLOAD_V2:
                raise RuntimeError(f"the record of {row.account!r} has an unknown layout")
            credential_id = payload[1 : 1 + CREDENTIAL_ID_SIZE]
            payload = payload[1 + CREDENTIAL_ID_SIZE :]
        return OpenRecord(
            credential_id,
            RegistrationRecord.from_bytes(payload[:RECORD_SIZE]),
            payload[RECORD_SIZE:],
        )

    def _fingerprint_of(self, row: Any) -> str:
        return str(row.fingerprint or self._open_record(row).record.fingerprint())

    def _live_logins(self, conn: Connection, account: str, generation: int, now: float) -> int:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(logins)
                .where(
                    logins.c.account == account,
                    logins.c.generation == generation,
                    logins.c.expires_at >= now,
                )
            ).scalar_one()
        )

    def _guesses_in_window(self, conn: Connection, account: str, now: float) -> int:
        """Attempts on the account within the cap's window that were not successes
        (pending ones included, so the cap is exact), forgiven or not, on this record or an
        earlier one: deleting, erasing or replacing a record does not reset the cap (a
        token holder could otherwise do so, and the owner may register the same password
        again)."""
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(attempts)
                .where(
                    attempts.c.account == account,
                    attempts.c.outcome != SUCCEEDED,
                    attempts.c.started_at >= now - self.guess_cap_days * 86400,
                )
            ).scalar_one()
        )

    def _counted_since(self, conn: Connection, account: str, generation: int) -> float | None:
        """When the oldest attempt on the record that still counts (not a success, not
        forgiven) started; None if none does."""
        started: float | None = conn.execute(
            sa.select(sa.func.min(attempts.c.started_at)).where(
                attempts.c.account == account,
                attempts.c.generation == generation,
                attempts.c.forgiven.is_(False),
                attempts.c.outcome != SUCCEEDED,
            )
        ).scalar_one()
        return started

    def _attempts_left(self, row: Any, used: int, in_window: int) -> int:
        return max(0, min(int(row.max_attempts) - used, self.guess_cap - in_window))

    def _end_attempt(self, conn: Connection, login_key: str, outcome: str, now: float) -> None:
        """``login_key``: the SHA-256 of the login id (how logins and attempts are keyed)."""
        conn.execute(
            attempts.update()
            .where(attempts.c.id == login_key, attempts.c.outcome == PENDING)
            .values(outcome=outcome, ended_at=now)
        )

    def _forget_record(self, conn: Connection, account: str) -> None:
        """The record and its pending logins go; its attempts stay (as history the cap
        counts, until they leave its window), the pending ones ended as expired."""
        conn.execute(records.delete().where(records.c.account == account))
        conn.execute(logins.delete().where(logins.c.account == account))
        self._expire_pending_attempts(conn, account)
        conn.info["erased"] = True

    def _expire_pending_attempts(self, conn: Connection, account: str) -> None:
        conn.execute(
            attempts.update()
            .where(attempts.c.account == account, attempts.c.outcome == PENDING)
            .values(outcome=EXPIRED, ended_at=self.clock())
        )

    def _erase(self, conn: Connection, account: str, client: str, why: str) -> None:
        self._forget_record(conn, account)
        self._audit(conn, account, "record_erased", client, 0, why)

    def _expire_and_maybe_erase(self, conn: Connection, row: Any, now: float) -> bool:
        """Drop expired logins of a locked record (they stay counted); erase the record if
        every attempt is spent, or the cap reached, and none is pending. True if the
        record was erased."""
        expired = conn.execute(
            logins.delete()
            .where(logins.c.account == row.account, logins.c.expires_at < now)
            .returning(logins.c.id, logins.c.generation, logins.c.client)
        ).all()
        in_window = self._guesses_in_window(conn, row.account, now)
        for login_key, generation, client in expired:
            if generation == row.generation:
                self._end_attempt(conn, login_key, EXPIRED, now)
                self._audit(
                    conn,
                    row.account,
                    "login_expired",
                    client,
                    self._attempts_left(row, row.attempts_used, in_window),
                    "no KE3 arrived in time",
                )
        spent = row.attempts_used >= row.max_attempts or in_window >= self.guess_cap
        if spent and not self._live_logins(conn, row.account, row.generation, now):
            why = (
                "guess limit reached"
                if row.attempts_used >= row.max_attempts
                else f"{self.guess_cap} wrong guesses within {self.guess_cap_days:g} days"
            )
            self._erase(conn, row.account, "vault", why)
            return True
        return False
