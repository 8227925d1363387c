"""Opening the repository for a command, and the lock each command holds while it works.

Every command that works on a repository is declared with ``@with_repository(lock=…)``
(borg's ``with_repository(exclusive=…)`` is the model): it opens the repository (with
BACKVAULT_KEY, this device's key cache, the password through the vault, or a typed
64-digit key), takes the lock, passes the repository in, and lets the lock go at the end.

=====================  ==========================  ===============================================
command                lock                        why
=====================  ==========================  ===============================================
backup                 shared                      adds packs and a snapshot; others may too
check                  shared                      reads everything; must not see a prune halfway
forget                 exclusive (shared with      removes snapshot files (then prunes with
                       --dry-run)                  --prune, under the same lock)
prune                  exclusive                   deletes and repacks packs
repair index           exclusive                   rewrites the index
snapshots, ls,         none                        read only (as today: a prune running meanwhile
restore                                            can make them report missing data)
key …, password …      none                        a key file is written or removed on its own
                                                   (``opened(ctx, Lock.NONE)`` where the vault
                                                   settings are checked before the key is asked)
forget-device, init    none                        (no repository yet, or only this device's key)
unlock                 none                        removes locks
=====================  ==========================  ===============================================
"""

from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from backvault.app.opening import NoKeyAvailable, open_repository
from backvault.cli.context import Context, pass_context
from backvault.cli.failures import ERASED_MESSAGE, EXIT_WRONG_KEY, fail
from backvault.cli.process_memory import return_freed_memory
from backvault.cli.prompts import ask_key, key_from_env, read_password
from backvault.device.index_cache import IndexCacheFile
from backvault.device.settings import VaultSettings
from backvault.repo.lock import RepositoryLock
from backvault.repo.repository import Repository
from backvault.storage import Backend

if TYPE_CHECKING:
    from backvault.vaultclient.realm_slots import RealmRecovery
    from backvault.vaultclient.slots import Recovery


class Lock(enum.Enum):
    NONE = "none"
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


# A lock mode, or how to choose it from the command's parameters (forget --dry-run).
LockPolicy = Lock | Callable[[dict[str, Any]], Lock]


@contextmanager
def holding(repo: Repository, lock: Lock) -> Iterator[None]:
    if lock is Lock.NONE:
        yield
        return
    with RepositoryLock(repo, exclusive=lock is Lock.EXCLUSIVE):
        yield


@contextmanager
def opened(ctx: Context, lock: Lock) -> Iterator[Repository]:
    """The repository, with ``lock`` held until the block ends (for a command whose
    repository is opened on one branch only: ``key add``)."""
    repo = open_repo(ctx)
    with holding(repo, lock):
        yield repo


def with_repository(
    lock: LockPolicy, index_cache: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a command that works on the repository: it is called as
    ``command(ctx, repo, **params)`` with the lock ``lock`` held. Options whose values must
    be checked before the key is asked for check them in their click callback.

    ``index_cache``: the command reads the index through this device's index cache, and
    writes it at the end if the index changed (backup, restore, ls: not check, prune or
    repair, which read every index file or rewrite them)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(ctx: Context, **params: Any) -> Any:
            with opened(ctx, lock(params) if callable(lock) else lock) as repo:
                if not index_cache:
                    return command(ctx, repo, **params)
                repo.index_cache = IndexCacheFile.of_repository(repo.config.id)
                if repo.index_cache is None:
                    ctx.warn(NO_CACHE_FOR_ODD_ID)
                result = command(ctx, repo, **params)
                store_index_cache(ctx, repo)
                return result

        return pass_context(run)

    return decorate


NO_CACHE_FOR_ODD_ID = (
    "warning: this repository's id is not 64 hex digits (its config was not written by "
    "restic or backvault), so this device keeps no cache for it; runs read everything again"
)


def store_index_cache(ctx: Context, repo: Repository) -> None:
    """Write the index cache after a command that succeeded; a cache that cannot be
    written costs the next run time, not this one its result."""
    try:
        repo.store_index_cache()
    except OSError as exc:
        ctx.warn(f"warning: could not write the index cache ({exc}); the next run reads the index")


def open_repo(ctx: Context) -> Repository:
    """Open the repository: BACKVAULT_KEY, else this device's cache, else the password
    through the vault (when one is configured), else a typed 64-digit key."""
    location = ctx.require_repo()
    ask = ask_key if sys.stdin.isatty() else None
    vault = ctx.optional_vault()
    opener = password_opener(ctx, vault) if vault is not None else None
    repo = open_repository(location, key_from_env(), ask=ask, password=opener)
    if repo.backend.capabilities.direct_file_io:
        # Before the index is loaded and worker processes start. Not for remote storage:
        # there the data goes through this process, whose hot loop then paid for fresh
        # mappings (storage_bench: REST and rclone 20-40 % slower).
        return_freed_memory()
    if vault is not None and vault.uses_realms:
        deliver_pending(ctx, repo, vault)
    return repo


def deliver_pending(ctx: Context, repo: Repository, vault: VaultSettings) -> None:
    """A degraded realm registration's parts for the realms that missed it: delivered now
    if those realms answer (a quick check of this device's state when there are none)."""
    from backvault.device import vault_state

    if not vault_state.pending_deliveries(repo.config.id):
        return
    from backvault.app.password import deliver_pending as deliver

    delivered, waiting = deliver(repo, vault)
    for url in delivered:
        ctx.warn(f"note: the realm {url} now holds its part of the password registration")
    for url, why in waiting.items():
        ctx.warn(f"warning: the realm {url} still lacks its part of the registration ({why})")


def report_recovery(ctx: Context, recovery: Recovery | RealmRecovery) -> None:
    if getattr(recovery, "spent", False):
        ctx.warn(
            "warning: that was the last attempt the realms allowed: they have erased this "
            "registration, so the password opens nothing any more. Set one again with "
            "`backvault password change` (this device can open the repository meanwhile)"
        )
    from backvault.vaultclient.slots import LEGACY_UPGRADED

    if recovery.upgraded:
        ctx.warn(f"warning: {LEGACY_UPGRADED}")
    elif recovery.upgraded is False:
        ctx.warn(
            "warning: this vault record was made before each record had its own OPRF key, and "
            f"moving it to a fresh one failed ({recovery.problem}); it will be tried again at "
            "the next login, or run `backvault password change`"
        )


def password_opener(ctx: Context, vault: VaultSettings) -> Callable[[Backend], Repository | None]:
    """Opens the repository with the password the vault checks (vault errors reach the
    exit-code table, which explains them)."""

    def open_with_password(backend: Backend) -> Repository | None:
        # Loaded only when a password is needed (it brings OPAQUE): most runs open the
        # repository with the device's cached key.
        from backvault.vaultclient.realm_slots import password_slots

        slots = password_slots(vault)
        record = slots.check_record()
        status = record.status
        if not status.get("exists"):
            fail(ERASED_MESSAGE, EXIT_WRONG_KEY)
        if record.ours is False:
            ctx.warn(
                "warning: the vault holds a record this device did not register (someone with "
                "the account token may have replaced it); if your password fails, use your "
                "64-digit key and then `backvault password change`"
            )
        left = int(str(status.get("attempts_left", 0)))
        if left == 1:
            ctx.warn(
                "warning: this is the last attempt the vault allows; if the password is "
                "wrong, it erases the key for good"
            )
        password = read_password(f"Password ({vault.where}; empty to type your 64-digit key)")
        if password is None:
            raise NoKeyAvailable(
                "no key for this repository on this device: set BACKVAULT_PASSWORD (or "
                "BACKVAULT_KEY to your 64-digit key), or run interactively"
            )
        if not password:
            return None  # the person chose to type the 64-digit key
        recovery = slots.recover(password.encode())
        report_recovery(ctx, recovery)
        # Realms that were down or misbehaved (others took their place): named, as
        # `password check` does. The single vault's recovery has none.
        for url, why in dict(getattr(recovery, "problems", {})).items():
            ctx.warn(f"warning: realm {url} did not do its part: {why}")
        return Repository.open(backend, [recovery.secret.hex().encode()])

    return open_with_password
