"""What a restore can refuse or run out of, in a module of their own so that the command
line's exit-code table can name them without loading the restorer."""

from __future__ import annotations

from backvault.repo.errors import RepositoryError


class TargetNotEmpty(RepositoryError):
    """The target folder has entries and the user did not ask to restore over them."""


class DiskFull(RepositoryError):
    """The target's file system filled up while restoring."""


class NotEnoughSpace(RepositoryError):
    """The target's file system does not have room for what the restore would write."""
