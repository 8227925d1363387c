"""The backvault command line.

Exit codes (docs/user-guide.md):
  0 success · 1 error · 2 usage error · 3 finished, but something is damaged or was
  skipped (backup could not read some files, restore could not restore some files, check
  found damage) · 10 wrong or malformed key · 11 no repository at that location ·
  12 repository locked · 130 interrupted
"""

from __future__ import annotations

import json
import os
import sys
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

from . import __version__
from .client import keycache
from .client.backup import Backup
from .client.paths import cache_dir
from .client.restore import DiskFull, Restorer, TargetNotEmpty
from .client.session import MalformedKeyError, NoKeyAvailable, open_repository, open_with_text
from .crypto import recovery_key
from .repo.check import Checker
from .repo.errors import (
    DamagedObject,
    NotARepository,
    RepositoryError,
    RepositoryLocked,
    WrongKey,
)
from .repo.lock import RepositoryLock, remove_stale_locks
from .repo.repository import Repository
from .storage import FileType, StorageError, open_backend

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INCOMPLETE = 3
EXIT_WRONG_KEY = 10
EXIT_NO_REPOSITORY = 11
EXIT_LOCKED = 12
EXIT_INTERRUPTED = 130

RECOVERY_SLOT_USER = "backvault-recovery-key"


@dataclass
class Context:
    repo: str | None
    json: bool
    quiet: bool
    console: Console
    errors: Console

    def out(self, message: str = "") -> None:
        if not self.quiet and not self.json:
            self.console.print(message, highlight=False, soft_wrap=True)

    def emit_json(self, doc: Any) -> None:
        if self.json:
            click.echo(json.dumps(doc, indent=2))

    def require_repo(self) -> str:
        if not self.repo:
            fail("no repository given: pass --repo PATH or set BACKVAULT_REPO", 2)
        return self.repo


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
                ctx.errors.print(message, highlight=False)

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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def ask_key() -> str:
    return str(click.prompt("64-digit key (or repository password)", hide_input=True))


def key_from_env() -> str | None:
    return os.environ.get("BACKVAULT_KEY") or None


def open_repo(ctx: Context) -> Repository:
    location = ctx.require_repo()
    ask = ask_key if sys.stdin.isatty() else None
    repo, _how = open_repository(location, key_from_env(), ask=ask)
    return repo


_pass_context_object = click.make_pass_decorator(Context)
F = TypeVar("F", bound=Callable[..., Any])


def _set_field(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(click_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            setattr(click_ctx.find_object(Context), name, value)

    return callback


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
            "-q",
            "--quiet",
            is_flag=True,
            expose_value=False,
            callback=_set_field("quiet"),
            help="Print only errors.",
        ),
    ):
        wrapped = decorator(wrapped)
    return wrapped  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-r", "--repo", envvar="BACKVAULT_REPO", help="Repository location (or BACKVAULT_REPO)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.version_option(__version__, prog_name="backvault")
@click.pass_context
def cli(click_ctx: click.Context, repo: str | None, as_json: bool, quiet: bool) -> None:
    """End-to-end encrypted backups in standard restic repositories.

    The key comes from BACKVAULT_KEY, this device's key cache, or a prompt.
    """
    click_ctx.obj = Context(
        repo=repo,
        json=as_json,
        quiet=quiet,
        console=Console(),
        errors=Console(stderr=True),
    )


# --- init and keys ------------------------------------------------------------------------


def recovery_key_block(secret: bytes) -> str:
    groups = recovery_key.display(secret).split(" ")
    rows = [" ".join(groups[i : i + 4]) for i in range(0, len(groups), 4)]
    return "\n".join(f"    {row}" for row in rows)


@cli.command()
@click.option("--no-remember", is_flag=True, help="Do not keep the key on this device.")
@pass_context
def init(ctx: Context, no_remember: bool) -> None:
    """Create a repository and its 64-digit recovery key (shown once)."""
    location = ctx.require_repo()
    backend = open_backend(location)
    secret = recovery_key.generate()
    repo = Repository.init(backend, recovery_key.canonical(secret).encode(), RECOVERY_SLOT_USER)
    where = "" if no_remember else keycache.remember(backend.location, repo.config.id, repo.key)
    ctx.emit_json(
        {
            "repository": backend.location,
            "id": repo.config.id,
            "recovery_key": recovery_key.canonical(secret),
            "recovery_key_groups": recovery_key.display(secret),
            "key_id": repo.key_id,
            "device_cache": where or None,
        }
    )
    ctx.out(f"Created repository {repo.config.id[:8]} at {backend.location}\n")
    ctx.out("Your 64-digit recovery key. Write it down and keep it somewhere safe;")
    ctx.out("it is shown only this once, and without it or the device nobody can restore:\n")
    ctx.out(recovery_key_block(secret) + "\n")
    ctx.out("Stock restic opens this repository with the same 64 digits typed without")
    ctx.out("spaces as the password (see `backvault key show --help`).")
    if where:
        ctx.out(f"This device remembers the repository key in {where}.")


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
                "kind": slot_kind(s.username),
                "username": s.username,
                "hostname": s.hostname,
                "created": s.created,
                "current": s.current,
            }
            for s in slots
        ]
    )
    table = Table("", "ID", "kind", "host", "created")
    for s in slots:
        table.add_row(
            "*" if s.current else "", s.id[:8], slot_kind(s.username), s.hostname, s.created[:19]
        )
    if not ctx.quiet and not ctx.json:
        ctx.console.print(table)


def slot_kind(username: str) -> str:
    if username == RECOVERY_SLOT_USER:
        return "recovery key"
    return f"password ({username})"


@key.command("add")
@pass_context
def key_add(ctx: Context) -> None:
    """Add another 64-digit recovery key (shown once); data is not re-uploaded."""
    repo = open_repo(ctx)
    secret = recovery_key.generate()
    key_id = repo.add_key(recovery_key.canonical(secret).encode(), RECOVERY_SLOT_USER)
    ctx.emit_json({"key_id": key_id, "recovery_key": recovery_key.canonical(secret)})
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
    repo.remove_key(target.id)
    ctx.emit_json({"removed": target.id})
    ctx.out(f"Removed key slot {target.id[:8]} ({slot_kind(target.username)}).")


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
            ctx.errors.print(f"could not read {path}: {error}", highlight=False)
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
                name[:8],
                snap.time[:19].replace("T", " "),
                snap.hostname,
                ",".join(snap.tags),
                "\n".join(snap.paths),
            )
        ctx.console.print(table)
        ctx.out(f"{len(items)} snapshots")
    for error in errors:
        ctx.errors.print(str(error), highlight=False)
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

    def walk(tree: bytes, prefix: str) -> None:
        for node in repo.load_tree(tree):
            path = f"{prefix}/{node.name}"
            entries.append(
                {"path": path, "type": node.type, "size": node.size, "mtime": node.mtime}
            )
            if node.type == "dir" and node.subtree is not None:
                walk(node.subtree, path)

    walk(snap.tree, "")
    ctx.emit_json({"snapshot": name, "entries": entries})
    for entry in entries:
        ctx.out(entry["path"])


@cli.command()
@click.argument("snapshot")
@click.option("-t", "--target", required=True, type=click.Path(), help="Folder to restore into.")
@click.option("-i", "--include", "includes", multiple=True, help="Restore only matching paths.")
@click.option("--overwrite", is_flag=True, help="Allow a non-empty target; replace files.")
@pass_context
def restore(
    ctx: Context, snapshot: str, target: str, includes: tuple[str, ...], overwrite: bool
) -> None:
    """Restore SNAPSHOT (an ID or 'latest') into TARGET."""
    repo = open_repo(ctx)
    name, snap = repo.find_snapshot(snapshot)
    with progress_bar(ctx, "restore") as reporter:
        restorer = Restorer(repo, target, list(includes), overwrite, reporter)
        result = restorer.run(snap)
    ctx.emit_json({"snapshot": name, **result.to_json()})
    ctx.out(
        f"restored snapshot {name[:8]} into {target}: {result.files} files, {result.dirs} "
        f"folders, {result.symlinks} links, {human_bytes(result.bytes)}"
    )
    for path, warning in result.warnings:
        ctx.errors.print(f"warning: {path}: {warning}", highlight=False)
    if result.damaged:
        for path, error in result.damaged:
            ctx.errors.print(f"not restored: {path}: {error}", highlight=False)
        fail(
            f"{len(result.damaged)} files could not be restored because their data is damaged "
            "or missing; every other file was restored",
            EXIT_INCOMPLETE,
        )


@cli.command()
@click.option("--read-data", is_flag=True, help="Also read and verify every stored byte.")
@pass_context
def check(ctx: Context, read_data: bool) -> None:
    """Check the repository's structure (and with --read-data, all data)."""
    repo = open_repo(ctx)
    total = sum(size for _, size in repo.backend.list(FileType.DATA)) if read_data else None
    with progress_bar(ctx, "check") as reporter, RepositoryLock(repo):
        reporter.start(total, "reading data" if read_data else "checking")
        result = Checker(repo, reporter.advance).run(read_data=read_data)
    ctx.emit_json(result.to_json())
    for warning in result.warnings:
        ctx.errors.print(f"warning: {warning}", highlight=False)
    for error in result.errors:
        ctx.errors.print(f"error: {error}", highlight=False)
    summary = f"{result.snapshots} snapshots, {result.trees} trees, {result.packs} packs"
    if read_data:
        summary += f", {result.blobs} blobs and {human_bytes(result.bytes_read)} read"
    if result.errors:
        fail(f"check found {len(result.errors)} problems ({summary})", EXIT_INCOMPLETE)
    ctx.out(f"no errors found ({summary})")


@cli.command()
@click.option("--remove-all", is_flag=True, help="Remove every lock, not only stale ones.")
@pass_context
def unlock(ctx: Context, remove_all: bool) -> None:
    """Remove stale locks (older than 30 minutes, or whose process is gone)."""
    repo = open_repo(ctx)
    removed = remove_stale_locks(repo, all_locks=remove_all)
    ctx.emit_json({"removed": removed})
    ctx.out(f"removed {removed} locks")


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
        click.option("--data-dir", help="Folder for the embedded SQLite database and key file."),
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
    from .vault.config import load_settings

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
@click.option("--tls-cert", help="TLS certificate (PEM) to serve HTTPS directly.")
@click.option("--tls-key", help="TLS private key (PEM).")
def vault_serve(config_file: str | None, **overrides: Any) -> None:
    """Run a vault node until SIGTERM or Ctrl-C (then finish requests and stop)."""
    from .vault.sealing import SealingError
    from .vault.server import serve

    settings = load_vault_settings(config_file, **overrides)
    try:
        serve(settings)
    except SealingError as exc:
        fail(f"sealing: {exc}")


@vault.command("add-account")
@vault_options
@click.argument("name")
def vault_add_account(config_file: str | None, name: str, **overrides: Any) -> None:
    """Create an account for self-hosting and print its bearer token (shown once)."""
    from .vault.sealing import SealingError
    from .vault.server import make_service
    from .vault.service import VaultError

    settings = load_vault_settings(config_file, **overrides)
    try:
        service = make_service(settings)
        token = service.add_account(name)
    except (VaultError, SealingError) as exc:
        fail(str(exc))
    click.echo(token)


@vault.command("openapi")
def vault_openapi() -> None:
    """Print the vault's OpenAPI document."""
    from .vault.app import openapi_document

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
    (DamagedObject, EXIT_INCOMPLETE),
    (RepositoryError, EXIT_ERROR),
    (StorageError, EXIT_ERROR),
]


def main(argv: list[str] | None = None) -> int:
    errors = Console(stderr=True)

    def report(message: str) -> None:
        errors.print(f"backvault: {message}", highlight=False, markup=False, soft_wrap=True)

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
    except click.exceptions.Abort:
        report("interrupted")
        return EXIT_INTERRUPTED
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
            f"internal error: {type(exc).__name__}: {exc} (nothing was lost; rerun with "
            "BACKVAULT_DEBUG=1 for details and please report it)"
        )
        return EXIT_ERROR
    return EXIT_OK


def run() -> None:  # pragma: no cover - console entry point
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
