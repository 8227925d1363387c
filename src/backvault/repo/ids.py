"""Object ids as people type them: a prefix of at least four hex digits, as restic
allows, that names exactly one object."""

from __future__ import annotations

from collections.abc import Iterable

from backvault.repo.errors import RepositoryError

MIN_PREFIX = 4


class PrefixNotFound(RepositoryError):
    """No object (or a prefix too short to name one)."""


class AmbiguousPrefix(RepositoryError):
    """More than one object starts with the prefix."""


def resolve_prefix(candidates: Iterable[str], prefix: str, what: str, hint: str) -> str:
    """The one candidate id that starts with ``prefix``. ``what`` names the kind of
    object in messages ("snapshot", "key slot"); ``hint`` says where to find the ids
    ("list them with `backvault snapshots`")."""
    matches = [name for name in candidates if name.startswith(prefix)]
    if not matches or len(prefix) < MIN_PREFIX:
        raise PrefixNotFound(f"no {what} matches {prefix!r}; {hint}")
    if len(matches) > 1:
        raise AmbiguousPrefix(f"{prefix!r} matches {len(matches)} {what}s; give more digits")
    return matches[0]
