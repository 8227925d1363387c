"""Repository errors: each message names the object and says what to do."""

from __future__ import annotations


class RepositoryError(Exception):
    """Base class; str(exc) is a one-line message fit for the user."""


class NotARepository(RepositoryError):
    pass


class WrongKey(RepositoryError):
    pass


class DamagedObject(RepositoryError):
    """An object is missing, altered or unreadable. ``name`` is e.g. ``data/1f2e…``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} is damaged: {problem}")
        self.name = name
        self.problem = problem

    def __reduce__(self) -> tuple[type[DamagedObject], tuple[str, str]]:
        # Raised in worker processes and pickled back to the parent.
        return (type(self), (self.name, self.problem))


class RepositoryLocked(RepositoryError):
    pass
