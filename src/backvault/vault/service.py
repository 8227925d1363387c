"""The guess-limit state machine, independent of HTTP: registration, login start (the
attempt counted), login finish (verified, forgiven or failed) — with the erasure rule and the
record store they share in records.py.

``VaultService`` is also the vault as a whole to its callers (the HTTP API, the CLI): it
takes accounts and tokens (accounts.py), status and audit (status.py), deletion and the
sweep (deletion.py) and the JWT record migration (jwt_migration.py) from its bases.

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

(Over 500 lines on purpose: every transition that counts, forgives or refuses an attempt is
in this one file, to be reviewed together.)
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backvault.opaque import KE1, KE3, OpaqueConfig, RegistrationRecord, RegistrationRequest
from backvault.opaque import server as opaque_server
from backvault.opaque.errors import ClientAuthenticationError, InvalidMessageError
from backvault.opaque.messages import ServerLoginState
from backvault.vault.accounts import AccountBook
from backvault.vault.deletion import RecordDeletion
from backvault.vault.jwt_migration import JwtRecordMigration
from backvault.vault.opaque_keys import OpaqueKeys, load_or_create_keys
from backvault.vault.outcomes import (
    BadRequest,
    GuessCapReached,
    LoginNotFound,
    LoginStarted,
    LoginSucceeded,
    NoAttemptsLeft,
    RecordChanged,
    RegistrationNotFound,
    RegistrationStarted,
    TooManyRegistrations,
    VaultError,
    WrongPassword,
)
from backvault.vault.records import (
    CREDENTIAL_ID_SIZE,
    CURRENT_FORMAT,
    EXPIRED,
    FAILED,
    LEGACY_FORMAT,
    PAYLOAD_V2,
    PENDING,
    SUCCEEDED,
    handle_digest,
)
from backvault.vault.retry import retry
from backvault.vault.schema import attempts, logins, migrate, records, registrations
from backvault.vault.sealing import Sealer
from backvault.vault.status import RecordStatus

__all__ = ["VaultError", "VaultService"]  # VaultError: what the CLI catches

MAX_WRAPPED_SECRET = 1024
# Login ids a succeeding client may present as its own earlier wrong tries.
MAX_EARLIER_LOGIN_IDS = 256

# Registrations in progress an account may have in all, as a multiple of those one address
# may have (max_pending_registrations).
ACCOUNT_REGISTRATION_FACTOR = 8


def fake_credential_identifier(account: str) -> bytes:
    """For fake answers to accounts without a record. No record ever has it: real ones are
    32 random bytes or the legacy form, so erasing a record does not make the fake path
    an oracle under the erased record's OPRF key."""
    return b"backvault-fake:" + account.encode()


class VaultService(AccountBook, RecordStatus, RecordDeletion, JwtRecordMigration):
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
        super().__init__(engine, sealer, clock, guess_cap, guess_cap_days)
        # The KSF runs on the client only; the server needs the context and identities.
        self.config = opaque_config or OpaqueConfig()
        self.max_attempts = max_attempts
        self.login_ttl = login_ttl
        self.registration_ttl = registration_ttl
        # Registrations in progress per account: enough for a person and a retry, few
        # enough that a token holder cannot fill the table.
        self.max_pending_registrations = max_pending_registrations
        self._keys: OpaqueKeys | None = None

    # --- setup -------------------------------------------------------------------------

    def start(self) -> None:
        """Migrate the schema and load (or create, once) the vault's long-term keys."""
        migrate(self.engine)
        self._keys = load_or_create_keys(self.engine, self.sealer, self.clock)

    @property
    def keys(self) -> OpaqueKeys:
        if self._keys is None:
            raise RuntimeError("VaultService.start() was not called")
        return self._keys

    @property
    def server_public_key(self) -> bytes:
        return self.keys.server.public_key

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
        key = handle_digest(handle)
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
        key = handle_digest(registration_id)
        fingerprint = parsed.fingerprint()
        now = self.clock()

        def store() -> str:
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
                    row is None or not hmac.compare_digest(self._fingerprint_of(row), str(replaces))
                ):
                    raise RecordChanged(
                        "the record changed since this client logged in (deleted or "
                        "replaced); nothing was registered"
                    )

                sealed = self.sealer.seal(
                    PAYLOAD_V2 + credential_id + record + wrapped_secret,
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
                    conn.execute(records.insert().values(account=account, created_at=now, **values))
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
                        "; it replaced a record made before per-registration credential identifiers"
                        if row is not None and row.credential_format == LEGACY_FORMAT
                        else ""
                    ),
                )
            return fingerprint

        # Two first registrations of one account at once: the later insert conflicts;
        # tried again, it finds the record and replaces it.
        return retry(store, attempts=2, on=sa.exc.IntegrityError, pause=0.0)

    # --- login ---------------------------------------------------------------------------

    def login_start(self, account: str, ke1: bytes, client: str) -> LoginStarted:
        try:
            parsed = KE1.from_bytes(ke1)
        except InvalidMessageError as exc:
            raise BadRequest(f"ke1: {exc}") from exc
        keys = self.keys
        now = self.clock()
        login_id = secrets.token_urlsafe(24)
        login_key = handle_digest(login_id)  # how logins and attempts are keyed
        refused = False
        with self._transaction() as conn:
            row = self._lock_record(conn, account)
            if row is not None and self._expire_and_maybe_erase(conn, row, now):
                row = None
            in_window = self._guesses_in_window(conn, account, now) if row else 0
            if row is None:
                ke2, state = opaque_server.generate_stable_fake_ke2(
                    self.config,
                    keys.server,
                    keys.fake_record_seed,
                    fake_credential_identifier(account),
                    keys.oprf_seed,
                    parsed,
                )
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
        login_key = handle_digest(login_id)
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
            .where(attempts.c.id == handle_digest(login_id))
            .values(outcome=SUCCEEDED, ended_at=now, forgiven=True)
        )
        own = sorted({handle_digest(i) for i in earlier_login_ids if i and i != login_id})
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
        counted_since = self._counted_since(conn, account, row.generation)
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
