"""Repository errors: each message names the object and says what to do."""


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


class RepositoryLocked(RepositoryError):
    pass
