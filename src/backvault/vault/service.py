"""The vault's logic, independent of HTTP: registration, login with an exact guess limit,
status, audit log, deletion.

Guess counting: a login attempt is counted in the same transaction that stores the
server's login state, and that transaction commits before KE2 is returned. The record row
is locked for the whole transaction, so concurrent attempts on any number of nodes are
serialised. A successful finish resets the count. When every allowed attempt has been
spent and none is still pending, the record — OPAQUE record and wrapped secret — is deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..opaque import KE1, KE3, OpaqueConfig, RegistrationRecord, RegistrationRequest
from ..opaque import protocol as opaque_protocol
from ..opaque import server as opaque_server
from ..opaque.errors import ClientAuthenticationError, InvalidMessageError
from ..opaque.messages import ServerLoginState
from .metrics import count_audit_event
from .schema import accounts, audit, logins, migrate, records, vault_keys
from .sealing import Sealer

log = logging.getLogger("backvault.vault")

RECORD_SIZE = RegistrationRecord.size()
MAX_WRAPPED_SECRET = 1024
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}$")
TOKEN_PREFIX = "bvt_"  # noqa: S105 - a marker, not a secret


class VaultError(Exception):
    """Base: ``code`` is a stable machine-readable error name."""

    code = "error"


class BadRequest(VaultError):
    code = "bad_request"


class NoAttemptsLeft(VaultError):
    code = "no_attempts_left"


class LoginNotFound(VaultError):
    code = "login_not_found"


class NoRecord(VaultError):
    code = "no_record"


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
class LoginStarted:
    login_id: str
    ke2: bytes
    expires_in: float


@dataclass(frozen=True)
class Status:
    exists: bool
    attempts_used: int
    attempts_left: int
    max_attempts: int
    pending_logins: int
    created_at: float | None
    updated_at: float | None


def credential_identifier(account: str) -> bytes:
    return b"backvault-account:" + account.encode()


def check_account_name(name: str) -> str:
    if not ACCOUNT_NAME.match(name):
        raise BadRequest(
            "account names are 1-128 characters: letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    return name


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Keys:
    oprf_seed: bytes
    server: opaque_server.ServerKeyPair
    fake_record_seed: bytes


class VaultService:
    def __init__(
        self,
        engine: sa.Engine,
        sealer: Sealer,
        opaque_config: OpaqueConfig | None = None,
        max_attempts: int = 10,
        login_ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= max_attempts <= 1000:
            raise ValueError("max_attempts must be between 1 and 1000")
        self.engine = engine
        self.sealer = sealer
        # The KSF runs on the client only; the server needs the context and identities.
        self.config = opaque_config or OpaqueConfig()
        self.max_attempts = max_attempts
        self.login_ttl = login_ttl
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

    def add_account(self, name: str) -> str:
        """Create an account and return its bearer token (shown once; only a hash is kept)."""
        check_account_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    accounts.insert().values(
                        name=name, token_hash=hash_token(token), created_at=self.clock()
                    )
                )
        except sa.exc.IntegrityError as exc:
            raise BadRequest(f"the account {name!r} already exists") from exc
        return token

    def account_for_token(self, token: str) -> str | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(accounts.c.name, accounts.c.token_hash).where(
                    accounts.c.token_hash == digest
                )
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return str(row.name)

    # --- helpers -----------------------------------------------------------------------

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

    @staticmethod
    def _record_purpose(account: str, generation: int) -> bytes:
        return f"record:{account}:{generation}".encode()

    @staticmethod
    def _login_purpose(account: str, login_id: str) -> bytes:
        return f"login:{account}:{login_id}".encode()

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

    def _erase(self, conn: Connection, account: str, client: str, why: str) -> None:
        conn.execute(records.delete().where(records.c.account == account))
        conn.execute(logins.delete().where(logins.c.account == account))
        self._audit(conn, account, "record_erased", client, 0, why)

    def _expire_and_maybe_erase(self, conn: Connection, row: Any, now: float) -> bool:
        """Drop expired logins of a locked record (they stay counted); erase the record if
        every attempt is spent and none is pending. True if the record was erased."""
        expired = conn.execute(
            logins.delete()
            .where(logins.c.account == row.account, logins.c.expires_at < now)
            .returning(logins.c.generation, logins.c.client)
        ).all()
        for generation, client in expired:
            if generation == row.generation:
                self._audit(
                    conn,
                    row.account,
                    "login_expired",
                    client,
                    row.max_attempts - row.attempts_used,
                    "no KE3 arrived in time",
                )
        if row.attempts_used >= row.max_attempts and not self._live_logins(
            conn, row.account, row.generation, now
        ):
            self._erase(conn, row.account, "vault", "guess limit reached")
            return True
        return False

    # --- registration ------------------------------------------------------------------

    def registration_start(self, account: str, request: bytes) -> bytes:
        try:
            parsed = RegistrationRequest.from_bytes(request)
        except InvalidMessageError as exc:
            raise BadRequest(f"registration_request: {exc}") from exc
        response = opaque_server.create_registration_response(
            parsed,
            self.keys.server.public_key,
            credential_identifier(account),
            self.keys.oprf_seed,
        )
        return response.to_bytes()

    def registration_finish(
        self,
        account: str,
        record: bytes,
        wrapped_secret: bytes,
        client: str,
        max_attempts: int | None = None,
    ) -> None:
        try:
            RegistrationRecord.from_bytes(record)
        except InvalidMessageError as exc:
            raise BadRequest(f"record: {exc}") from exc
        if not 16 <= len(wrapped_secret) <= MAX_WRAPPED_SECRET:
            raise BadRequest(f"wrapped_secret must be 16 to {MAX_WRAPPED_SECRET} bytes")
        limit = self.max_attempts if max_attempts is None else max_attempts
        if not 1 <= limit <= self.max_attempts:
            raise BadRequest(f"max_attempts must be between 1 and {self.max_attempts}")
        now = self.clock()
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    row = self._lock_record(conn, account)
                    generation = (row.generation + 1) if row is not None else 1
                    sealed = self.sealer.seal(
                        record + wrapped_secret, self._record_purpose(account, generation)
                    )
                    values = dict(
                        generation=generation,
                        sealed_payload=sealed,
                        attempts_used=0,
                        max_attempts=limit,
                        updated_at=now,
                    )
                    if row is None:
                        conn.execute(
                            records.insert().values(account=account, created_at=now, **values)
                        )
                    else:
                        conn.execute(
                            records.update().where(records.c.account == account).values(**values)
                        )
                    # Logins begun against the old record can never finish.
                    conn.execute(logins.delete().where(logins.c.account == account))
                    self._audit(
                        conn,
                        account,
                        "registered",
                        client,
                        limit,
                        "replaced the previous record" if row is not None else "",
                    )
                return
            except sa.exc.IntegrityError:
                if attempt:
                    raise

    # --- login ---------------------------------------------------------------------------

    def login_start(self, account: str, ke1: bytes, client: str) -> LoginStarted:
        try:
            parsed = KE1.from_bytes(ke1)
        except InvalidMessageError as exc:
            raise BadRequest(f"ke1: {exc}") from exc
        keys = self.keys
        now = self.clock()
        login_id = secrets.token_urlsafe(24)
        refused = False
        with self.engine.begin() as conn:
            row = self._lock_record(conn, account)
            if row is not None and self._expire_and_maybe_erase(conn, row, now):
                row = None
            if row is None:
                ke2, state = self._fake_ke2(account, parsed)
                generation = -1
                self._audit(conn, account, "login_started", client, None, "no record")
            elif row.attempts_used >= row.max_attempts:
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
                payload = self.sealer.open(
                    row.sealed_payload, self._record_purpose(account, row.generation)
                )
                record = RegistrationRecord.from_bytes(payload[:RECORD_SIZE])
                ke2, state = opaque_server.generate_ke2(
                    self.config,
                    keys.server,
                    record,
                    credential_identifier(account),
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
                self._audit(conn, account, "login_started", client, row.max_attempts - used)
            if not refused:
                conn.execute(
                    logins.insert().values(
                        id=login_id,
                        account=account,
                        generation=generation,
                        sealed_state=self.sealer.seal(
                            state.to_bytes(), self._login_purpose(account, login_id)
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
        a sealed vault secret), as RFC 9807 Section 10.9 recommends."""
        keys = self.keys
        seed = hmac.new(
            keys.fake_record_seed, credential_identifier(account), hashlib.sha512
        ).digest()
        _, fake_public = opaque_protocol.derive_diffie_hellman_key_pair(seed[:32])
        record = opaque_protocol.fake_registration_record(fake_public, seed)
        return opaque_server.generate_ke2(
            self.config, keys.server, record, credential_identifier(account), keys.oprf_seed, ke1
        )

    def login_finish(self, account: str, login_id: str, ke3: bytes, client: str) -> bytes:
        """The wrapped secret if KE3 verifies; WrongPassword otherwise."""
        try:
            parsed = KE3.from_bytes(ke3)
        except InvalidMessageError as exc:
            raise BadRequest(f"ke3: {exc}") from exc
        now = self.clock()
        outcome: VaultError | None = None
        secret = b""
        with self.engine.begin() as conn:
            row = self._lock_record(conn, account)
            login = conn.execute(
                logins.delete()
                .where(logins.c.id == login_id, logins.c.account == account)
                .returning(logins.c.generation, logins.c.sealed_state, logins.c.expires_at)
            ).first()
            if login is None:
                outcome = LoginNotFound(
                    "this login does not exist, expired or was already finished; start again"
                )
            elif login.expires_at < now:
                if row is not None and login.generation == row.generation:
                    self._audit(
                        conn,
                        account,
                        "login_expired",
                        client,
                        row.max_attempts - row.attempts_used,
                        "KE3 arrived too late",
                    )
                    self._expire_and_maybe_erase(conn, row, now)
                outcome = LoginNotFound("this login expired; start again (it was counted)")
            else:
                state = ServerLoginState.from_bytes(
                    self.sealer.open(login.sealed_state, self._login_purpose(account, login_id))
                )
                genuine = row is not None and login.generation == row.generation
                try:
                    opaque_server.server_finish(state, parsed)
                    verified = genuine
                except ClientAuthenticationError:
                    verified = False
                if verified:
                    payload = self.sealer.open(
                        row.sealed_payload, self._record_purpose(account, row.generation)
                    )
                    secret = payload[RECORD_SIZE:]
                    conn.execute(
                        records.update()
                        .where(records.c.account == account)
                        .values(attempts_used=0, updated_at=now)
                    )
                    self._audit(conn, account, "login_succeeded", client, row.max_attempts)
                elif not genuine:
                    self._audit(conn, account, "login_failed", client, None, "no record")
                    outcome = WrongPassword(None, False)
                else:
                    left = row.max_attempts - row.attempts_used
                    self._audit(conn, account, "login_failed", client, left)
                    erased = self._expire_and_maybe_erase(conn, row, now)
                    outcome = WrongPassword(left, erased)
        if outcome is not None:
            raise outcome
        return secret

    # --- status, audit, delete, sweeping -------------------------------------------------

    def status(self, account: str) -> Status:
        now = self.clock()
        with self.engine.begin() as conn:
            row = self._lock_record(conn, account)
            if row is not None and self._expire_and_maybe_erase(conn, row, now):
                row = None
            if row is None:
                return Status(False, 0, 0, 0, 0, None, None)
            pending = self._live_logins(conn, account, row.generation, now)
            return Status(
                True,
                row.attempts_used,
                row.max_attempts - row.attempts_used,
                row.max_attempts,
                pending,
                row.created_at,
                row.updated_at,
            )

    def audit_log(self, account: str, limit: int = 1000) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(audit)
                .where(audit.c.account == account)
                .order_by(audit.c.id.desc())
                .limit(limit)
            ).all()
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
        with self.engine.begin() as conn:
            row = self._lock_record(conn, account)
            if row is None:
                return False
            conn.execute(records.delete().where(records.c.account == account))
            conn.execute(logins.delete().where(logins.c.account == account))
            self._audit(conn, account, "record_deleted", client, None, "by the account holder")
        return True

    def sweep(self) -> int:
        """Apply expiry to every account with expired logins; returns records erased."""
        now = self.clock()
        with self.engine.connect() as conn:
            names = [
                r[0]
                for r in conn.execute(
                    sa.select(logins.c.account).where(logins.c.expires_at < now).distinct()
                )
            ]
        erased = 0
        for name in names:
            with self.engine.begin() as conn:
                row = self._lock_record(conn, name)
                if row is None:
                    conn.execute(
                        logins.delete().where(logins.c.account == name, logins.c.expires_at < now)
                    )
                elif self._expire_and_maybe_erase(conn, row, now):
                    erased += 1
        return erased
