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
