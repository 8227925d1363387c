"""Exit codes, the one exception a command raises to stop with a message, and how a vault
error reads to a person.

Exit codes (docs/user-guide.md):
  0 success · 1 error · 2 usage error · 3 finished, but something is damaged or was
  skipped (backup could not read some files, restore could not restore some files, check
  found damage) · 10 wrong or malformed key or password · 11 no repository at that
  location · 12 repository locked · 13 vault unreachable · 14 the vault's record is not
  the one this device registered · 130 interrupted (Ctrl-C) · 143 terminated (SIGTERM)

Which exception gets which code is decided in one table, ``backvault.cli.main.ERROR_CODES``.
"""

from __future__ import annotations

import signal
from typing import NoReturn

from backvault.vaultclient.errors import (
    RealmMisbehaved,
    RealmQuorumError,
    RealmRefused,
    RealmRegistrationFailed,
    RealmWrongPassword,
    UnwrapFailed,
    VaultRefused,
    VaultUnavailable,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_WRONG_KEY = 10
EXIT_NO_REPOSITORY = 11
EXIT_LOCKED = 12
EXIT_VAULT_UNREACHABLE = 13
EXIT_RECORD_REPLACED = 14
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM

VAULT_ERRORS = (VaultRefused, VaultUnavailable, UnwrapFailed, RealmQuorumError, RealmMisbehaved)
VaultError = VaultRefused | VaultUnavailable | UnwrapFailed | RealmQuorumError | RealmMisbehaved

ERASED_MESSAGE = (
    "the vault has erased this key; restore with your 64-digit key if you have one. If you "
    "turn the password on again, choose a different one: the guesses made against this one "
    "may have narrowed it down"
)


class Failure(Exception):
    """Stop the command: ``message`` on stderr (after "backvault: "), exit ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    raise Failure(message, code)


def vault_failure(
    exc: VaultError, url: str | None, account: str | None, place: str | None = None
) -> Failure:
    """The one-line message and exit code a person needs for a vault error. ``place``
    names where the password is checked ("the vault at URL", "the realms …")."""
    place = place or f"the vault at {url}"
    if isinstance(exc, RealmRegistrationFailed):
        return Failure(str(exc), EXIT_VAULT_UNREACHABLE)
    if isinstance(exc, RealmQuorumError):
        return Failure(
            f"{exc}; try again when the realms answer, or restore with your 64-digit key",
            EXIT_VAULT_UNREACHABLE,
        )
    if isinstance(exc, RealmMisbehaved):
        return Failure(f"{exc}; restore with your 64-digit key", EXIT_ERROR)
    if isinstance(exc, VaultUnavailable):
        return Failure(
            f"cannot reach {place}; check the network and try again, or "
            "restore with your 64-digit key"
            + (f" ({exc})" if str(exc).startswith("realm ") else ""),
            EXIT_VAULT_UNREACHABLE,
        )
    if isinstance(exc, RealmWrongPassword) and exc.code == "no_attempts_left":
        return Failure(f"{exc}. {ERASED_MESSAGE}", EXIT_WRONG_KEY)
    if isinstance(exc, UnwrapFailed):
        return Failure(f"{exc}; restore with your 64-digit key", EXIT_WRONG_KEY)
    if exc.code == "wrong_password" and exc.attempts_left is not None:
        left = exc.attempts_left
        noun = "attempt" if left == 1 else "attempts"
        extra = (
            "; careful: one more wrong password and the vault erases this key for good"
            if left == 1
            else ""
        )
        return Failure(f"wrong password — {left} {noun} left{extra}", EXIT_WRONG_KEY)
    if exc.code in ("record_erased", "wrong_password"):
        return Failure(ERASED_MESSAGE, EXIT_WRONG_KEY)
    if exc.code == "no_attempts_left":
        return Failure(
            "the vault accepts no more attempts: the last ones are still in progress; "
            "if they fail, the key is erased. Restore with your 64-digit key if you have one",
            EXIT_WRONG_KEY,
        )
    if isinstance(exc, RealmRefused):
        return Failure(str(exc), EXIT_ERROR)
    if exc.status == 401:
        return Failure(
            f"the vault refused the account token for {account!r}: {exc.message}", EXIT_ERROR
        )
    return Failure(f"the vault refused: {exc.message}", EXIT_ERROR)
