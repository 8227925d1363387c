"""The vault's logic, independent of HTTP: registration, login with an exact guess limit,
status, audit log, deletion.

Guess counting: a login attempt is counted in the same transaction that stores the
server's login state, and that transaction commits before KE2 is returned. The record row
is locked for the whole transaction, so concurrent attempts on any number of nodes are
serialised. A successful finish forgives only the attempts its client proves were its own
(the succeeding login, and the earlier wrong ones whose login ids it presents); every
other attempt stays counted. A rolling cap bounds the wrong guesses on a record over a
window (default 30 in 365 days) whatever was forgiven. When every allowed attempt has
been spent (or the cap reached) and none is still pending, the record — OPAQUE record
and wrapped secret — is erased.

No uncounted OPRF oracle: each record has its own random credential identifier, hence its
own OPRF key. A registration start evaluates under a fresh identifier that only the
finish presenting its handle can bind to a record; accounts without a record get fake
answers under an identifier no record ever had; only the counted login start evaluates
under a record's key. Records from before identifiers were per registration keep their
account-derived key for login only, until the client registers again.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backvault.opaque import KE1, KE3, OpaqueConfig, RegistrationRecord, RegistrationRequest
from backvault.opaque import protocol as opaque_protocol
from backvault.opaque import server as opaque_server
from backvault.opaque.errors import ClientAuthenticationError, InvalidMessageError
from backvault.opaque.messages import ServerLoginState
from backvault.vault.metrics import count_audit_event
from backvault.vault.schema import (
    accounts,
    attempts,
    audit,
    logins,
    migrate,
    records,
    registrations,
    vault_keys,
)
from backvault.vault.sealed_columns import login_purpose, record_purpose, registration_purpose
from backvault.vault.sealing import Sealer

log = logging.getLogger("backvault.vault")

RECORD_SIZE = RegistrationRecord.size()
CREDENTIAL_ID_SIZE = 32
MAX_WRAPPED_SECRET = 1024
# Login ids a succeeding client may present as its own earlier wrong tries.
MAX_EARLIER_LOGIN_IDS = 256
# \Z, not $: "$" also matches before a final newline, which would make "alice\n" a name.
ACCOUNT_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}\Z")
TOKEN_PREFIX = "bvt_"  # noqa: S105 - a marker, not a secret
# JWT subjects are accounts "jwt:SUBJECT"; built-in names cannot hold ":" (ACCOUNT_NAME).
JWT_NAMESPACE = "jwt:"

LEGACY_FORMAT = 1  # OPRF key derived from the account name (records made before v2)
CURRENT_FORMAT = 2  # the record's own random credential identifier, sealed with it
_PAYLOAD_V2 = b"\x02"

# Registrations in progress an account may have in all, as a multiple of those one address
# may have (max_pending_registrations).
ACCOUNT_REGISTRATION_FACTOR = 8

PENDING, FAILED, EXPIRED, SUCCEEDED = "pending", "failed", "expired", "succeeded"


class VaultError(Exception):
    """Base: ``code`` is a stable machine-readable error name."""

    code = "error"


class BadRequest(VaultError):
    code = "bad_request"


class NoAttemptsLeft(VaultError):
    code = "no_attempts_left"


class LoginNotFound(VaultError):
    code = "login_not_found"


class RegistrationNotFound(VaultError):
    code = "registration_not_found"


class NoRecord(VaultError):
    code = "no_record"


class RecordChanged(VaultError):
    code = "record_changed"


class TooManyRegistrations(VaultError):
    code = "too_many_registrations"


class GuessCapReached(VaultError):
    code = "guess_cap_reached"


class NoSuchAccount(VaultError):
    code = "no_such_account"


@dataclass
class WrongPassword(VaultError):
    attempts_left: int | None
    erased: bool

    code = "wrong_password"

    def __str__(self) -> str:
        if self.erased:
            return "wrong password; the guess limit is reached and the record was erased"
        return f"wrong password; {self.attempts_left} attempts left"


@dataclass(frozen=True)
class RegistrationStarted:
    registration_id: str
    response: bytes
    expires_in: float

    def __repr__(self) -> str:
        return f"RegistrationStarted(expires_in={self.expires_in})"


@dataclass(frozen=True)
class LoginStarted:
    login_id: str
    ke2: bytes
    expires_in: float

    def __repr__(self) -> str:
        return f"LoginStarted(expires_in={self.expires_in})"


@dataclass(frozen=True)
class LoginSucceeded:
    wrapped_secret: bytes
    attempts_left: int
    forgiven: int  # this client's earlier wrong tries that no longer count
    counted: int  # attempts that stay counted: not this client's, as far as it proved
    counted_since: float | None  # when the oldest of those started
    # The record predates per-registration credential identifiers: the client should
    # register it again (same password, count kept) to move it to a fresh one.
    legacy_record: bool = False
    max_attempts: int = 0
    fingerprint: str = ""  # of the record this login opened

    def __repr__(self) -> str:
        return f"LoginSucceeded(attempts_left={self.attempts_left}, counted={self.counted})"


@dataclass(frozen=True)
class Status:
    exists: bool
    attempts_used: int
    attempts_left: int
    max_attempts: int
    pending_logins: int
    created_at: float | None
    updated_at: float | None
    fingerprint: str | None = None
    legacy_record: bool = False
    counted_since: float | None = None
    last_success_at: float | None = None
    wrong_guesses_in_window: int = 0
    guess_cap: int = 0
    guess_cap_days: float = 0.0


def legacy_credential_identifier(account: str) -> bytes:
    """The identifier every record had before identifiers were per registration."""
    return b"backvault-account:" + account.encode()


def fake_credential_identifier(account: str) -> bytes:
    """For fake answers to accounts without a record. No record ever has it: real ones are
    32 random bytes or the legacy form, so erasing a record does not make the fake path
    an oracle under the erased record's OPRF key."""
    return b"backvault-fake:" + account.encode()


def check_account_name(name: str) -> str:
    if not ACCOUNT_NAME.match(name):
        raise BadRequest(
            "account names are 1-128 characters: letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    return name


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _handle_digest(handle: str) -> str:
    """Login ids and registration handles are kept as SHA-256: a reader of the database
    cannot present them."""
    return hashlib.sha256(handle.encode()).hexdigest()


def _expiry(now: float, expires_in: float | None) -> float | None:
    if expires_in is None:
        return None
    if expires_in <= 0:
        raise BadRequest("a token's lifetime must be positive")
    return now + expires_in


@dataclass
class MigratedRecords:
    moved: list[str]
    kept: list[str]  # the JWT subject already has a newer record: the old one stays


@dataclass(frozen=True)
class _Keys:
    oprf_seed: bytes
    server: opaque_server.ServerKeyPair
    fake_record_seed: bytes

    def __repr__(self) -> str:
        return f"_Keys(server={self.server!r})"


@dataclass(frozen=True)
class _OpenRecord:
    credential_identifier: bytes
    record: RegistrationRecord
    wrapped_secret: bytes

    def __repr__(self) -> str:
        return f"_OpenRecord(fingerprint={self.record.fingerprint()})"


class VaultService:
    def __init__(
        self,
        engine: sa.Engine,
        sealer: Sealer,
        opaque_config: OpaqueConfig | None = None,
        max_attempts: int = 10,
        login_ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
        registration_ttl: float = 600.0,
        guess_cap: int = 30,
        guess_cap_days: float = 365.0,
        max_pending_registrations: int = 8,
    ) -> None:
        if not 1 <= max_attempts <= 1000:
            raise ValueError("max_attempts must be between 1 and 1000")
        if guess_cap < max_attempts:
            raise ValueError(
                f"guess_cap ({guess_cap}) must be at least max_attempts ({max_attempts})"
            )
        if guess_cap_days <= 0:
            raise ValueError("guess_cap_days must be positive")
        self.engine = engine
        self.sealer = sealer
        # The KSF runs on the client only; the server needs the context and identities.
        self.config = opaque_config or OpaqueConfig()
        self.max_attempts = max_attempts
        self.login_ttl = login_ttl
        self.registration_ttl = registration_ttl
        self.guess_cap = guess_cap
        self.guess_cap_days = guess_cap_days
        # Registrations in progress per account: enough for a person and a retry, few
        # enough that a token holder cannot fill the table.
        self.max_pending_registrations = max_pending_registrations
        self.clock = clock
        self._keys: _Keys | None = None

    # --- setup -------------------------------------------------------------------------

    def start(self) -> None:
        """Migrate the schema and load (or create, once) the vault's long-term keys."""
        migrate(self.engine)
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7462812)"))
            row = conn.execute(sa.select(vault_keys).where(vault_keys.c.id == 1)).first()
            if row is None:
                keys = opaque_server.generate_server_key_pair()
                seed = opaque_server.generate_oprf_seed()
                fake_seed = secrets.token_bytes(32)
                conn.execute(
                    vault_keys.insert().values(
                        id=1,
                        sealed_oprf_seed=self.sealer.seal(seed, b"vault:oprf-seed"),
                        sealed_server_private_key=self.sealer.seal(
                            keys.private_key, b"vault:server-private-key"
                        ),
                        sealed_fake_record_seed=self.sealer.seal(fake_seed, b"vault:fake-seed"),
                        created_at=self.clock(),
                    )
                )
                log.info("created the vault's OPRF seed and server key pair (sealed)")
            else:
                seed = self.sealer.open(row.sealed_oprf_seed, b"vault:oprf-seed")
                keys = opaque_server.server_key_pair_from_private_key(
                    self.sealer.open(row.sealed_server_private_key, b"vault:server-private-key")
                )
                fake_seed = self.sealer.open(row.sealed_fake_record_seed, b"vault:fake-seed")
        self._keys = _Keys(seed, keys, fake_seed)

    @property
    def keys(self) -> _Keys:
        if self._keys is None:
            raise RuntimeError("VaultService.start() was not called")
        return self._keys

    @property
    def server_public_key(self) -> bytes:
        return self.keys.server.public_key

    def ready(self) -> bool:
        with self.engine.connect() as conn:
            conn.execute(sa.select(1))
        # Reachability only: a seal per probe would spend GCM nonces and HSM capacity.
        self.sealer.check()
        return True

    # --- accounts (built-in token verifier) --------------------------------------------

    def add_account(self, name: str, expires_in: float | None = None) -> str:
        """Create an account and return its bearer token (shown once; only a hash is kept).
        With ``expires_in`` (seconds) the token stops working that long from now."""
        check_account_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                exists = conn.execute(
                    sa.select(accounts.c.name).where(accounts.c.name == name)
                ).first()
                if exists is not None:
                    raise BadRequest(f"the account {name!r} already exists")
                # A record a JWT subject made before the namespaces were separated (still
                # under the bare name, or moved but answering under its OPRF key): a new
                # built-in account must inherit neither the record nor its OPRF key.
                taken = conn.execute(
                    sa.select(records.c.account).where(
                        sa.or_(records.c.account == name, records.c.credential_name == name)
                    )
                ).first()
                if taken is not None and taken.account == name:
                    raise BadRequest(
                        f"a record for {name!r} exists that no built-in account owns (made "
                        f"by the JWT subject {name!r} before JWT subjects had their own "
                        f"namespace); run `backvault vault migrate-jwt-records {name}` "
                        "first, or choose another name"
                    )
                if taken is not None:
                    raise BadRequest(
                        f"the name {name!r} is taken by the record of {taken.account!r}, "
                        "moved there from it; choose another name"
                    )
                conn.execute(
                    accounts.insert().values(
                        name=name,
                        token_hash=hash_token(token),
                        created_at=now,
                        token_expires_at=_expiry(now, expires_in),
                    )
                )
        except sa.exc.IntegrityError as exc:
            raise BadRequest(f"the account {name!r} already exists") from exc
        return token

    def rotate_token(self, name: str, expires_in: float | None = None) -> str:
        """Give the account a new token (returned, shown once); the old one stops working
        at once, on every node. Also lifts a revocation."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        with self.engine.begin() as conn:
            changed = conn.execute(
                accounts.update()
                .where(accounts.c.name == name)
                .values(
                    token_hash=hash_token(token),
                    token_expires_at=_expiry(now, expires_in),
                    token_revoked_at=None,
                )
            ).rowcount
            if not changed:
                raise NoSuchAccount(f"there is no built-in account {name!r}")
            self._audit(conn, name, "token_rotated", "operator", None, "a new account token")
        return token

    def revoke_token(self, name: str) -> None:
        """The account's token stops working at once, on every node, until
        ``rotate_token`` gives it a new one. Its record is untouched."""
        now = self.clock()
        with self.engine.begin() as conn:
            changed = conn.execute(
                accounts.update()
                .where(accounts.c.name == name)
                .values(token_revoked_at=sa.func.coalesce(accounts.c.token_revoked_at, now))
            ).rowcount
            if not changed:
                raise NoSuchAccount(f"there is no built-in account {name!r}")
            self._audit(conn, name, "token_revoked", "operator", None, "the account token")

    def account_for_token(self, token: str) -> str | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    accounts.c.name,
                    accounts.c.token_hash,
                    accounts.c.token_expires_at,
                    accounts.c.token_revoked_at,
                ).where(accounts.c.token_hash == digest)
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        if row.token_revoked_at is not None:
            return None
        if row.token_expires_at is not None and self.clock() >= row.token_expires_at:
            return None
        return str(row.name)

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

    # --- records made by JWT subjects before the namespaces were separated ---------------

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

    # --- helpers -----------------------------------------------------------------------

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
        for _ in range(20):
            raw = self.engine.raw_connection()
            try:
                cursor = raw.cursor()
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                result = cursor.fetchone()
                busy = bool(result and result[0])
                cursor.close()
            finally:
                raw.close()
            if not busy:
                return
            time.sleep(0.05)
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

    def _open_record(self, row: Any) -> _OpenRecord:
        payload = self.sealer.open(
            row.sealed_payload, self._record_purpose(row.account, row.generation)
        )
        if row.credential_format == LEGACY_FORMAT:
            # A record moved to the JWT namespace keeps the name its key came from.
            credential_id = legacy_credential_identifier(row.credential_name or row.account)
        else:
            if payload[:1] != _PAYLOAD_V2:
                raise RuntimeError(f"the record of {row.account!r} has an unknown layout")
            credential_id = payload[1 : 1 + CREDENTIAL_ID_SIZE]
            payload = payload[1 + CREDENTIAL_ID_SIZE :]
        return _OpenRecord(
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

    # --- registration ------------------------------------------------------------------

    def registration_start(
        self, account: str, request: bytes, client: str = "unknown"
    ) -> RegistrationStarted:
        """Evaluate the OPRF once, under a fresh credential identifier that only the finish
        presenting the returned handle can bind to a record."""
        try:
            parsed = RegistrationRequest.from_bytes(request)
        except InvalidMessageError as exc:
            raise BadRequest(f"registration_request: {exc}") from exc
        credential_id = secrets.token_bytes(CREDENTIAL_ID_SIZE)
        handle = secrets.token_urlsafe(24)
        key = _handle_digest(handle)
        now = self.clock()
        with self.engine.begin() as conn:
            conn.execute(
                registrations.delete().where(
                    registrations.c.account == account, registrations.c.expires_at < now
                )
            )
            # Past the limit, the oldest registrations started from the same address give
            # way: a flood then pushes out only its own (refusing would let a token holder
            # block the owner's `password change`, the very remedy against a token holder).
            # Many addresses together can still fill the account's larger limit: revoking
            # the token is the remedy then.
            mine = (
                sa.select(registrations.c.id)
                .where(registrations.c.account == account, registrations.c.client == client[:64])
                .order_by(registrations.c.created_at.desc(), registrations.c.id)
                .offset(self.max_pending_registrations - 1)
                .scalar_subquery()
            )
            conn.execute(registrations.delete().where(registrations.c.id.in_(mine)))
            pending = conn.execute(
                sa.select(sa.func.count())
                .select_from(registrations)
                .where(registrations.c.account == account)
            ).scalar_one()
            if pending >= self.max_pending_registrations * ACCOUNT_REGISTRATION_FACTOR:
                raise TooManyRegistrations(
                    f"{pending} registrations of this account are in progress from elsewhere; "
                    f"retry within {self.registration_ttl:g} s, or ask the service to revoke "
                    "the account token if they are not yours"
                )
            conn.execute(
                registrations.insert().values(
                    id=key,
                    account=account,
                    sealed_state=self.sealer.seal(
                        credential_id, self._registration_purpose(account, key)
                    ),
                    created_at=now,
                    expires_at=now + self.registration_ttl,
                    client=client[:64],
                )
            )
            self._audit(conn, account, "registration_started", client)
        response = opaque_server.create_registration_response(
            parsed, self.keys.server.public_key, credential_id, self.keys.oprf_seed
        )
        return RegistrationStarted(handle, response.to_bytes(), self.registration_ttl)

    def registration_finish(
        self,
        account: str,
        registration_id: str,
        record: bytes,
        wrapped_secret: bytes,
        client: str,
        max_attempts: int | None = None,
        keep_count: bool = False,
        replaces: str | None = None,
    ) -> str:
        """Store the record under the credential identifier of the start that gave out
        ``registration_id`` (single use). Returns the record's fingerprint.

        ``keep_count``: when this replaces a live record, the new one inherits its count
        and its attempt history (what the cap counts) — for a client that moves a record to
        a fresh credential identifier under the same password, which must not hand anyone
        fresh guesses. Keeping a count can only make the vault stricter. It needs
        ``replaces``, the fingerprint of the record the client logged into: if the record
        is gone or another one by now (a token holder deleted or replaced it meanwhile, to
        have the same password registered with a fresh count), nothing is registered."""
        if keep_count and not replaces:
            raise BadRequest("keep_count needs replaces: the fingerprint of the record")
        try:
            parsed = RegistrationRecord.from_bytes(record)
        except InvalidMessageError as exc:
            raise BadRequest(f"record: {exc}") from exc
        if not 16 <= len(wrapped_secret) <= MAX_WRAPPED_SECRET:
            raise BadRequest(f"wrapped_secret must be 16 to {MAX_WRAPPED_SECRET} bytes")
        limit = self.max_attempts if max_attempts is None else max_attempts
        if not 1 <= limit <= self.max_attempts:
            raise BadRequest(f"max_attempts must be between 1 and {self.max_attempts}")
        key = _handle_digest(registration_id)
        fingerprint = parsed.fingerprint()
        now = self.clock()
        for attempt in range(2):
            try:
                with self._transaction() as conn:
                    row = self._lock_record(conn, account)
                    pending = conn.execute(
                        registrations.delete()
                        .where(registrations.c.id == key, registrations.c.account == account)
                        .returning(registrations.c.sealed_state, registrations.c.expires_at)
                    ).first()
                    if pending is None or pending.expires_at < now:
                        raise RegistrationNotFound(
                            "this registration does not exist, expired or was already "
                            "finished; start again"
                        )
                    credential_id = self.sealer.open(
                        pending.sealed_state, self._registration_purpose(account, key)
                    )
                    in_window = self._guesses_in_window(conn, account, now)
                    if in_window >= self.guess_cap:
                        raise GuessCapReached(
                            f"this account has had {in_window} wrong password guesses within "
                            f"{self.guess_cap_days:g} days, the most the vault allows; a password "
                            "can be registered again once older guesses leave that window "
                            "(open the repository with your 64-digit key meanwhile)"
                        )
                    # A new record's generation starts at random, so that a sealed payload from
                    # an erased record's past (a database backup) never fits a later record.
                    generation = (
                        (row.generation + 1) if row is not None else 1 + secrets.randbelow(2**30)
                    )
                    carried = keep_count and row is not None
                    if keep_count and (
                        row is None
                        or not hmac.compare_digest(self._fingerprint_of(row), str(replaces))
                    ):
                        raise RecordChanged(
                            "the record changed since this client logged in (deleted or "
                            "replaced); nothing was registered"
                        )

                    sealed = self.sealer.seal(
                        _PAYLOAD_V2 + credential_id + record + wrapped_secret,
                        self._record_purpose(account, generation),
                    )
                    values = dict(
                        generation=generation,
                        sealed_payload=sealed,
                        attempts_used=row.attempts_used if carried else 0,
                        max_attempts=min(limit, row.max_attempts) if carried else limit,
                        updated_at=now,
                        credential_format=CURRENT_FORMAT,
                        fingerprint=fingerprint,
                        last_success_at=None,
                        credential_name=None,  # the identifier is in the sealed payload
                    )
                    if row is None:
                        conn.execute(
                            records.insert().values(account=account, created_at=now, **values)
                        )
                    else:
                        conn.execute(
                            records.update().where(records.c.account == account).values(**values)
                        )
                        # Logins begun against the old record can never finish (they stay
                        # counted if the count is kept); otherwise its attempt history ends
                        # with it (the audit log keeps it).
                        conn.execute(logins.delete().where(logins.c.account == account))
                        if carried:
                            conn.execute(
                                attempts.update()
                                .where(
                                    attempts.c.account == account,
                                    attempts.c.generation == row.generation,
                                )
                                .values(
                                    generation=generation,
                                    outcome=sa.case(
                                        (attempts.c.outcome == PENDING, EXPIRED),
                                        else_=attempts.c.outcome,
                                    ),
                                )
                            )
                        else:
                            self._expire_pending_attempts(conn, account)
                        conn.info["erased"] = True  # the old record's sealed bytes
                    self._audit(
                        conn,
                        account,
                        "record_replaced" if row is not None else "registered",
                        client,
                        limit,
                        f"fingerprint {fingerprint[:16]}"
                        + ("; count kept" if carried else "")
                        + (
                            "; it replaced a record made before per-registration credential "
                            "identifiers"
                            if row is not None and row.credential_format == LEGACY_FORMAT
                            else ""
                        ),
                    )
                return fingerprint
            except sa.exc.IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # --- login ---------------------------------------------------------------------------

    def login_start(self, account: str, ke1: bytes, client: str) -> LoginStarted:
        try:
            parsed = KE1.from_bytes(ke1)
        except InvalidMessageError as exc:
            raise BadRequest(f"ke1: {exc}") from exc
        keys = self.keys
        now = self.clock()
        login_id = secrets.token_urlsafe(24)
        login_key = _handle_digest(login_id)  # how logins and attempts are keyed
        refused = False
        with self._transaction() as conn:
            row = self._lock_record(conn, account)
            if row is not None and self._expire_and_maybe_erase(conn, row, now):
                row = None
            in_window = self._guesses_in_window(conn, account, now) if row else 0
            if row is None:
                ke2, state = self._fake_ke2(account, parsed)
                generation = -1
                self._audit(conn, account, "login_started", client, None, "no record")
            elif row.attempts_used >= row.max_attempts or in_window >= self.guess_cap:
                refused = True
                self._audit(
                    conn,
                    account,
                    "login_refused",
                    client,
                    0,
                    "every attempt is spent; the last ones are still pending",
                )
            else:
                opened = self._open_record(row)
                ke2, state = opaque_server.generate_ke2(
                    self.config,
                    keys.server,
                    opened.record,
                    opened.credential_identifier,
                    keys.oprf_seed,
                    parsed,
                )
                generation = row.generation
                used = row.attempts_used + 1
                conn.execute(
                    records.update()
                    .where(records.c.account == account)
                    .values(attempts_used=used, updated_at=now)
                )
                conn.execute(
                    attempts.insert().values(
                        id=login_key,
                        account=account,
                        generation=generation,
                        started_at=now,
                        outcome=PENDING,
                        forgiven=False,
                        client=client[:64],
                    )
                )
                self._audit(
                    conn,
                    account,
                    "login_started",
                    client,
                    self._attempts_left(row, used, in_window + 1),
                )
            if not refused:
                conn.execute(
                    logins.insert().values(
                        id=login_key,  # the id itself is the client's proof
                        account=account,
                        generation=generation,
                        sealed_state=self.sealer.seal(
                            state.to_bytes(),
                            self._login_purpose(account, login_key),
                        ),
                        client=client[:64],
                        created_at=now,
                        expires_at=now + self.login_ttl,
                    )
                )
        if refused:
            raise NoAttemptsLeft(
                "no attempts left: the remaining ones are in progress; if they fail, the "
                "record will be erased"
            )
        return LoginStarted(login_id, ke2.to_bytes(), self.login_ttl)

    def _fake_ke2(self, account: str, ke1: KE1) -> tuple[Any, ServerLoginState]:
        """A KE2 for an account without a record that is stable per account (derived from
        a sealed vault secret), as RFC 9807 Section 10.9 recommends, under an OPRF key no
        record ever had."""
        keys = self.keys
        credential_id = fake_credential_identifier(account)
        seed = hmac.new(keys.fake_record_seed, credential_id, hashlib.sha512).digest()
        _, fake_public = opaque_protocol.derive_diffie_hellman_key_pair(seed[:32])
        record = opaque_protocol.fake_registration_record(fake_public, seed)
        return opaque_server.generate_ke2(
            self.config, keys.server, record, credential_id, keys.oprf_seed, ke1
        )

    def login_finish(
        self,
        account: str,
        login_id: str,
        ke3: bytes,
        client: str,
        earlier_login_ids: Sequence[str] = (),
    ) -> LoginSucceeded:
        """The wrapped secret if KE3 verifies; WrongPassword otherwise.

        A success forgives this attempt and the earlier failed ones whose login ids the
        client presents (ids are 192-bit secrets given only to the client that started
        them); every other attempt on the record stays counted."""
        try:
            parsed = KE3.from_bytes(ke3)
        except InvalidMessageError as exc:
            raise BadRequest(f"ke3: {exc}") from exc
        if len(earlier_login_ids) > MAX_EARLIER_LOGIN_IDS:
            raise BadRequest(f"at most {MAX_EARLIER_LOGIN_IDS} earlier login ids")
        now = self.clock()
        login_key = _handle_digest(login_id)
        outcome: VaultError | None = None
        success: LoginSucceeded | None = None
        with self._transaction() as conn:
            row = self._lock_record(conn, account)
            login = conn.execute(
                logins.delete()
                .where(logins.c.id == login_key, logins.c.account == account)
                .returning(logins.c.generation, logins.c.sealed_state, logins.c.expires_at)
            ).first()
            if login is None:
                outcome = LoginNotFound(
                    "this login does not exist, expired or was already finished; start again"
                )
            elif login.expires_at < now:
                if row is not None and login.generation == row.generation:
                    self._end_attempt(conn, login_key, EXPIRED, now)
                    in_window = self._guesses_in_window(conn, account, now)
                    self._audit(
                        conn,
                        account,
                        "login_expired",
                        client,
                        self._attempts_left(row, row.attempts_used, in_window),
                        "KE3 arrived too late",
                    )
                    self._expire_and_maybe_erase(conn, row, now)
                outcome = LoginNotFound("this login expired; start again (it was counted)")
            else:
                state = ServerLoginState.from_bytes(
                    self.sealer.open(login.sealed_state, self._login_purpose(account, login_key))
                )
                genuine = row is not None and login.generation == row.generation
                try:
                    opaque_server.server_finish(state, parsed)
                    verified = genuine
                except ClientAuthenticationError:
                    verified = False
                if verified:
                    success = self._succeed(conn, row, login_id, earlier_login_ids, client, now)
                elif not genuine:
                    self._audit(conn, account, "login_failed", client, None, "no record")
                    outcome = WrongPassword(None, False)
                else:
                    self._end_attempt(conn, login_key, FAILED, now)
                    in_window = self._guesses_in_window(conn, account, now)
                    left = self._attempts_left(row, row.attempts_used, in_window)
                    self._audit(conn, account, "login_failed", client, left)
                    erased = self._expire_and_maybe_erase(conn, row, now)
                    outcome = WrongPassword(left, erased)
        if outcome is not None:
            raise outcome
        assert success is not None
        return success

    def _succeed(
        self,
        conn: Connection,
        row: Any,
        login_id: str,
        earlier_login_ids: Sequence[str],
        client: str,
        now: float,
    ) -> LoginSucceeded:
        account = row.account
        opened = self._open_record(row)
        secret = opened.wrapped_secret
        conn.execute(
            attempts.update()
            .where(attempts.c.id == _handle_digest(login_id))
            .values(outcome=SUCCEEDED, ended_at=now, forgiven=True)
        )
        own = sorted({_handle_digest(i) for i in earlier_login_ids if i and i != login_id})
        forgiven = 0
        if own:
            forgiven = conn.execute(
                attempts.update()
                .where(
                    attempts.c.id.in_(own),
                    attempts.c.account == account,
                    attempts.c.generation == row.generation,
                    attempts.c.outcome.in_((FAILED, EXPIRED)),
                    attempts.c.forgiven.is_(False),
                )
                .values(forgiven=True)
            ).rowcount
        used = max(0, row.attempts_used - 1 - forgiven)
        conn.execute(
            records.update()
            .where(records.c.account == account)
            .values(attempts_used=used, updated_at=now, last_success_at=now)
        )
        counted_since = conn.execute(
            sa.select(sa.func.min(attempts.c.started_at)).where(
                attempts.c.account == account,
                attempts.c.generation == row.generation,
                attempts.c.forgiven.is_(False),
                attempts.c.outcome != SUCCEEDED,
            )
        ).scalar_one()
        in_window = self._guesses_in_window(conn, account, now)
        left = self._attempts_left(row, used, in_window)
        self._audit(
            conn,
            account,
            "login_succeeded",
            client,
            left,
            f"forgave {forgiven} earlier attempts of this client; {used} others stay counted",
        )
        return LoginSucceeded(
            secret,
            left,
            forgiven,
            used,
            counted_since,
            row.credential_format == LEGACY_FORMAT,
            int(row.max_attempts),
            opened.record.fingerprint(),
        )

    # --- status, audit, delete, sweeping -------------------------------------------------

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
            counted_since = conn.execute(
                sa.select(sa.func.min(attempts.c.started_at)).where(
                    attempts.c.account == account,
                    attempts.c.generation == row.generation,
                    attempts.c.forgiven.is_(False),
                    attempts.c.outcome != SUCCEEDED,
                )
            ).scalar_one()
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
