"""The backvault command line.

Exit codes (docs/user-guide.md):
  0 success · 1 error · 2 usage error · 3 finished, but something is damaged or was
  skipped (backup could not read some files, restore could not restore some files, check
  found damage) · 10 wrong or malformed key or password · 11 no repository at that
  location · 12 repository locked · 13 vault unreachable · 14 the vault's record is not
  the one this device registered · 130 interrupted (Ctrl-C) · 143 terminated (SIGTERM)
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from backvault import __version__
from backvault.app.opening import MalformedKeyError, NoKeyAvailable, open_repository, open_with_text
from backvault.crypto import recovery_key
from backvault.crypto.slotlabel import SlotLabel
from backvault.device import keycache
from backvault.device.paths import cache_dir
from backvault.device.settings import Settings, SettingsError, VaultSettings
from backvault.engine.archiver import Backup
from backvault.engine.check import Checker
from backvault.engine.progress import human_bytes
from backvault.engine.restorer import DiskFull, Restorer, TargetNotEmpty
from backvault.hardening import (
    disable_core_dumps,
    secret_variable,
    withdraw_secrets_from_environment,
)
from backvault.repo import format as fmt
from backvault.repo.errors import (
    DamagedObject,
    NotARepository,
    RepositoryError,
    RepositoryLocked,
    WrongKey,
)
from backvault.repo.lock import RepositoryLock, remove_stale_locks
from backvault.repo.repository import KeySlot, Repository
from backvault.storage import Backend, FileType, StorageError, open_backend
from backvault.storage.rest import without_password

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INCOMPLETE = 3
EXIT_WRONG_KEY = 10
EXIT_NO_REPOSITORY = 11
EXIT_LOCKED = 12
EXIT_VAULT_UNREACHABLE = 13
EXIT_RECORD_REPLACED = 14
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


@dataclass
class Context:
    repo: str | None
    json: bool
    quiet: bool
    console: Console
    errors: Console
    vault_url: str | None = None
    account: str | None = None
    insecure_vault: bool = False

    def settings(self) -> Settings:
        try:
            return Settings.resolve(
                {
                    "repository": self.repo,
                    "vault.url": self.vault_url,
                    "vault.account": self.account,
                },
                allow_plain_http=self.insecure_vault,
            )
        except SettingsError as exc:
            fail(str(exc), 2)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.errors.print(
                shown(message, keep_newlines=True), highlight=False, markup=False, soft_wrap=True
            )

    def out(self, message: str = "") -> None:
        if not self.quiet and not self.json:
            self.console.print(
                shown(message, keep_newlines=True), highlight=False, markup=False, soft_wrap=True
            )

    def error_line(self, message: str) -> None:
        """A line on stderr even with --quiet (damage, errors)."""
        self.errors.print(shown(message), highlight=False, markup=False, soft_wrap=True)

    def emit_json(self, doc: Any) -> None:
        if self.json:
            click.echo(json.dumps(doc, indent=2))

    def require_repo(self) -> str:
        repository = self.settings().repository
        if not repository:
            fail(
                "no repository given: pass --repo PATH, set BACKVAULT_REPO, or "
                "`backvault config set repository PATH`",
                2,
            )
        return repository


# What a terminal would act on rather than show: C0 and C1 controls (escape sequences,
# OSC 52 clipboard writes, carriage returns), bidirectional overrides, and the lone
# surrogates that stand for undecodable bytes in file names.
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def shown(text: str, keep_newlines: bool = False) -> str:
    """Text that came from a snapshot, the storage or the vault, safe to print: every
    character a terminal would act on becomes a visible escape (\\x1b, \\u202e)."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    # A repository URL may carry a password (rest:https://user:secret@host/).
    return _UNSHOWABLE.sub(escape, without_password(text))


def cell(text: str) -> Text:
    """A table cell that is shown as it is (rich would read [..] in a str as markup)."""
    return Text(shown(text, keep_newlines=True))


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    raise Failure(message, code)


@contextmanager
def progress_bar(ctx: Context, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr (bytes, bytes/s, ETA), only on a terminal."""
    enabled = not ctx.quiet and not ctx.json and ctx.errors.is_terminal

    class Reporter:
        def __init__(self, bar: Progress | None) -> None:
            self.bar = bar
            self.task = bar.add_task(description, total=None) if bar else None

        def start(self, total_bytes: int | None, description: str) -> None:
            if self.bar is not None and self.task is not None:
                self.bar.update(self.task, total=total_bytes, description=description)

        def advance(self, nbytes: int) -> None:
            if self.bar is not None and self.task is not None:
                self.bar.advance(self.task, nbytes)

        def note(self, message: str) -> None:
            if not ctx.quiet and not ctx.json:
                ctx.warn(message)

        def finish(self) -> None:
            pass

    if not enabled:
        yield Reporter(None)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=ctx.errors,
        transient=True,
    )
    with bar:
        yield Reporter(bar)


def ask_key() -> str:
    return str(click.prompt("64-digit key (or repository password)", hide_input=True))


def key_from_env() -> str | None:
    return secret_variable("BACKVAULT_KEY")


def open_repo(ctx: Context) -> Repository:
    """Open the repository: BACKVAULT_KEY, else this device's cache, else the password
    through the vault (when one is configured), else a typed 64-digit key."""
    location = ctx.require_repo()
    ask = ask_key if sys.stdin.isatty() else None
    vault = ctx.settings().vault
    opener = password_opener(ctx, vault) if vault is not None else None
    repo, _how = open_repository(location, key_from_env(), ask=ask, password=opener)
    return repo


def read_password(prompt: str = "Password") -> str | None:
    """BACKVAULT_PASSWORD (for scripts), else a hidden prompt on a terminal, else None."""
    from_env = secret_variable("BACKVAULT_PASSWORD")
    if from_env:
        return from_env
    if sys.stdin.isatty():
        return str(click.prompt(prompt, hide_input=True, default="", show_default=False))
    return None


def read_new_password(ctx: Context, env_name: str = "BACKVAULT_PASSWORD") -> str:
    """A new password: asked twice on a terminal, with strength feedback; weak ones are
    refused (the vault allows only a few guesses, so the password must not be among them)."""
    from backvault.vaultclient.slots import WeakPassword, check_strength

    from_env = secret_variable(env_name)
    if from_env:
        try:
            ctx.warn(check_strength(from_env))
        except WeakPassword as exc:
            fail(f"{env_name}: {exc}", 2)
        return from_env
    if not sys.stdin.isatty():
        fail(f"give the new password in {env_name} or run interactively", 2)
    while True:
        first = str(click.prompt("New password", hide_input=True))
        try:
            ctx.warn(check_strength(first))
        except WeakPassword as exc:
            ctx.warn(f"{exc}; try another")
            continue
        if str(click.prompt("Repeat the password", hide_input=True)) == first:
            return first
        ctx.warn("the two passwords differ; try again")


def vault_failure(exc: Exception, vault: VaultSettings) -> NoReturn:
    """Turn a vault refusal into the one-line message a person needs."""
    from backvault.vaultclient.http import VaultRefused, VaultUnavailable
    from backvault.vaultclient.slots import UnwrapFailed

    if isinstance(exc, VaultUnavailable):
        fail(
            f"cannot reach the vault at {vault.url}; check the network and try again, or "
            "restore with your 64-digit key",
            EXIT_VAULT_UNREACHABLE,
        )
    if isinstance(exc, VaultRefused):
        if exc.code == "wrong_password" and exc.attempts_left is not None:
            left = exc.attempts_left
            noun = "attempt" if left == 1 else "attempts"
            extra = (
                "; careful: one more wrong password and the vault erases this key for good"
                if left == 1
                else ""
            )
            fail(f"wrong password — {left} {noun} left{extra}", EXIT_WRONG_KEY)
        if exc.code in ("record_erased", "wrong_password"):
            fail(ERASED_MESSAGE, EXIT_WRONG_KEY)
        if exc.code == "no_attempts_left":
            fail(
                "the vault accepts no more attempts: the last ones are still in progress; "
                "if they fail, the key is erased. Restore with your 64-digit key if you have one",
                EXIT_WRONG_KEY,
            )
        if exc.status == 401:
            fail(f"the vault refused the account token for {vault.account!r}: {exc.message}")
        fail(f"the vault refused: {exc.message}")
    if isinstance(exc, UnwrapFailed):
        fail(f"{exc}; restore with your 64-digit key", EXIT_WRONG_KEY)
    raise exc


ERASED_MESSAGE = (
    "the vault has erased this key; restore with your 64-digit key if you have one. If you "
    "turn the password on again, choose a different one: the guesses made against this one "
    "may have narrowed it down"
)


def report_legacy_upgrade(ctx: Context, recovery: Any) -> None:
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
    def open_with_password(backend: Backend) -> Repository | None:
        from backvault.vaultclient.http import VaultRefused, VaultUnavailable
        from backvault.vaultclient.slots import PasswordSlots, UnwrapFailed

        slots = PasswordSlots(vault)
        try:
            record = slots.check_record()
        except (VaultRefused, VaultUnavailable) as exc:
            vault_failure(exc, vault)
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
        password = read_password(f"Password (vault {vault.url}; empty to type your 64-digit key)")
        if password is None:
            raise NoKeyAvailable(
                "no key for this repository on this device: set BACKVAULT_PASSWORD (or "
                "BACKVAULT_KEY to your 64-digit key), or run interactively"
            )
        if not password:
            return None  # the person chose to type the 64-digit key
        try:
            recovery = slots.recover(password.encode())
        except (VaultRefused, VaultUnavailable, UnwrapFailed) as exc:
            vault_failure(exc, vault)
        report_legacy_upgrade(ctx, recovery)
        return Repository.open(backend, [recovery.secret.hex().encode()])

    return open_with_password


_pass_context_object = click.make_pass_decorator(Context)
F = TypeVar("F", bound=Callable[..., Any])


def _set_field(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(click_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            setattr(click_ctx.find_object(Context), name, value)

    return callback


INSECURE_VAULT_HELP = (
    "Allow a plain http:// vault URL that is not on this machine (the token and the login "
    "cross the network unencrypted)."
)


def pass_context(command: F) -> F:
    """Pass the Context, and accept the global options after the command name too
    (`backvault backup --json PATH`), as restic does."""
    wrapped = _pass_context_object(command)
    for decorator in (
        click.option(
            "-r",
            "--repo",
            expose_value=False,
            callback=_set_field("repo"),
            help="Repository location (or BACKVAULT_REPO).",
        ),
        click.option(
            "--json",
            is_flag=True,
            expose_value=False,
            callback=_set_field("json"),
            help="Machine-readable output on stdout.",
        ),
        click.option(
            "--vault",
            "vault_url",
            expose_value=False,
            callback=_set_field("vault_url"),
            help="Vault URL (or BACKVAULT_VAULT_URL, or config).",
        ),
        click.option(
            "--account",
            expose_value=False,
            callback=_set_field("account"),
            help="Vault account (or BACKVAULT_ACCOUNT, or config).",
        ),
        click.option(
            "-q",
            "--quiet",
            is_flag=True,
            expose_value=False,
            callback=_set_field("quiet"),
            help="Print only errors.",
        ),
        click.option(
            "--insecure-vault",
            is_flag=True,
            expose_value=False,
            callback=_set_field("insecure_vault"),
            help=INSECURE_VAULT_HELP,
        ),
    ):
        wrapped = decorator(wrapped)
    return wrapped  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
# No envvar= here: Settings reads BACKVAULT_REPO itself, so `backvault config` can say where
# a value came from (an envvar on the option would pass it off as a flag).
@click.option("-r", "--repo", help="Repository location (or BACKVAULT_REPO).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("--vault", "vault_url", help="Vault URL (or BACKVAULT_VAULT_URL, or config).")
@click.option("--account", help="Vault account (or BACKVAULT_ACCOUNT, or config).")
@click.option("--insecure-vault", is_flag=True, help=INSECURE_VAULT_HELP)
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
    click_ctx.obj = Context(
        repo=repo,
        json=as_json,
        quiet=quiet,
        console=Console(),
        errors=Console(stderr=True),
        vault_url=vault_url,
        account=account,
        insecure_vault=insecure_vault,
    )


# --- init and keys ------------------------------------------------------------------------


def recovery_key_block(secret: bytes) -> str:
    groups = recovery_key.display(secret).split(" ")
    rows = [" ".join(groups[i : i + 4]) for i in range(0, len(groups), 4)]
    return "\n".join(f"    {row}" for row in rows)


@cli.command()
@click.option("--no-remember", is_flag=True, help="Do not keep the key on this device.")
@click.option(
    "--password",
    "with_password",
    is_flag=True,
    help="Also protect the repository with a password checked by the vault.",
)
@click.option(
    "--no-recovery-key",
    is_flag=True,
    help="With --password: keep no 64-digit key (the password becomes the only way back).",
)
@click.option(
    "--max-attempts", type=int, help="With --password: wrong guesses allowed (≤ the vault's)."
)
@pass_context
def init(
    ctx: Context,
    no_remember: bool,
    with_password: bool,
    no_recovery_key: bool,
    max_attempts: int | None,
) -> None:
    """Create a repository with its 64-digit recovery key (shown once), and with --password
    a password slot whose secret only the vault gives back."""
    if no_recovery_key and not with_password:
        fail("--no-recovery-key needs --password: a repository needs at least one key", 2)
    location = ctx.require_repo()
    vault = require_vault(ctx) if with_password else None  # before anything is written
    password = read_new_password(ctx) if with_password else None
    backend = open_backend(location)
    secret = recovery_key.generate()
    repo = Repository.init(backend, recovery_key.canonical(secret).encode(), SlotLabel.recovery())
    recovery_id = repo.key_id
    where = "" if no_remember else keycache.remember(backend.location, repo.config.id, repo.key)
    password_slot = None
    problem = None
    if vault is not None and password is not None:
        from backvault.vaultclient.slots import PasswordSlots

        try:
            password_slot = PasswordSlots(vault).enable(repo, password.encode(), max_attempts)
        except Exception as exc:
            problem = exc
    show_key = not no_recovery_key or password_slot is None
    if no_recovery_key and password_slot is not None and recovery_id:
        repo.remove_key(recovery_id)
    ctx.emit_json(
        {
            "repository": without_password(backend.location),
            "id": repo.config.id,
            "recovery_key": recovery_key.canonical(secret) if show_key else None,
            "recovery_key_groups": recovery_key.display(secret) if show_key else None,
            "key_id": recovery_id if show_key else None,
            "password_key_id": password_slot,
            "vault": vault.url if vault and password_slot else None,
            "account": vault.account if vault and password_slot else None,
            "device_cache": where or None,
        }
    )
    ctx.out(f"Created repository {repo.config.id[:8]} at {without_password(backend.location)}\n")
    if show_key:
        ctx.out("Your 64-digit recovery key. Write it down and keep it somewhere safe;")
        ctx.out("it is shown only this once, and without it or the device nobody can restore:\n")
        ctx.out(recovery_key_block(secret) + "\n")
        ctx.out("Stock restic opens this repository with the same 64 digits typed without")
        ctx.out("spaces as the password (see `backvault key show --help`).")
    if password_slot and vault:
        ctx.out(
            f"Your password now opens this repository through the vault at {vault.url} "
            f"(account {vault.account}); a limited number of wrong guesses is allowed."
        )
    if where:
        ctx.out(f"This device remembers the repository key in {where}.")
    if problem is not None:
        assert vault is not None
        try:
            vault_failure(problem, vault)
        except Failure as failure:
            fail(
                f"the repository was created, but the password could not be turned on: "
                f"{failure}; run `backvault key add --password` later",
                failure.code,
            )


@cli.group()
def key() -> None:
    """List, add, remove and show key slots."""


@key.command("list")
@pass_context
def key_list(ctx: Context) -> None:
    """List the key slots of the repository."""
    repo = open_repo(ctx)
    slots = repo.list_keys()
    ctx.emit_json(
        [
            {
                "id": s.id,
                "kind": slot_kind(s),
                "username": s.username,
                "hostname": s.hostname,
                "created": s.created,
                "current": s.current,
            }
            for s in slots
        ]
    )
    table = Table("", "ID", "kind", "created")
    for s in slots:
        table.add_row(
            "*" if s.current else "",
            cell(s.id[:8]),
            cell(slot_kind(s)),
            cell(s.created[:19].replace("T", " ")),
        )
    if not ctx.quiet and not ctx.json:
        ctx.console.print(table)


def slot_kind(slot: KeySlot) -> str:
    """What a slot is, from its sealed label (or an earlier version's clear names)."""
    if slot.label is not None:
        return slot.label.describe()
    return f"restic password ({slot.username}@{slot.hostname})"


@key.command("add")
@click.option(
    "--password",
    "with_password",
    is_flag=True,
    help="Add a password slot checked by the vault instead of a recovery key.",
)
@click.option("--max-attempts", type=int, help="With --password: wrong guesses allowed.")
@pass_context
def key_add(ctx: Context, with_password: bool, max_attempts: int | None) -> None:
    """Add another 64-digit recovery key (shown once), or with --password a password slot;
    data is not re-uploaded."""
    if with_password:
        enable_password(ctx, max_attempts)
        return
    repo = open_repo(ctx)
    secret = recovery_key.generate()
    key_id = repo.add_key(recovery_key.canonical(secret).encode(), SlotLabel.recovery())
    renamed = relabel_legacy_keys(ctx, repo)
    ctx.emit_json(
        {"key_id": key_id, "recovery_key": recovery_key.canonical(secret), "renamed": renamed}
    )
    ctx.out(f"Added recovery key {key_id[:8]}. Write it down; it is shown only this once:\n")
    ctx.out(recovery_key_block(secret))


@key.command("remove")
@click.argument("key_id")
@pass_context
def key_remove(ctx: Context, key_id: str) -> None:
    """Remove a key slot (never the last one)."""
    repo = open_repo(ctx)
    slots = repo.list_keys()
    matching = [s for s in slots if s.id.startswith(key_id)]
    if len(key_id) < 4 or not matching:
        fail(f"no key slot matches {key_id!r}; see `backvault key list`")
    if len(matching) > 1:
        fail(f"{key_id!r} matches {len(matching)} key slots; give more digits")
    if len(slots) == 1:
        fail(
            "refusing to remove the last key slot: without it nobody could ever open the "
            "repository again; add another key first (`backvault key add`)"
        )
    target = matching[0]
    from backvault.vaultclient.slots import is_password_slot, is_verified_password_slot

    if is_verified_password_slot(target):
        # The vault record is what makes this slot usable: erase it too.
        vault = require_vault(ctx)
        delete_vault_record(vault)
    elif is_password_slot(target):
        ctx.warn(
            "this slot was named a password slot by an earlier version, in clear, which "
            "backvault cannot verify: the vault's record is left alone (`backvault password "
            "disable` erases it)"
        )
    repo.remove_key(target.id)
    ctx.emit_json({"removed": target.id})
    ctx.out(f"Removed key slot {target.id[:8]} ({slot_kind(target)}).")


def relabel_legacy_keys(ctx: Context, repo: Repository) -> dict[str, str]:
    """Commands that write key files also take the clear names (kind, account, vault URL,
    device) out of the key files earlier versions wrote; old id -> new id."""
    renamed = dict(repo.relabel_legacy_keys())
    for old, new in renamed.items():
        ctx.warn(
            f"key slot {old[:8]} (written by an earlier version) no longer shows its kind to "
            f"the storage provider; its id is now {new[:8]}"
        )
    return renamed


def warn_unverified_slots(ctx: Context, slots: Any, repo: Repository) -> None:
    """Slots an earlier version named password slots in clear are never removed on that
    word (whoever can write the storage could have renamed the recovery key so)."""
    for slot in slots.unverified_slots_of_account(repo):
        ctx.warn(
            f"key slot {slot.id[:8]} was named a password slot by an earlier version, in "
            "clear, which backvault cannot verify, so it was left in place; if it is your old "
            "password slot it opens nothing any more (`backvault key remove` removes it)"
        )


def require_vault(ctx: Context) -> VaultSettings:
    try:
        return ctx.settings().require_vault()
    except SettingsError as exc:
        fail(str(exc), 2)


def delete_vault_record(vault: VaultSettings) -> None:
    from backvault.vaultclient.http import VaultRefused, VaultUnavailable
    from backvault.vaultclient.slots import PasswordSlots

    try:
        PasswordSlots(vault).delete_record()
    except (VaultRefused, VaultUnavailable) as exc:
        vault_failure(exc, vault)


def enable_password(ctx: Context, max_attempts: int | None) -> None:
    from backvault.vaultclient.http import VaultRefused, VaultUnavailable
    from backvault.vaultclient.slots import PasswordSlots

    vault = require_vault(ctx)
    repo = open_repo(ctx)
    password = read_new_password(ctx)
    slots = PasswordSlots(vault)
    old = slots.slots_of_account(repo)
    try:
        key_id = slots.enable(repo, password.encode(), max_attempts)
    except (VaultRefused, VaultUnavailable) as exc:
        vault_failure(exc, vault)
    # The vault holds one record per account: earlier password slots no longer open.
    for slot in old:
        repo.remove_key(slot.id)
    warn_unverified_slots(ctx, slots, repo)
    renamed = relabel_legacy_keys(ctx, repo)
    ctx.emit_json(
        {
            "password_key_id": key_id,
            "vault": vault.url,
            "account": vault.account,
            "replaced": [s.id for s in old],
            "renamed": renamed,
        }
    )
    ctx.out(
        f"Added password slot {key_id[:8]}: your password opens this repository through the "
        f"vault at {vault.url} (account {vault.account})."
    )


# --- the password ----------------------------------------------------------------------


@cli.group()
def password() -> None:
    """Change, check or turn off the password kept by the vault."""


@password.command("change")
@click.option("--max-attempts", type=int, help="Wrong guesses allowed.")
@pass_context
def password_change(ctx: Context, max_attempts: int | None) -> None:
    """Set a new password: a new slot secret and vault record; the old ones are erased.

    Opens the repository first with this device's key, BACKVAULT_KEY, or the current
    password."""
    from backvault.vaultclient.slots import PasswordSlots

    vault = require_vault(ctx)
    repo = open_repo(ctx)
    slots = PasswordSlots(vault)
    old = slots.slots_of_account(repo)
    if not slots.slots_of_account(repo, verified_only=False):
        fail(
            "this repository has no password slot for this account; add one with "
            "`backvault key add --password`"
        )
    new = read_new_password(ctx, "BACKVAULT_NEW_PASSWORD")
    from backvault.vaultclient.http import VaultRefused, VaultUnavailable

    try:
        key_id = slots.enable(repo, new.encode(), max_attempts)  # replaces the vault record
    except (VaultRefused, VaultUnavailable) as exc:
        vault_failure(exc, vault)
    for slot in old:
        repo.remove_key(slot.id)
    warn_unverified_slots(ctx, slots, repo)
    renamed = relabel_legacy_keys(ctx, repo)
    ctx.emit_json({"password_key_id": key_id, "removed": [s.id for s in old], "renamed": renamed})
    ctx.out("Password changed: the old one no longer opens anything.")


@password.command("check")
@pass_context
def password_check(ctx: Context) -> None:
    """Check that you still know your password (a real login: a wrong one uses an attempt;
    a right one forgives this device's wrong tries, not other people's).

    First, at no cost, checks that the vault still holds the record this device
    registered."""
    from backvault.vaultclient.http import VaultRefused, VaultUnavailable
    from backvault.vaultclient.slots import PasswordSlots, UnwrapFailed

    vault = require_vault(ctx)
    slots = PasswordSlots(vault)
    try:
        record = slots.check_record()
    except (VaultRefused, VaultUnavailable) as exc:
        vault_failure(exc, vault)
    status = record.status
    if not status.get("exists"):
        fail(ERASED_MESSAGE, EXIT_WRONG_KEY)
    if record.ours is False:
        fail(
            f"the vault at {vault.url} holds a record for account {vault.account!r} that this "
            f"device did not register (it registered {str(record.remembered)[:16]}, the vault "
            f"holds {str(status.get('fingerprint'))[:16]}): someone with the account token "
            "replaced it, so your password no longer opens the repository through the vault. "
            "Open the repository with your 64-digit key and run `backvault password change`, "
            "and ask your service to revoke the account token",
            EXIT_RECORD_REPLACED,
        )
    if record.ours is None:
        ctx.warn(
            "note: this device did not register the vault's record, so it cannot tell whether "
            "someone replaced it; `backvault password change` registers one it can check"
        )
    left = int(str(status["attempts_left"]))
    ctx.out(
        f"The vault allows {left} more wrong {'guess' if left == 1 else 'guesses'} "
        f"(and at most {status.get('guess_cap')} within {status.get('guess_cap_days', 0):g} "
        "days); this check counts as one until it succeeds."
    )
    if left == 1:
        ctx.warn("warning: a wrong password now erases the key for good")
    typed = read_password("Password")
    if not typed:
        fail("no password given (BACKVAULT_PASSWORD or a prompt)", 2)
    try:
        recovery = slots.recover(typed.encode())
    except (VaultRefused, VaultUnavailable, UnwrapFailed) as exc:
        vault_failure(exc, vault)
    result = recovery.login
    report_legacy_upgrade(ctx, recovery)
    ctx.emit_json(
        {
            "ok": True,
            "attempts_left": result.attempts_left,
            "forgiven": result.forgiven,
            "others_counted": result.counted,
            "others_since": result.counted_since,
            "record_is_ours": record.ours or recovery.upgraded is True,
            "fingerprint": status.get("fingerprint"),
            "moved_to_a_fresh_credential_identifier": recovery.upgraded,
        }
    )
    ctx.out(
        f"Your password is right. The vault allows {result.attempts_left} wrong guesses now"
        + (
            f" ({result.forgiven} of this device's wrong tries forgiven)."
            if result.forgiven
            else "."
        )
    )
    if result.counted:
        since = (
            time.strftime(" since %Y-%m-%d %H:%M", time.localtime(result.counted_since))
            if result.counted_since
            else ""
        )
        noun = "guess" if result.counted == 1 else "guesses"
        ctx.warn(
            f"warning: {result.counted} wrong {noun} you did not make{since} stay counted: "
            "someone with your account token may be guessing. `backvault password change` "
            "starts a fresh record; ask your service to revoke the token"
        )


@password.command("disable")
@pass_context
def password_disable(ctx: Context) -> None:
    """Remove the password slot and erase the vault record (keeps the 64-digit key)."""
    from backvault.vaultclient.slots import PasswordSlots

    vault = require_vault(ctx)
    repo = open_repo(ctx)
    slots = PasswordSlots(vault)
    mine = slots.slots_of_account(repo)
    others = [s for s in repo.list_keys() if s not in mine]
    if not others:
        fail(
            "refusing: the password is the only key of this repository; add a 64-digit key "
            "first (`backvault key add`)"
        )
    delete_vault_record(vault)
    for slot in mine:
        repo.remove_key(slot.id)
    warn_unverified_slots(ctx, slots, repo)
    ctx.emit_json({"removed": [s.id for s in mine]})
    ctx.out("The password is turned off: the vault record is erased and the slot removed.")


# --- settings -----------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.pass_context
def config(click_ctx: click.Context) -> None:
    """Show settings (with where each comes from), or set and unset them."""
    if click_ctx.invoked_subcommand is None:
        ctx = click_ctx.find_object(Context)
        assert ctx is not None
        doc = ctx.settings().describe()
        ctx.emit_json(doc)
        for key in ("repository", "vault.url", "vault.account", "vault.token"):
            source = doc["sources"].get(key, "not set")
            ctx.out(f"{key:<14} {doc[key] if doc[key] is not None else '-':<40} ({source})")
        ctx.out(f"file: {doc['file']}")


@config.command("set")
@click.argument("name")
@click.argument("value", required=False)
@pass_context
def config_set(ctx: Context, name: str, value: str | None) -> None:
    """Set NAME (repository, vault.url, vault.account) to VALUE.

    The vault token is never given on the command line (other users see command lines,
    and shells keep them): `backvault config set vault.token` asks for it at a hidden
    prompt, `backvault config set vault.token -` reads it from standard input. It is kept
    in the OS keyring (or a file only you can read), not in the settings file."""
    from backvault.device.settings import TOKEN, set_value, store_token

    if name == TOKEN:
        where = store_token(read_token(value))
        ctx.emit_json({"set": name, "where": where})
        ctx.out(f"{name} stored in {where}")
        return
    if value is None:
        fail(f"give a value: `backvault config set {name} VALUE`", 2)
    try:
        path = set_value(name, value)
    except SettingsError as exc:
        fail(str(exc), 2)
    ctx.emit_json({"set": name, "file": str(path)})
    ctx.out(f"{name} = {value} (in {path})")


def read_token(value: str | None) -> str:
    """The vault token from a hidden prompt (no VALUE) or standard input (VALUE "-")."""
    if value not in (None, "-"):
        fail(
            "refusing to take the vault token from the command line, where other users and "
            "your shell history can read it: run `backvault config set vault.token` and "
            "paste it at the prompt, or pipe it into `backvault config set vault.token -`",
            2,
        )
    if value == "-":
        token = sys.stdin.readline().strip()
    elif sys.stdin.isatty():
        token = str(click.prompt("Vault token", hide_input=True)).strip()
    else:
        fail("give the vault token on standard input: `… | backvault config set vault.token -`", 2)
    if not token or any(c.isspace() for c in token):
        fail("that is not a vault token (empty, or with spaces inside); nothing was stored", 2)
    return token


@config.command("unset")
@click.argument("name")
@pass_context
def config_unset(ctx: Context, name: str) -> None:
    """Remove NAME from the settings (the token from the keyring too)."""
    from backvault.device.settings import TOKEN, forget_token, set_value

    if name == TOKEN:
        removed = forget_token()
        ctx.emit_json({"unset": name, "removed": removed})
        ctx.out(f"{name} removed from: {', '.join(removed)}" if removed else f"{name} was not set")
        return
    try:
        path = set_value(name, None)
    except SettingsError as exc:
        fail(str(exc), 2)
    ctx.emit_json({"unset": name, "file": str(path)})
    ctx.out(f"{name} removed from {path}")


@key.command("show")
@click.option("--restic", "for_restic", is_flag=True, help="Explain how to use it with restic.")
@pass_context
def key_show(ctx: Context, for_restic: bool) -> None:
    """Check a 64-digit key and show its canonical form.

    backvault never stores your 64-digit key, so it cannot print it again. Give it here
    (typed at the prompt or in BACKVAULT_KEY) and this checks that it opens the repository
    and prints it in the form restic takes as the repository password: 64 lowercase hex
    digits, no spaces. With that, stock restic opens the repository without backvault:

        restic -r REPO restore latest --target DIR
    """
    location = ctx.require_repo()
    text = key_from_env() or (ask_key() if sys.stdin.isatty() else None)
    if text is None:
        fail("give the key in BACKVAULT_KEY or run interactively to type it", 2)
    repo = open_with_text(open_backend(location), text)
    canonical = recovery_key.canonical(recovery_key.parse(text))
    ctx.emit_json({"key_id": repo.key_id, "restic_password": canonical})
    ctx.out(f"This key opens repository {repo.config.id[:8]} (key slot {str(repo.key_id)[:8]}).")
    ctx.out(f"As restic's password it is:\n\n    {canonical}\n")
    if for_restic:
        ctx.out(f"With stock restic:  restic -r {location} restore latest --target DIR")
        ctx.out("and paste the line above when restic asks for the repository password.")


@cli.command("forget-device")
@pass_context
def forget_device(ctx: Context) -> None:
    """Wipe this device's cached key for the repository."""
    location = open_backend(ctx.require_repo()).location
    removed = keycache.forget(location)
    ctx.emit_json({"removed": removed})
    if removed:
        ctx.out("This device no longer holds a key for the repository: " + ", ".join(removed) + ".")
    else:
        ctx.out("This device held no key for the repository.")


# --- backup, snapshots, ls, restore, check ---------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--tag", "tags", multiple=True, help="Tag the snapshot (repeatable).")
@click.option("--host", help="Hostname to record (default: this machine's).")
@pass_context
def backup(ctx: Context, paths: tuple[str, ...], tags: tuple[str, ...], host: str | None) -> None:
    """Back up PATHS (folders, files, SQLite databases) as a new snapshot."""
    repo = open_repo(ctx)
    state_file = cache_dir() / repo.config.id / "sqlite-state.json"
    with progress_bar(ctx, "backup") as reporter:
        try:
            result = Backup(repo, reporter, sqlite_state_file=state_file).run(
                list(paths), tags=list(tags), hostname=host, scan_first=reporter.bar is not None
            )
        except FileNotFoundError as exc:
            fail(f"cannot back up: {exc}", 2)
    ctx.emit_json(result.to_json())
    changed = (
        f"{result.files_new} new, {result.files_changed} changed, "
        f"{result.files_unmodified} unchanged"
    )
    ctx.out(
        f"snapshot {result.snapshot_id[:8]} saved: "
        f"{result.files_new + result.files_changed + result.files_unmodified} files ({changed}), "
        f"{human_bytes(result.bytes_read)} read, {human_bytes(result.bytes_added)} new data "
        f"({human_bytes(result.bytes_stored)} stored) in {result.seconds:.1f} s"
    )
    if result.errors:
        for path, error in result.errors:
            ctx.error_line(f"could not read {path}: {error}")
        fail(
            f"the snapshot is incomplete: {len(result.errors)} entries could not be read",
            EXIT_INCOMPLETE,
        )


@cli.command()
@pass_context
def snapshots(ctx: Context) -> None:
    """List snapshots, oldest first."""
    repo = open_repo(ctx)
    errors: list[DamagedObject] = []
    items = repo.list_snapshots(errors=errors)
    ctx.emit_json(
        [
            {
                "id": name,
                "short_id": name[:8],
                "time": snap.time,
                "hostname": snap.hostname,
                "username": snap.username,
                "paths": snap.paths,
                "tags": snap.tags,
                "tree": snap.tree.hex(),
                "parent": snap.parent.hex() if snap.parent else None,
            }
            for name, snap in items
        ]
    )
    if not ctx.json and not ctx.quiet:
        table = Table("ID", "time", "host", "tags", "paths")
        for name, snap in items:
            table.add_row(
                cell(name[:8]),
                cell(snap.time[:19].replace("T", " ")),
                cell(shown(snap.hostname)),
                cell(shown(",".join(snap.tags))),
                cell("\n".join(shown(path) for path in snap.paths)),
            )
        ctx.console.print(table)
        ctx.out(f"{len(items)} snapshots")
    for error in errors:
        ctx.error_line(str(error))
    if errors:
        fail(f"{len(errors)} snapshot files are damaged", EXIT_INCOMPLETE)


@cli.command("ls")
@click.argument("snapshot")
@pass_context
def ls_command(ctx: Context, snapshot: str) -> None:
    """List the files in SNAPSHOT (an ID or 'latest')."""
    repo = open_repo(ctx)
    name, snap = repo.find_snapshot(snapshot)
    entries: list[dict[str, Any]] = []
    # Depth first, in tree order, with a stack of our own: a snapshot may nest folders
    # deeper than Python's recursion limit.
    # Shared subtrees are legitimate (every empty folder is the same tree), but a tree can
    # name the same folder twice at every level: count before listing 2^40 entries.
    expanded, _ = fmt.expanded_totals(
        snap.tree, lambda tree: fmt.TreeShape.of(repo.load_tree(tree)), {}
    )
    if expanded > fmt.MAX_RESTORE_ENTRIES:
        fail(
            f"snapshot {name[:8]} expands to {expanded:,} entries, more than "
            f"{fmt.MAX_RESTORE_ENTRIES:,} (a tree that names the same folder many times); "
            "not listing it",
            EXIT_INCOMPLETE,
        )
    stack = [("", iter(repo.load_tree(snap.tree)))]
    while stack:
        prefix, nodes = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            continue
        path = f"{prefix}/{node.name}"
        entries.append({"path": path, "type": node.type, "size": node.size, "mtime": node.mtime})
        if node.type == "dir" and node.subtree is not None:
            stack.append((path, iter(repo.load_tree(node.subtree))))
    ctx.emit_json({"snapshot": name, "entries": entries})
    for entry in entries:
        ctx.out(shown(entry["path"]))


@cli.command()
@click.argument("snapshot")
@click.option("-t", "--target", required=True, type=click.Path(), help="Folder to restore into.")
@click.option("-i", "--include", "includes", multiple=True, help="Restore only matching paths.")
@click.option("--overwrite", is_flag=True, help="Allow a non-empty target; replace files.")
@click.option(
    "--special-files", is_flag=True, help="Restore device nodes too (as root; skipped otherwise)."
)
@click.option("--keep-setuid", is_flag=True, help="Restore setuid and setgid bits of files.")
@click.option(
    "--ignore-free-space",
    is_flag=True,
    help="Restore even if the target's file system has less free space than it needs.",
)
@pass_context
def restore(
    ctx: Context,
    snapshot: str,
    target: str,
    includes: tuple[str, ...],
    overwrite: bool,
    special_files: bool,
    keep_setuid: bool,
    ignore_free_space: bool,
) -> None:
    """Restore SNAPSHOT (an ID or 'latest') into TARGET."""
    repo = open_repo(ctx)
    name, snap = repo.find_snapshot(snapshot)
    with progress_bar(ctx, "restore") as reporter:
        restorer = Restorer(
            repo,
            target,
            list(includes),
            overwrite,
            reporter,
            special_files=special_files,
            keep_setuid=keep_setuid,
            ignore_free_space=ignore_free_space,
        )
        result = restorer.run(snap, name)
    ctx.emit_json({"snapshot": name, **result.to_json()})
    ctx.out(
        f"restored snapshot {name[:8]} into {target}: {result.files} files, {result.dirs} "
        f"folders, {result.symlinks} links, {human_bytes(result.bytes)}"
    )
    for path, warning in result.warnings:
        ctx.error_line(f"warning: {path}: {warning}")
    if result.warnings_unlisted:
        ctx.error_line(f"warning: {result.warnings_unlisted:,} more warnings not listed")
    if result.damaged_count:
        for path, error in result.damaged:
            ctx.error_line(f"not restored: {path}: {error}")
        if result.damaged_unlisted:
            ctx.error_line(f"not restored: {result.damaged_unlisted:,} more entries not listed")
        count = result.damaged_count
        fail(
            f"{count} {'entry' if count == 1 else 'entries'} could not be restored (listed "
            "above); everything else was restored",
            EXIT_INCOMPLETE,
        )


def subset_filter(spec: str | None) -> Callable[[str], bool] | None:
    """--read-data-subset: "n/t" (the n-th of t groups, by pack name) or "P%" (a random
    share of packs)."""
    if spec is None:
        return None
    import random

    text = spec.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            rng = random.Random()
            return lambda _name: rng.random() < share
        n, t = (int(x) for x in text.split("/"))
        if not 1 <= n <= t:
            raise ValueError
    except ValueError:
        fail(f"--read-data-subset takes n/t (1 ≤ n ≤ t) or a percentage like 10%, not {spec!r}", 2)
    return lambda name: int(name[:8], 16) % t == n - 1


@cli.command()
@click.option("--read-data", is_flag=True, help="Also read and verify every stored byte.")
@click.option("--read-data-subset", help="Read only part of the data: n/t, or a percentage.")
@pass_context
def check(ctx: Context, read_data: bool, read_data_subset: str | None) -> None:
    """Check the repository's structure (and with --read-data, all data)."""
    subset = subset_filter(read_data_subset)
    read_data = read_data or subset is not None
    repo = open_repo(ctx)
    total = sum(size for _, size in repo.backend.list(FileType.DATA)) if read_data else None
    with progress_bar(ctx, "check") as reporter, RepositoryLock(repo):
        reporter.start(total, "reading data" if read_data else "checking")
        result = Checker(repo, reporter.advance).run(read_data=read_data, subset=subset)
    ctx.emit_json(result.to_json())
    for warning in result.warnings:
        ctx.error_line(f"warning: {warning}")
    for error in result.errors:
        ctx.error_line(f"error: {error}")
    summary = f"{result.snapshots} snapshots, {result.trees} trees, {result.packs} packs"
    if read_data:
        summary += f", {result.blobs} blobs and {human_bytes(result.bytes_read)} read"
    if result.errors:
        fail(f"check found {len(result.errors)} problems ({summary})", EXIT_INCOMPLETE)
    ctx.out(f"no errors found ({summary})")


@cli.command()
@click.option("--keep-last", type=int, default=0, help="Keep the N newest snapshots.")
@click.option(
    "--keep-hourly", type=int, default=0, help="Keep the newest of each of the last N hours."
)
@click.option("--keep-daily", type=int, default=0, help="… of each of the last N days.")
@click.option("--keep-weekly", type=int, default=0, help="… of each of the last N weeks.")
@click.option("--keep-monthly", type=int, default=0, help="… of each of the last N months.")
@click.option("--keep-yearly", type=int, default=0, help="… of each of the last N years.")
@click.option("--keep-tag", "keep_tags", multiple=True, help="Keep every snapshot with this tag.")
@click.option(
    "--group-by",
    default="host,paths",
    show_default=True,
    help="Apply the policy per group of host, paths, tags.",
)
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.option("--prune", "then_prune", is_flag=True, help="Then remove the data no snapshot uses.")
@pass_context
def forget(
    ctx: Context,
    keep_last: int,
    keep_hourly: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    keep_yearly: int,
    keep_tags: tuple[str, ...],
    group_by: str,
    dry_run: bool,
    then_prune: bool,
) -> None:
    """Remove snapshots that a retention policy does not keep (restic's policies)."""
    from backvault.repo import policy as retention

    policy = retention.Policy(
        keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_tags
    )
    groups = tuple(g.strip() for g in group_by.split(",") if g.strip())
    repo = open_repo(ctx)
    with RepositoryLock(repo, exclusive=not dry_run):
        try:
            decisions = retention.apply(repo.list_snapshots(), policy, groups)
        except ValueError as exc:
            fail(str(exc), 2)
        removed = []
        for decision in sorted(decisions, key=lambda d: d.snapshot.time):
            mark = "keep  " if decision.keep else "remove"
            ctx.out(
                f"{mark} {decision.snapshot_id[:8]}  {decision.snapshot.time[:19].replace('T', ' ')}  "
                f"{', '.join(decision.reasons)}"
            )
            if not decision.keep:
                removed.append(decision.snapshot_id)
                if not dry_run:
                    repo.backend.remove(FileType.SNAPSHOT, decision.snapshot_id)
        ctx.emit_json(
            {
                "keep": [{"id": d.snapshot_id, "reasons": d.reasons} for d in decisions if d.keep],
                "remove": removed,
                "dry_run": dry_run,
            }
        )
        ctx.out(
            f"{'would remove' if dry_run else 'removed'} {len(removed)} of {len(decisions)} snapshots"
        )
    if then_prune and not dry_run:
        run_prune(ctx, repo, dry_run=False, max_unused=0.05)


def run_prune(ctx: Context, repo: Repository, dry_run: bool, max_unused: float) -> None:
    from backvault.engine import prune as pruning

    with RepositoryLock(repo, exclusive=True):
        the_plan = pruning.plan(repo, max_unused)
        summary = the_plan.summary()
        ctx.out(
            f"{summary['packs_to_delete']} packs to delete, {summary['packs_to_repack']} to "
            f"repack ({human_bytes(summary['bytes_to_repack'])} still used in them), "
            f"{human_bytes(summary['bytes_unused'])} of {human_bytes(summary['bytes_total'])} unused"
        )
        if not dry_run:
            pruning.run(repo, the_plan, progress=None)
            ctx.out("prune finished")
    ctx.emit_json({**summary, "dry_run": dry_run})


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only show what would be done.")
@click.option(
    "--max-unused",
    default="5%",
    show_default=True,
    help="Repack packs with more unused data than this.",
)
@pass_context
def prune(ctx: Context, dry_run: bool, max_unused: str) -> None:
    """Remove data no snapshot references (safe to interrupt at any point)."""
    try:
        share = float(max_unused.rstrip("%")) / 100
    except ValueError:
        fail(f"--max-unused takes a percentage, not {max_unused!r}", 2)
    run_prune(ctx, open_repo(ctx), dry_run, share)


@cli.group()
def repair() -> None:
    """Repair a damaged repository."""


@repair.command("index")
@pass_context
def repair_index(ctx: Context) -> None:
    """Rebuild the index from the packs' own headers (after index files were lost or damaged)."""
    from backvault.engine.prune import rebuild_index

    repo = open_repo(ctx)
    with RepositoryLock(repo, exclusive=True):
        count, bad = rebuild_index(repo)
    ctx.emit_json({"packs_indexed": count, "unreadable_packs": bad})
    ctx.out(f"indexed {count} packs")
    for line in bad:
        ctx.warn(f"unreadable pack: {line}")
    if bad:
        fail(
            f"{len(bad)} packs could not be read; run `backvault check --read-data`",
            EXIT_INCOMPLETE,
        )


@cli.command()
@click.option("--remove-all", is_flag=True, help="Remove every lock, not only stale ones.")
@pass_context
def unlock(ctx: Context, remove_all: bool) -> None:
    """Remove stale locks (older than 30 minutes, or whose process is gone)."""
    repo = open_repo(ctx)
    removed = remove_stale_locks(repo, all_locks=remove_all)
    ctx.emit_json({"removed": removed})
    ctx.out(f"removed {removed} locks")


# --- schedule and demo --------------------------------------------------------------------


@cli.group()
def schedule() -> None:
    """Daily unattended backups (systemd user timer, or a cron line)."""


@schedule.command("install")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--at", "at", default="03:00", show_default=True, help="Time of day, HH:MM.")
@click.option("--cron", "force_cron", is_flag=True, help="Print a cron line even with systemd.")
@pass_context
def schedule_install(ctx: Context, paths: tuple[str, ...], at: str, force_cron: bool) -> None:
    """Back up PATHS every day with this device's cached key (no password, works without
    the vault)."""
    from backvault.device.schedule import install

    location = open_backend(ctx.require_repo()).location
    if keycache.recall(location) is None:
        fail(
            "this device holds no key for the repository yet: open it once (e.g. "
            "`backvault snapshots`) so that scheduled backups need no password"
        )
    try:
        result = install(location, list(paths), at, force_cron)
    except ValueError as exc:
        fail(str(exc), 2)
    ctx.emit_json(
        {
            "how": result.how,
            "files": [str(f) for f in result.files],
            "cron_line": result.cron_line,
            "enabled": result.enabled,
        }
    )
    ctx.out(result.message)


@schedule.command("remove")
@pass_context
def schedule_remove(ctx: Context) -> None:
    """Remove the daily backup timer."""
    from backvault.device.schedule import remove

    removed = remove()
    ctx.emit_json({"removed": [str(p) for p in removed]})
    if removed:
        ctx.out("removed " + ", ".join(str(p) for p in removed))
    else:
        ctx.out("no timer was installed (remove a cron line with `crontab -e`)")


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo's files afterwards.")
def demo(keep: bool) -> None:
    """The whole story on embedded defaults, offline, in under a minute."""
    from backvault.demo import main as run_demo

    run_demo(keep)


# --- the vault ----------------------------------------------------------------------------


def vault_options(command: F) -> F:
    """Options shared by the vault's commands; each overrides the config file and the
    BACKVAULT_VAULT_* environment."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            help="TOML settings file (see docs/operator-guide.md).",
        ),
        click.option("--db", help="Database URL: sqlite:///PATH or postgresql://…"),
        click.option(
            "--data-dir",
            help="Folder of the embedded SQLite database (the key file is kept elsewhere).",
        ),
        click.option(
            "--sealing",
            type=click.Choice(["file", "pkcs11"]),
            help="Seal secrets with a key file (default) or an HSM over PKCS#11.",
        ),
        click.option("--sealing-key-file", help="The sealing key file (file sealing)."),
        click.option("--pkcs11-module", help="PKCS#11 library (default: SoftHSM2's)."),
        click.option("--pkcs11-token-label", help="Label of the HSM token."),
        click.option("--pkcs11-pin-file", help="File holding the token's user PIN."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_vault_settings(config_file: str | None, **overrides: Any) -> Any:
    from backvault.vault.config import load_settings

    try:
        return load_settings(config_file, overrides)
    except (OSError, ValueError) as exc:
        fail(f"vault settings: {exc}", 2)


@cli.group()
def vault() -> None:
    """Run and administer a Backup Key Vault (OPAQUE, exact guess limit, sealed records)."""


@vault.command("serve")
@vault_options
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8750).")
@click.option("--max-attempts", type=int, help="Wrong guesses allowed per record (default 10).")
@click.option("--jwt-public-key-file", help="Ed25519 public key (PEM) of the account system.")
@click.option("--jwt-audience", help="This vault's own audience (its public URL or unique id).")
@click.option("--jwt-issuer", help="The account system's issuer (iss of its tokens).")
@click.option("--tls-cert", help="TLS certificate (PEM) to serve HTTPS directly.")
@click.option("--tls-key", help="TLS private key (PEM).")
def vault_serve(config_file: str | None, **overrides: Any) -> None:
    """Run a vault node until SIGTERM or Ctrl-C (then finish requests and stop)."""
    from backvault.vault.sealing import SealingError
    from backvault.vault.server import serve

    settings = load_vault_settings(config_file, **overrides)
    try:
        serve(settings)
    except SealingError as exc:
        fail(f"sealing: {exc}")
    except ValueError as exc:
        fail(f"vault settings: {exc}", 2)


@vault.command("init-hsm")
@vault_options
def vault_init_hsm(config_file: str | None, **overrides: Any) -> None:
    """Create the sealing key inside the HSM token, once, before the first node starts
    (AES-256; encrypt/decrypt only, with CKM_AES_GCM only; sensitive, not extractable,
    not modifiable, private), and record it in the vault's database with its check value
    (printed: compare it later) and its own vouch. Does nothing if it already exists, and
    refuses an existing key with weaker attributes."""
    from backvault.vault.sealing import SealingError, short_check_value
    from backvault.vault.server import make_sealer, open_database

    settings = load_vault_settings(config_file, **overrides)
    if settings.sealing != "pkcs11":
        fail("init-hsm is for --sealing pkcs11 (a key file is created on first start)", 2)
    engine = open_database(settings)
    try:
        sealer = make_sealer(settings, engine, create_hsm_key=True)
    except SealingError as exc:
        fail(f"sealing: {exc}")
    finally:
        engine.dispose()
    version = sealer.current_version
    click.echo(
        f"the sealing key is ready: {sealer.description}, version {version}, check value "
        f"{short_check_value(sealer.check_value(version))}"
    )
    sealer.close()


def vault_token_lifetime(expires_in: str | None) -> float | None:
    from backvault.vault.config import SettingsError, parse_duration

    if expires_in is None:
        return None
    try:
        return parse_duration(expires_in)
    except SettingsError as exc:
        fail(f"--expires-in: {exc}", 2)


EXPIRES_IN = click.option(
    "--expires-in",
    metavar="DURATION",
    help="The token stops working after this long (e.g. 90d, 12h); default: never.",
)


@vault.command("add-account")
@vault_options
@EXPIRES_IN
@click.argument("name")
def vault_add_account(
    config_file: str | None, name: str, expires_in: str | None, **overrides: Any
) -> None:
    """Create an account for self-hosting and print its bearer token (shown once)."""
    from backvault.vault.sealing import SealingError
    from backvault.vault.server import open_vault
    from backvault.vault.service import VaultError

    lifetime = vault_token_lifetime(expires_in)
    settings = load_vault_settings(config_file, **overrides)
    try:
        opened = open_vault(settings)
        token = opened.service.add_account(name, lifetime)
    except (VaultError, SealingError) as exc:
        fail(str(exc))
    if opened.first_start:
        click.echo(opened.note, err=True)
    click.echo(token)


@vault.command("rotate-token")
@vault_options
@EXPIRES_IN
@click.argument("name")
def vault_rotate_token(
    config_file: str | None, name: str, expires_in: str | None, **overrides: Any
) -> None:
    """Print a new bearer token for a built-in account (shown once); the old one stops
    working at once on every node. Also undoes `revoke-token`. The record is untouched."""
    from backvault.vault.sealing import SealingError
    from backvault.vault.server import make_service
    from backvault.vault.service import VaultError

    lifetime = vault_token_lifetime(expires_in)
    settings = load_vault_settings(config_file, **overrides)
    try:
        token = make_service(settings).rotate_token(name, lifetime)
    except (VaultError, SealingError) as exc:
        fail(str(exc))
    click.echo(token)


@vault.command("revoke-token")
@vault_options
@click.argument("name")
def vault_revoke_token(config_file: str | None, name: str, **overrides: Any) -> None:
    """Make a built-in account's token stop working, at once on every node (until
    `rotate-token` gives the account a new one). The record is untouched."""
    from backvault.vault.sealing import SealingError
    from backvault.vault.server import make_service
    from backvault.vault.service import VaultError

    settings = load_vault_settings(config_file, **overrides)
    try:
        make_service(settings).revoke_token(name)
    except (VaultError, SealingError) as exc:
        fail(str(exc))
    click.echo(
        f"the token of {name} is revoked; `backvault vault rotate-token {name}` issues a new one"
    )


@vault.command("migrate-jwt-records")
@vault_options
@click.argument("names", nargs=-1)
def vault_migrate_jwt_records(
    config_file: str | None, names: tuple[str, ...], **overrides: Any
) -> None:
    """Move records that JWT subjects made before they had their own namespace (keyed by
    the bare subject, with no built-in account of that name) to the subject's account
    `jwt:SUBJECT`. Passwords, counters and audit history move with them. Without NAMES,
    every such record moves; records of built-in accounts never do."""
    from backvault.vault.sealing import SealingError
    from backvault.vault.server import make_service
    from backvault.vault.service import VaultError

    settings = load_vault_settings(config_file, **overrides)
    try:
        result = make_service(settings).migrate_jwt_records(list(names) or None)
    except (VaultError, SealingError) as exc:
        fail(str(exc))
    if not result.moved and not result.kept:
        click.echo("no record made by a JWT subject is left to move")
    for name in result.moved:
        click.echo(f"moved {name} -> jwt:{name}")
    for name in result.kept:
        click.echo(
            f"kept {name}: the JWT subject already made a new record since; the old one "
            "stays under the bare name, which no token reaches"
        )


@vault.command("rotate-sealing-key")
@vault_options
@click.option(
    "--resume",
    is_flag=True,
    help="Finish an interrupted rotation: re-seal under the current version, make no new one.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10000),
    default=100,
    show_default=True,
    help="Values re-sealed per transaction.",
)
@click.option(
    "--max-batches",
    type=click.IntRange(1),
    help="Stop after this many batches (spread the work; --resume continues).",
)
def vault_rotate_sealing_key(
    config_file: str | None,
    resume: bool,
    batch_size: int,
    max_batches: int | None,
    **overrides: Any,
) -> None:
    """Make a new sealing key version and re-seal every sealed value under it, in small
    transactions, while the nodes keep serving. Safe to interrupt and run again."""
    from backvault.vault.rotation import rotate_sealing_key
    from backvault.vault.sealing import SealingError

    settings = load_vault_settings(config_file, **overrides)
    try:
        report = rotate_sealing_key(settings, resume, batch_size, max_batches, click.echo)
    except SealingError as exc:
        fail(f"sealing: {exc}")
    progress = report.progress
    where = ", ".join(f"{name}: {count}" for name, count in sorted(progress.resealed.items()))
    click.echo(
        f"re-sealed {progress.total} values under key version {report.key_version} in "
        f"{progress.batches} batches" + (f" ({where})" if where else "")
    )
    if not progress.finished:
        left = sum(sum(counts.values()) for counts in report.still_used.values())
        click.echo(
            f"stopped after {progress.batches} batches; {left} values still use older "
            "versions: continue with `backvault vault rotate-sealing-key --resume`"
        )
        return
    if report.still_used:
        left = sum(sum(counts.values()) for counts in report.still_used.values())
        fail(
            f"{left} values were sealed under older versions while this ran (a node had not "
            "switched yet): run `backvault vault rotate-sealing-key --resume`"
        )
    if report.old_versions:
        old = ", ".join(map(str, report.old_versions))
        first = report.old_versions[0]
        click.echo(
            f"every value is now sealed under key version {report.key_version}. Older "
            f"versions still exist: {old}. Database backups made before now open only with "
            "them. Once every node seals under the new version (metric "
            "backvault_vault_sealing_key_current_version) and those backups may become "
            f"unreadable, destroy each: `backvault vault destroy-sealing-key {first}`"
        )


@vault.command("destroy-sealing-key")
@vault_options
@click.argument("version", type=click.IntRange(1))
def vault_destroy_sealing_key(config_file: str | None, version: int, **overrides: Any) -> None:
    """Destroy an old sealing key version for good (refused while any value uses it).
    Database backups sealed under it can then never be opened again."""
    from backvault.vault.rotation import destroy_sealing_key
    from backvault.vault.sealing import SealingError

    settings = load_vault_settings(config_file, **overrides)
    try:
        destroy_sealing_key(settings, version)
    except SealingError as exc:
        fail(f"sealing: {exc}")
    click.echo(f"destroyed sealing key version {version}")


@vault.command("sealing-keys")
@vault_options
def vault_sealing_keys(config_file: str | None, **overrides: Any) -> None:
    """List the sealing key versions: which is current, how many stored values each
    seals, how many seals each has made (AES-GCM allows 2^32 per version) and its check
    value; then the keys in the key store that the vault ignores, and why (the log lines
    on stderr say which key)."""
    from backvault.vault.rotation import sealing_key_states
    from backvault.vault.sealing import SealingError

    settings = load_vault_settings(config_file, **overrides)
    try:
        states = sealing_key_states(settings)
    except SealingError as exc:
        fail(f"sealing: {exc}")
    click.echo(f"{'version':>7}  {'state':<7}  {'values':>8}  {'seals':>12}  check value")
    for state in states:
        click.echo(
            f"{state.version:>7}  {state.state:<7}  {state.values:>8}  {state.seals:>12}  "
            f"{state.check_value:<16}  {state.reason}".rstrip()
        )


@vault.command("openapi")
def vault_openapi() -> None:
    """Print the vault's OpenAPI document."""
    from backvault.vault.app import openapi_document

    click.echo(json.dumps(openapi_document(), indent=2))


# --- entry point ----------------------------------------------------------------------


ERROR_CODES: list[tuple[type[BaseException], int]] = [
    (MalformedKeyError, EXIT_WRONG_KEY),
    (recovery_key.MalformedKey, EXIT_WRONG_KEY),
    (WrongKey, EXIT_WRONG_KEY),
    (NoKeyAvailable, EXIT_WRONG_KEY),
    (NotARepository, EXIT_NO_REPOSITORY),
    (RepositoryLocked, EXIT_LOCKED),
    (TargetNotEmpty, EXIT_ERROR),
    (DiskFull, EXIT_ERROR),
    (SettingsError, 2),
    (DamagedObject, EXIT_INCOMPLETE),
    (RepositoryError, EXIT_ERROR),
    (StorageError, EXIT_ERROR),
]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a shutdown, `systemctl stop`, `kill`): unwound like Ctrl-C, so that what
    cleans up on the way out (the copy of a database, a lock) runs."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    errors = Console(stderr=True)
    # Before any thread or child process exists: children inherit no secret variables.
    withdraw_secrets_from_environment()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)

    def report(message: str) -> None:
        errors.print(f"backvault: {shown(message)}", highlight=False, markup=False, soft_wrap=True)

    try:
        cli.main(args=argv, prog_name="backvault", standalone_mode=False)
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
