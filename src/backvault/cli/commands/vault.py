"""``backvault vault …``: running and administering a Backup Key Vault (OPAQUE, an exact
guess limit, sealed records). These commands read the vault's own settings
(``backvault.vault.config``), not the client's."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from backvault.cli.failures import EXIT_USAGE, fail

F = TypeVar("F", bound=Callable[..., Any])


def vault_options(command: F) -> F:
    """Options shared by the vault's commands; each overrides the config file and the
    BACKVAULT_SERVER_* environment."""
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
        fail(f"vault settings: {exc}", EXIT_USAGE)


@click.group()
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
@click.option(
    "--realm",
    is_flag=True,
    default=None,
    help="Serve as a realm (docs/realms.md): the /realm/v1 endpoints; a JWT audience must "
    "be the realm id.",
)
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
        fail(f"vault settings: {exc}", EXIT_USAGE)


@vault.command("realm-id")
@vault_options
def vault_realm_id(config_file: str | None, **overrides: Any) -> None:
    """Print this realm's id (hex), making it (16 random bytes) if the database has none
    yet: the JWT audience of a realm, and what clients pin."""
    import sqlalchemy as sa

    from backvault.vault.server import realm_id_of

    settings = load_vault_settings(config_file, **overrides)
    try:
        click.echo(realm_id_of(settings).hex())
    except (OSError, sa.exc.SQLAlchemyError) as exc:  # one clear line, not a traceback
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        fail(f"realm id: the database: {first}")


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
        fail("init-hsm is for --sealing pkcs11 (a key file is created on first start)", EXIT_USAGE)
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
        fail(f"--expires-in: {exc}", EXIT_USAGE)


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
    from backvault.vault.api import openapi_document

    click.echo(json.dumps(openapi_document(), indent=2))


def register(group: click.Group) -> None:
    group.add_command(vault)
