"""The backvault command line: the ``backvault`` group and its global options, the entry
point, and the one table that turns an error into a message and an exit code (the codes:
``backvault.cli.failures``).

The commands live in ``backvault.cli.commands`` (one module per area); the workflows behind
them in ``backvault.app``; what they show in ``cli.ui``; how they ask for secrets in
``cli.prompts``; how they open and lock the repository in ``cli.repository``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from backvault import __version__, storage
from backvault.app.errors import (
    AppError,
    InvalidArgument,
    MalformedWhatsAppKey,
    TooManyEntries,
    WhatsAppKeyMismatch,
)
from backvault.app.opening import MalformedKeyError, NoKeyAvailable
from backvault.cli.commands import LazyGroup
from backvault.cli.context import Context, global_options, stderr_console
from backvault.cli.failures import (
    EXIT_ERROR,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_NO_REPOSITORY,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_WRONG_KEY,
    VAULT_ERRORS,
    Failure,
    vault_failure,
)
from backvault.cli.ui import shown
from backvault.crypto import recovery_key
from backvault.device.environment import EnvironmentSettings
from backvault.device.settings import SettingsError
from backvault.engine import parallel
from backvault.engine.errors import DiskFull, TargetNotEmpty
from backvault.hardening import disable_core_dumps, withdraw_secrets_from_environment
from backvault.repo.errors import (
    DamagedObject,
    NotARepository,
    RepositoryError,
    RepositoryLocked,
    WrongKey,
)
from backvault.storage import StorageError


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
# No envvar= here: Settings reads BACKVAULT_REPO itself, so `backvault config` can say where
# a value came from (an envvar on the option would pass it off as a flag).
@global_options(on_group=True)
@click.version_option(__version__, prog_name="backvault")
@click.pass_context
def cli(
    click_ctx: click.Context,
    repo: str | None,
    as_json: bool,
    quiet: bool,
    vault_url: str | None,
    account: str | None,
    insecure_vault: bool,
) -> None:
    """End-to-end encrypted backups in standard restic repositories.

    The repository opens with BACKVAULT_KEY, this device's key cache, your password through
    the vault (BACKVAULT_PASSWORD or a prompt), or your 64-digit key at a prompt. Settings
    come from flags, then BACKVAULT_* variables, then ~/.config/backvault/config.toml.
    """
    # Every command may hold a key (the master key, a slot secret, the vault token, the
    # vault's sealing key): none may land in a core file.
    disable_core_dumps()
    # How this process is tuned (BACKVAULT_WORKER_PROCESSES, _RETRY_ATTEMPTS, _RCLONE): read
    # once, here, and handed to the layers that use it. The vault server has settings of its
    # own (BACKVAULT_SERVER_*): a client variable must not stop it.
    if click_ctx.invoked_subcommand != "vault":
        tuning = EnvironmentSettings.load()
        storage.configure(retry_attempts=tuning.retry_attempts, rclone=tuning.rclone)
        parallel.configure(worker_processes=tuning.worker_processes)
    ctx = Context(
        repo=repo,
        json=as_json,
        quiet=quiet,
        vault_url=vault_url,
        account=account,
        insecure_vault=insecure_vault,
    )
    state = click_ctx.obj
    if isinstance(state, RunState):
        state.context = ctx
    click_ctx.obj = ctx


class RunState:
    """What ``main`` keeps of a command run: its Context (to explain a vault error)."""

    context: Context | None = None


# The one table: which error gets which exit code (the first class that matches wins).
ERROR_CODES: list[tuple[type[BaseException], int]] = [
    (MalformedKeyError, EXIT_WRONG_KEY),
    (recovery_key.MalformedKey, EXIT_WRONG_KEY),
    (WrongKey, EXIT_WRONG_KEY),
    (NoKeyAvailable, EXIT_WRONG_KEY),
    (WhatsAppKeyMismatch, EXIT_WRONG_KEY),
    (MalformedWhatsAppKey, EXIT_WRONG_KEY),
    (NotARepository, EXIT_NO_REPOSITORY),
    (RepositoryLocked, EXIT_LOCKED),
    (TargetNotEmpty, EXIT_ERROR),
    (DiskFull, EXIT_ERROR),
    (SettingsError, EXIT_USAGE),
    (DamagedObject, EXIT_INCOMPLETE),
    (RepositoryError, EXIT_ERROR),
    (StorageError, EXIT_ERROR),
    (InvalidArgument, EXIT_USAGE),
    (TooManyEntries, EXIT_INCOMPLETE),
    (AppError, EXIT_ERROR),
]
# Vault errors (VaultUnavailable: 13; a wrong password: 10; a refusal: 1): their message
# and code come from failures.vault_failure, which names the vault the command used.


class Terminated(KeyboardInterrupt):
    """SIGTERM (a shutdown, `systemctl stop`, `kill`): unwound like Ctrl-C, so that what
    cleans up on the way out (the copy of a database, a lock) runs."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated()


def explain_vault_error(exc: BaseException, state: RunState) -> Failure:
    assert isinstance(exc, VAULT_ERRORS)
    ctx = state.context
    vault = ctx.vault if ctx is not None else None
    if vault is not None:
        return vault_failure(exc, vault.url, vault.account, vault.where)
    url = account = None
    if ctx is not None:
        try:
            settings = ctx.settings()
            url, account = settings.vault_url, settings.vault_account
        except Failure:
            pass
    return vault_failure(exc, url, account)


def main(argv: list[str] | None = None) -> int:
    # Before any thread or child process exists: children inherit no secret variables.
    withdraw_secrets_from_environment()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)

    def report(message: str) -> None:
        stderr_console().print(
            f"backvault: {shown(message)}", highlight=False, markup=False, soft_wrap=True
        )

    state = RunState()
    try:
        cli.main(args=argv, prog_name="backvault", standalone_mode=False, obj=state)
    except Failure as exc:
        report(str(exc))
        return exc.code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, Terminated):
            report("terminated; earlier snapshots are intact, run the command again to finish")
            return EXIT_TERMINATED
        report("interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        report("terminated; earlier snapshots are intact, run the command again to finish")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        report("interrupted; earlier snapshots are intact, run the command again to finish")
        return EXIT_INTERRUPTED
    except VAULT_ERRORS as exc:
        failure = explain_vault_error(exc, state)
        report(str(failure))
        return failure.code
    except tuple(cls for cls, _ in ERROR_CODES) as exc:
        code = next(c for cls, c in ERROR_CODES if isinstance(exc, cls))
        report(str(exc))
        return code
    except OSError as exc:
        report(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        return EXIT_ERROR
    except Exception as exc:
        if os.environ.get("BACKVAULT_DEBUG"):
            raise
        report(
            f"internal error: {type(exc).__name__}: {exc} (rerun with BACKVAULT_DEBUG=1 for "
            "details and please report it)"
        )
        return EXIT_ERROR
    return EXIT_OK


def run() -> None:  # pragma: no cover - console entry point
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
