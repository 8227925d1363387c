"""The realm side of docs/realms.md, independent of HTTP: the realm id, registration by
compare-and-swap, the uncounted phase 1, the counted evaluation (phase 2), the unlock
(phase 3), deletion, and the sweep that leaves tombstones.

Counting: an evaluation locks the account's registration row (``SELECT … FOR UPDATE`` on
PostgreSQL; on SQLite every transaction is ``BEGIN IMMEDIATE``, one writer at a time) and
commits ``attempts + 1`` with the attempt's id — and, on the last allowed attempt, the
erasure of the key share — before it evaluates anything: no evaluated element leaves the
realm for an attempt that is not durably counted, and no key share stays stored once its
last evaluation is counted. The key share used for that last evaluation lives only in
memory.

Forgiveness: an unlock whose tag matches forgives the attempts whose ids its client
presents, of this account and of this registration only; nothing else is reset. The rolling
cap (``guess_cap`` within ``guess_cap_days``) counts the account's unforgiven evaluations
across its registrations, so deleting or replacing a registration does not reset it.

"This registration" is an identity the realm makes at registration (16 random bytes) and
writes into every attempt row, not the version: the version is the client's choice, and a
token holder at the cap could otherwise register its own keys under the victim's version
and forgive its guesses against the victim with its own tag. For the same reason a version
an account has used here before is refused (``version_reused``) for as long as attempts
under it are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backvault.opaque import group, voprf
from backvault.opaque.errors import InvalidMessageError
from backvault.realms import descriptor as realm_descriptor
from backvault.realms.descriptor import SUITE, VERSION_SIZE, DescriptorError
from backvault.vault.outcomes import (
    BadRequest,
    GuessCapReached,
    RealmAttemptsSpent,
    RealmEvaluation,
    RealmRegistration,
    RealmUnlocked,
    RegistrationErased,
    VersionMismatch,
    VersionReused,
    WrongTag,
)
from backvault.vault.records import RecordStore
from backvault.vault.retry import retry
from backvault.vault.schema import (
    realm_attempts,
    realm_identity,
    realm_registrations,
    realm_used_versions,
)
from backvault.vault.sealed_columns import realm_share_purpose
from backvault.vault.sealing import Sealer

PROTOCOL = 1
REALM_ID_SIZE = 16
ATTEMPT_ID_SIZE = 16
REGISTRATION_ID_SIZE = 16
TAG_SIZE = 32
SHARE_MAC_SIZE = 32
# nonce (12) + the 32-byte slot secret + GCM tag (16) = 60; room for longer secrets.
MIN_CIPHERTEXT, MAX_CIPHERTEXT = 12 + 16 + 1, 1024
MAX_ATTEMPT_IDS = 256

REGISTERED, ERASED, NONE = "registered", "erased", "none"


def load_or_create_realm_id(engine: sa.Engine, clock: Callable[[], float]) -> bytes:
    """The realm id, made (16 random bytes) by the first caller and kept in the database.
    Nodes starting at once on PostgreSQL: the later insert conflicts and reads the first."""

    def once() -> bytes:
        with engine.begin() as conn:
            row = conn.execute(
                sa.select(realm_identity.c.realm_id).where(realm_identity.c.id == 1)
            ).first()
            if row is not None:
                return bytes.fromhex(row.realm_id)
            made = secrets.token_bytes(REALM_ID_SIZE)
            conn.execute(
                realm_identity.insert().values(id=1, realm_id=made.hex(), created_at=clock())
            )
            return made

    return retry(once, attempts=2, on=sa.exc.IntegrityError, pause=0.0)


def attempt_key(attempt_id: bytes) -> str:
    """Attempt ids are kept as SHA-256: a reader of the database cannot present them."""
    return hashlib.sha256(attempt_id).hexdigest()


def _version_bytes(value: bytes, what: str = "version") -> str:
    if len(value) != VERSION_SIZE:
        raise BadRequest(f"{what} must be {VERSION_SIZE} bytes")
    return value.hex()


def _exact(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise BadRequest(f"{what} must be {size} bytes, not {len(value)}")
    return value


class RealmService(RecordStore):
    def __init__(
        self,
        engine: sa.Engine,
        sealer: Sealer,
        clock: Callable[[], float],
        guess_cap: int = 30,
        guess_cap_days: float = 365.0,
        max_allowed: int = 10,
        unlock_window: float = 60.0,
    ) -> None:
        if unlock_window <= 0:
            raise ValueError("the realm unlock window must be positive")
        super().__init__(engine, sealer, clock, guess_cap, guess_cap_days)
        # The most evaluations per registration this realm accepts (the vault's
        # max_attempts): a descriptor asking for more is refused at registration.
        self.max_allowed = max_allowed
        self.unlock_window = unlock_window
        self._realm_id: bytes | None = None

    def start(self) -> None:
        """Load (or make, once) the realm id; the schema is migrated by the vault."""
        self._realm_id = load_or_create_realm_id(self.engine, self.clock)

    @property
    def realm_id(self) -> bytes:
        if self._realm_id is None:
            raise RuntimeError("RealmService.start() was not called")
        return self._realm_id

    def info(self) -> dict[str, Any]:
        return {"realm_id": self.realm_id.hex(), "suite": SUITE.decode(), "protocol": PROTOCOL}

    # --- the row and its lifecycle ---------------------------------------------------------

    def _lock(self, conn: Connection, account: str) -> Any:
        return conn.execute(
            sa.select(realm_registrations)
            .where(realm_registrations.c.account == account)
            .with_for_update()
        ).first()

    def _settle(self, conn: Connection, row: Any, now: float) -> Any:
        """A locked registration whose unlock window has passed becomes a tombstone now
        (whether or not the sweep got to it); returns the row as it stands."""
        if (
            row is None
            or row.state != REGISTERED
            or row.window_ends_at is None
            or row.window_ends_at > now
        ):
            return row
        self._tombstone(conn, row.account, now)
        self._audit(
            conn, row.account, "realm_erased", "realm", 0, f"version {row.version[:8]}: window over"
        )
        return self._lock(conn, row.account)

    def _tombstone(self, conn: Connection, account: str, now: float) -> None:
        conn.execute(
            realm_registrations.update()
            .where(realm_registrations.c.account == account)
            .values(
                state=ERASED,
                descriptor=None,
                sealed_key_share=None,
                tag_hash=None,
                sealed_encryption_share=None,
                share_mac=None,
                ciphertext=None,
                window_ends_at=None,
                updated_at=now,
            )
        )
        conn.info["erased"] = True  # scrub the freed pages (records.py, _scrub)

    def _mismatch(self, row: Any, asked: str | None) -> VersionMismatch:
        current = (
            bytes.fromhex(row.version) if row is not None and row.state == REGISTERED else None
        )
        held = f"version {current.hex()}" if current else "no registration"
        wanted = f"version {asked}" if asked else "no registration"
        return VersionMismatch(f"this realm holds {held}, not {wanted}", current)

    def _unforgiven_in_window(self, conn: Connection, account: str, now: float) -> int:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(realm_attempts)
                .where(
                    realm_attempts.c.account == account,
                    realm_attempts.c.forgiven.is_(False),
                    realm_attempts.c.started_at >= now - self.guess_cap_days * 86400,
                )
            ).scalar_one()
        )

    def _version_used(self, conn: Connection, account: str, version: str) -> bool:
        return (
            conn.execute(
                sa.select(realm_used_versions.c.version).where(
                    realm_used_versions.c.account == account,
                    realm_used_versions.c.version == version,
                )
            ).first()
            is not None
        )

    def _left(self, attempts: int, allowed: int, in_window: int) -> int:
        return max(0, min(allowed - attempts, self.guess_cap - in_window))

    # --- registration ----------------------------------------------------------------------

    def register(
        self,
        account: str,
        expected_version: bytes | None,
        descriptor: bytes,
        key_share: bytes,
        tag_hash: bytes,
        encryption_share: bytes,
        share_mac: bytes,
        ciphertext: bytes,
        client: str,
    ) -> bytes:
        """Store a registration if the one held now is ``expected_version`` (None: none,
        or an erased one); it replaces any earlier one in the same transaction. Returns the
        new version."""
        expected = None if expected_version is None else _version_bytes(expected_version)
        try:
            decoded = realm_descriptor.decode(descriptor)
        except DescriptorError as exc:
            raise BadRequest(f"descriptor: {exc}") from None
        try:
            entry = decoded.entry(self.realm_id)
        except DescriptorError:
            raise BadRequest(
                f"descriptor: this realm ({self.realm_id.hex()}) is not one of its realms"
            ) from None
        try:
            group.deserialize_scalar(key_share, "key_share")
            group.deserialize_scalar(encryption_share, "encryption_share")
        except InvalidMessageError as exc:
            raise BadRequest(str(exc)) from None
        if not hmac.compare_digest(group.scalar_mult_base(key_share), entry.public_share):
            raise BadRequest(
                f"key_share: its public share is not the descriptor's pk at index {entry.index}"
            )
        _exact(tag_hash, TAG_SIZE, "tag_hash")
        _exact(share_mac, SHARE_MAC_SIZE, "share_mac")
        if not MIN_CIPHERTEXT <= len(ciphertext) <= MAX_CIPHERTEXT:
            raise BadRequest(f"ciphertext must be {MIN_CIPHERTEXT} to {MAX_CIPHERTEXT} bytes")
        if decoded.allowed_guesses > self.max_allowed:
            raise BadRequest(
                f"the descriptor allows {decoded.allowed_guesses} guesses per realm; this "
                f"realm allows at most {self.max_allowed}"
            )
        version = decoded.version.hex()
        now = self.clock()

        def store() -> bytes | VersionReused:
            with self._transaction() as conn:
                row = self._settle(conn, self._lock(conn, account), now)
                held = row.version if row is not None and row.state == REGISTERED else None
                tombstone = row.version if row is not None and row.state == ERASED else None
                # An erased registration may be named by its version or by null.
                if expected != held and not (held is None and expected in (None, tombstone)):
                    raise self._mismatch(row, expected)
                # Checked after the compare-and-swap, so that a client retrying a
                # registration that did land still hears version_mismatch (with its version).
                if self._version_used(conn, account, version):
                    refusal = VersionReused(
                        f"version {version} was registered for this account here before; "
                        "a new registration needs a new version"
                    )
                    # Audited (committed); nothing else changes.
                    self._audit(conn, account, "realm_refused", client, None, str(refusal)[:200])
                    return refusal
                conn.execute(
                    realm_used_versions.insert().values(
                        account=account, version=version, registered_at=now
                    )
                )
                values = dict(
                    version=version,
                    registration=secrets.token_hex(REGISTRATION_ID_SIZE),
                    state=REGISTERED,
                    descriptor=descriptor,
                    sealed_key_share=self.sealer.seal(
                        key_share, realm_share_purpose("key_share", account, version)
                    ),
                    tag_hash=tag_hash,
                    sealed_encryption_share=self.sealer.seal(
                        encryption_share, realm_share_purpose("encryption_share", account, version)
                    ),
                    share_mac=share_mac,
                    ciphertext=ciphertext,
                    attempts=0,
                    allowed=decoded.allowed_guesses,
                    window_ends_at=None,
                    updated_at=now,
                )
                if row is None:
                    conn.execute(
                        realm_registrations.insert().values(
                            account=account, created_at=now, **values
                        )
                    )
                else:
                    # The old key share goes with this commit.
                    conn.execute(
                        realm_registrations.update()
                        .where(realm_registrations.c.account == account)
                        .values(created_at=now, **values)
                    )
                    conn.info["erased"] = True
                self._audit(
                    conn,
                    account,
                    "realm_replaced" if held else "realm_registered",
                    client,
                    decoded.allowed_guesses,
                    f"version {version[:8]}" + (f", replaced {held[:8]}" if held else ""),
                )
            return decoded.version

        # Two first registrations at once: the later insert conflicts (the registration
        # row, or the used version); tried again, it finds the other's registration and
        # answers version_mismatch (or version_reused).
        stored = retry(store, attempts=2, on=sa.exc.IntegrityError, pause=0.0)
        if isinstance(stored, VersionReused):
            raise stored
        return stored

    def registration(self, account: str) -> RealmRegistration:
        """Phase 1: the state and the public descriptor; nothing counted or evaluated."""
        now = self.clock()
        with self._transaction() as conn:
            row = self._settle(conn, self._lock(conn, account), now)
        if row is None:
            return RealmRegistration(NONE, None, 0, 0)
        descriptor = bytes(row.descriptor) if row.state == REGISTERED else None
        return RealmRegistration(row.state, descriptor, int(row.attempts), int(row.allowed))

    def delete(self, account: str, version: bytes, client: str) -> bool:
        """Delete that version only (VersionMismatch if another is held); nothing held, or
        an erased registration, is not an error. True if something was deleted."""
        named = _version_bytes(version)
        now = self.clock()
        with self._transaction() as conn:
            row = self._settle(conn, self._lock(conn, account), now)
            if row is None or row.state != REGISTERED:
                return False
            if row.version != named:
                raise self._mismatch(row, named)
            conn.execute(
                realm_registrations.delete().where(realm_registrations.c.account == account)
            )
            conn.info["erased"] = True
            self._audit(conn, account, "realm_deleted", client, None, f"version {named[:8]}")
        return True

    # --- phase 2: the counted evaluation ---------------------------------------------------

    def evaluate(
        self, account: str, version: bytes, blinded_element: bytes, client: str
    ) -> RealmEvaluation:
        named = _version_bytes(version)
        try:
            group.deserialize_element(blinded_element, "blinded_element")
        except InvalidMessageError as exc:
            raise BadRequest(str(exc)) from None
        now = self.clock()
        attempt_id = secrets.token_bytes(ATTEMPT_ID_SIZE)
        refusal: Exception | None = None
        with self._transaction() as conn:
            row = self._settle(conn, self._lock(conn, account), now)
            if row is None or row.version != named:
                raise self._mismatch(row, named)
            in_window = self._unforgiven_in_window(conn, account, now)
            if (
                row.state != REGISTERED
                or row.sealed_key_share is None
                or row.attempts >= row.allowed
            ):
                refusal = RealmAttemptsSpent(
                    f"no evaluations left: this registration's {row.allowed} are spent and "
                    "its key share is erased"
                )
            elif in_window >= self.guess_cap:
                refusal = GuessCapReached(
                    f"this account has had {in_window} unforgiven evaluations within "
                    f"{self.guess_cap_days:g} days, the most this realm allows"
                )
            if refusal is not None:
                # The refusal is audited (committed); nothing is counted.
                self._audit(conn, account, "realm_refused", client, 0, str(refusal)[:200])
            else:
                public_share = (
                    realm_descriptor.decode(bytes(row.descriptor)).entry(self.realm_id).public_share
                )
                # Opened before the commit: if the sealing key is unreachable, nothing is
                # counted and nothing evaluated.
                key_share = self.sealer.open(
                    bytes(row.sealed_key_share),
                    realm_share_purpose("key_share", account, row.version),
                )
                used = int(row.attempts) + 1
                last = used >= row.allowed
                changes: dict[str, Any] = {"attempts": used, "updated_at": now}
                if last:
                    changes.update(sealed_key_share=None, window_ends_at=now + self.unlock_window)
                    conn.info["erased"] = True
                conn.execute(
                    realm_registrations.update()
                    .where(realm_registrations.c.account == account)
                    .values(**changes)
                )
                conn.execute(
                    realm_attempts.insert().values(
                        id=attempt_key(attempt_id),
                        account=account,
                        version=named,
                        registration=row.registration,
                        started_at=now,
                        forgiven=False,
                        client=client[:64],
                    )
                )
                left = self._left(used, int(row.allowed), in_window + 1)
                self._audit(conn, account, "realm_evaluated", client, left, f"version {named[:8]}")
                if last:
                    self._audit(
                        conn,
                        account,
                        "realm_key_erased",
                        "realm",
                        0,
                        f"version {named[:8]}: {row.allowed} evaluations spent; phase 3 "
                        f"answers for {self.unlock_window:g} s",
                    )
        if refusal is not None:
            raise refusal
        # Counted (and, for the last one, the key share erased) and committed: now evaluate.
        evaluated, proof = voprf.blind_evaluate(
            key_share, public_share, [blinded_element], group.random_scalar()
        )
        return RealmEvaluation(evaluated[0], proof, left, attempt_id)

    # --- phase 3 ------------------------------------------------------------------------------

    def unlock(
        self,
        account: str,
        version: bytes,
        tag: bytes,
        attempt_ids: Sequence[bytes],
        client: str,
    ) -> RealmUnlocked:
        named = _version_bytes(version)
        _exact(tag, TAG_SIZE, "tag")
        if len(attempt_ids) > MAX_ATTEMPT_IDS:
            raise BadRequest(f"at most {MAX_ATTEMPT_IDS} attempt ids")
        presented = sorted(
            {attempt_key(_exact(i, ATTEMPT_ID_SIZE, "each attempt id")) for i in attempt_ids}
        )
        offered = hashlib.sha256(tag).digest()
        now = self.clock()
        outcome: Exception | None = None
        with self._transaction() as conn:
            row = self._settle(conn, self._lock(conn, account), now)
            if row is None or row.version != named:
                raise self._mismatch(row, named)
            if row.state != REGISTERED:
                raise RegistrationErased(
                    "this registration was erased: its evaluations were spent and its unlock "
                    "window is over"
                )
            if not hmac.compare_digest(offered, bytes(row.tag_hash)):
                # Counts nothing and forgives nothing; audited.
                self._audit(
                    conn, account, "realm_unlock_failed", client, None, f"version {named[:8]}"
                )
                outcome = WrongTag("the tag does not match this registration")
            else:
                forgiven = 0
                if presented:
                    forgiven = conn.execute(
                        realm_attempts.update()
                        .where(
                            realm_attempts.c.id.in_(presented),
                            realm_attempts.c.account == account,
                            realm_attempts.c.version == named,
                            # Of this registration, not merely of a registration that
                            # had this version.
                            realm_attempts.c.registration == row.registration,
                            realm_attempts.c.forgiven.is_(False),
                        )
                        .values(forgiven=True)
                    ).rowcount
                used = int(row.attempts)
                if forgiven and row.sealed_key_share is not None:
                    # A spent registration stays spent (its key share is gone); the
                    # forgiven attempts still leave the rolling cap.
                    used = max(0, used - forgiven)
                    conn.execute(
                        realm_registrations.update()
                        .where(realm_registrations.c.account == account)
                        .values(attempts=used, updated_at=now)
                    )
                encryption_share = self.sealer.open(
                    bytes(row.sealed_encryption_share),
                    realm_share_purpose("encryption_share", account, named),
                )
                in_window = self._unforgiven_in_window(conn, account, now)
                self._audit(
                    conn,
                    account,
                    "realm_unlocked",
                    client,
                    self._left(used, int(row.allowed), in_window)
                    if row.sealed_key_share is not None
                    else 0,
                    f"version {named[:8]}: forgave {forgiven} attempts of this client; "
                    f"{used} stay counted",
                )
                unlocked = RealmUnlocked(
                    encryption_share, bytes(row.share_mac), bytes(row.ciphertext), forgiven
                )
        if outcome is not None:
            raise outcome
        return unlocked

    # --- the sweep -------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Tombstone the registrations whose unlock window has passed; drop attempts that
        count for nothing any more (out of the cap's window, and forgiven or of another
        registration than the account's current one), then the used versions no attempt,
        row or recent registration needs any more. Returns registrations erased."""
        now = self.clock()
        with self.engine.connect() as conn:
            due = [
                r[0]
                for r in conn.execute(
                    sa.select(realm_registrations.c.account).where(
                        realm_registrations.c.state == REGISTERED,
                        realm_registrations.c.window_ends_at < now,
                    )
                )
            ]
        erased = 0
        for account in due:
            with self._transaction() as conn:
                row = self._lock(conn, account)
                settled = self._settle(conn, row, now)
                if row is not None and settled is not None and settled.state != row.state:
                    erased += 1
        with self.engine.begin() as conn:
            conn.execute(
                realm_attempts.delete().where(
                    realm_attempts.c.started_at < now - self.guess_cap_days * 86400,
                    sa.or_(
                        realm_attempts.c.forgiven.is_(True),
                        ~sa.exists().where(
                            realm_registrations.c.account == realm_attempts.c.account,
                            realm_registrations.c.registration == realm_attempts.c.registration,
                            realm_registrations.c.state == REGISTERED,
                        ),
                    ),
                )
            )
            # A used version is forgotten only once nothing of it counts any more: its
            # attempts are gone, the account's row (or tombstone) names another, and it
            # was registered before the cap's window.
            conn.execute(
                realm_used_versions.delete().where(
                    realm_used_versions.c.registered_at < now - self.guess_cap_days * 86400,
                    ~sa.exists().where(
                        realm_attempts.c.account == realm_used_versions.c.account,
                        realm_attempts.c.version == realm_used_versions.c.version,
                    ),
                    ~sa.exists().where(
                        realm_registrations.c.account == realm_used_versions.c.account,
                        realm_registrations.c.version == realm_used_versions.c.version,
                    ),
                )
            )
        return erased
