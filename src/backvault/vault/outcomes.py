"""What the vault's operations raise and return: the errors (each with a stable code the
HTTP API answers with) and the results of registration, login, status and migration."""

from __future__ import annotations

from dataclasses import dataclass


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


class VersionMismatch(VaultError):
    """A realm request named another registration version than the one held (or none)."""

    code = "version_mismatch"

    def __init__(self, message: str, current_version: bytes | None) -> None:
        super().__init__(message)
        self.current_version = current_version  # None: no registration, or erased


class VersionReused(VaultError):
    """A realm registration named a version this account already used at this realm."""

    code = "version_reused"


class RealmAttemptsSpent(VaultError):
    """A realm registration has no evaluations left (its key share is erased)."""

    code = "no_attempts_left"


class WrongTag(VaultError):
    """A realm unlock presented a tag whose hash is not the registration's."""

    code = "wrong_tag"


class RegistrationErased(VaultError):
    """The realm registration named was erased (only its tombstone is left)."""

    code = "registration_erased"


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


@dataclass
class MigratedRecords:
    moved: list[str]
    kept: list[str]  # the JWT subject already has a newer record: the old one stays


@dataclass(frozen=True)
class RealmRegistration:
    """What phase 1 shows: nothing secret."""

    state: str  # registered, erased or none
    descriptor: bytes | None
    attempts: int
    allowed: int


@dataclass(frozen=True)
class RealmEvaluation:
    evaluated_element: bytes
    proof: bytes
    attempts_left: int
    attempt_id: bytes

    def __repr__(self) -> str:
        return f"RealmEvaluation(attempts_left={self.attempts_left})"


@dataclass(frozen=True)
class RealmUnlocked:
    encryption_share: bytes
    share_mac: bytes
    ciphertext: bytes
    forgiven: int

    def __repr__(self) -> str:
        return f"RealmUnlocked(forgiven={self.forgiven})"
