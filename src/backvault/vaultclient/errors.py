"""What can go wrong talking to the vault: kept apart from the HTTP client so that a
command that never calls a vault does not load an HTTP stack to name these."""

from __future__ import annotations

from dataclasses import dataclass


class VaultUnavailable(Exception):
    """The vault could not be reached or did not answer in time."""


@dataclass
class VaultRefused(Exception):
    status: int
    code: str
    message: str
    attempts_left: int | None = None

    def __str__(self) -> str:
        return self.message


class UnwrapFailed(Exception):
    """The vault released a secret that this password's export_key does not open."""


__all__ = ["UnwrapFailed", "VaultRefused", "VaultUnavailable"]


# --- threshold realms (docs/realms.md) ----------------------------------------------------
# Every message is one line naming the realm by its URL.


class RealmUnreachable(VaultUnavailable):
    """A realm could not be reached, or stalled past the timeout."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"realm {url}: {message}")
        self.url = url


class RealmMisbehaved(Exception):
    """A realm answered something the protocol refuses: garbage, too much, a proof or share
    that does not verify, another realm's identity."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"realm {url}: {message}")
        self.url = url


@dataclass
class RealmRefused(VaultRefused):
    """A realm answered with an error (``{"error": CODE, "message": …}``)."""

    url: str = ""

    def __str__(self) -> str:
        return f"realm {self.url}: {self.message} ({self.code})"


@dataclass
class RealmWrongPassword(VaultRefused):
    """t realms evaluated and the commitment does not match: a wrong password.
    ``attempts_left`` is the bound over what the realms reported afterwards."""

    def __str__(self) -> str:
        return self.message


class RealmQuorumError(Exception):
    """Fewer realms than needed did their part; ``problems`` maps each realm (URL) that did
    not to why."""

    def __init__(self, summary: str, problems: dict[str, str]) -> None:
        named = "; ".join(f"{url}: {why}" for url, why in sorted(problems.items()))
        super().__init__(f"{summary}" + (f" ({named})" if named else ""))
        self.summary = summary
        self.problems = problems


class RealmsDisagree(RealmQuorumError):
    """Phase 1: fewer than t realms return one descriptor naming exactly the pinned realms;
    the recovery stopped before any attempt was spent."""


class TooFewRealms(RealmQuorumError):
    """Phase 2 or 3: fewer than t realms gave a valid evaluation or share."""


class RealmRegistrationFailed(RealmQuorumError):
    """A registration did not land at every realm (nor, degraded, at t of them); the new
    version was deleted where it landed, except at the realms ``not_cleaned`` names."""

    def __init__(self, summary: str, problems: dict[str, str], not_cleaned: dict[str, str]):
        super().__init__(summary, problems)
        self.not_cleaned = not_cleaned


__all__ += [
    "RealmMisbehaved",
    "RealmQuorumError",
    "RealmRefused",
    "RealmRegistrationFailed",
    "RealmUnreachable",
    "RealmWrongPassword",
    "RealmsDisagree",
    "TooFewRealms",
]
