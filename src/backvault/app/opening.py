"""Opening a repository the way a person or a script expects.

Where the key comes from, in order: the key given on this command (prompt or
``BACKVAULT_KEY``), then the device key cache. A 64-digit key is accepted with spaces,
dashes, line breaks and upper case; any other text is tried as a restic password, so
repositories made by restic open too.
"""

from __future__ import annotations

from collections.abc import Callable

from backvault.crypto import recovery_key
from backvault.device import keycache
from backvault.repo.errors import RepositoryError, WrongKey
from backvault.repo.repository import Repository
from backvault.storage import Backend, open_backend


class MalformedKeyError(RepositoryError):
    pass


class NoKeyAvailable(RepositoryError):
    pass


def secret_candidates(text: str) -> tuple[list[bytes], recovery_key.MalformedKey | None]:
    """The byte strings to try as key-file passwords for what the user typed."""
    try:
        canonical = recovery_key.canonical(recovery_key.parse(text))
    except recovery_key.MalformedKey as exc:
        problem = exc if recovery_key.is_attempted_key(text) else None
        return [text.encode()], problem
    candidates = [canonical.encode()]
    if text != canonical:
        candidates.append(text.encode())
    return candidates, None


def open_with_text(backend: Backend, text: str) -> Repository:
    candidates, problem = secret_candidates(text)
    try:
        return Repository.open(backend, candidates)
    except WrongKey:
        if problem is not None:
            raise MalformedKeyError(f"that is not a valid 64-digit key: {problem}") from None
        raise


def open_repository(
    location: str,
    key_text: str | None,
    ask: Callable[[], str] | None = None,
    remember: bool = True,
    password: Callable[[Backend], Repository | None] | None = None,
) -> Repository:
    """Open the repository and remember its key on this device (unless ``remember`` is
    false).

    ``password`` opens it through the vault; it may return None to say "the user chose to
    type a key instead"."""
    backend = open_backend(location)
    if not backend.exists():
        Repository.open(backend, [])  # raises NotARepository, before asking for a key
    if key_text is not None:
        repo = open_with_text(backend, key_text)
        if remember:
            keycache.remember(backend.location, repo.config.id, repo.key)
        return repo
    cached = keycache.recall(backend.location)
    if cached is not None:
        try:
            repo = Repository.open_with_master_key(backend, cached.master_key)
            if repo.config.id == cached.repo_id:
                return repo
        except WrongKey:
            pass
    if password is not None:
        repo_or_none = password(backend)
        if repo_or_none is not None:
            keycache.remember(backend.location, repo_or_none.config.id, repo_or_none.key)
            return repo_or_none
    if ask is None:
        raise NoKeyAvailable(
            "no key for this repository on this device: set BACKVAULT_KEY to your 64-digit "
            "key (or the repository password), configure the vault and set "
            "BACKVAULT_PASSWORD, or run interactively to type it"
        )
    return open_repository(location, ask(), None, remember)
