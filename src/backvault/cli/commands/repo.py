"""``backvault init``, ``config``, ``forget-device`` and ``demo``: creating a repository,
the settings, this device's key, and the guided tour."""

from __future__ import annotations

import click

from backvault.app.setup import create_repository
from backvault.cli.context import Context, pass_context
from backvault.cli.failures import EXIT_USAGE, VAULT_ERRORS, fail, vault_failure
from backvault.cli.prompts import read_new_password, read_token
from backvault.cli.ui import recovery_key_block
from backvault.crypto import recovery_key
from backvault.device import keycache
from backvault.device.settings import (
    KEYS,
    TOKEN,
    SettingsError,
    forget_realm_token,
    forget_token,
    set_value,
    store_realm_token,
    store_token,
)
from backvault.storage import open_backend, without_password


@click.command()
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
@click.option(
    "--allow-degraded",
    is_flag=True,
    help="With --password and realms: go on when at least the threshold of realms took the new "
    "registration; the others get theirs later.",
)
@pass_context
def init(
    ctx: Context,
    no_remember: bool,
    with_password: bool,
    no_recovery_key: bool,
    max_attempts: int | None,
    allow_degraded: bool,
) -> None:
    """Create a repository with its 64-digit recovery key (shown once), and with --password
    a password slot whose secret only the vault gives back."""
    if no_recovery_key and not with_password:
        fail("--no-recovery-key needs --password: a repository needs at least one key", EXIT_USAGE)
    location = ctx.require_repo()
    vault = ctx.require_vault() if with_password else None  # before anything is written
    if allow_degraded and (vault is None or not vault.uses_realms):
        fail("--allow-degraded needs --password and realms (vault.realms)", EXIT_USAGE)
    password = read_new_password(ctx) if with_password else None
    created = create_repository(
        location,
        remember=not no_remember,
        vault=vault,
        password=password,
        max_attempts=max_attempts,
        keep_recovery_key=not no_recovery_key,
        allow_degraded=allow_degraded,
    )
    secret = created.recovery_secret
    on = vault is not None and created.password_key_id is not None
    ctx.emit_json(
        {
            "repository": without_password(created.location),
            "id": created.repo_id,
            "recovery_key": recovery_key.canonical(secret) if secret else None,
            "recovery_key_groups": recovery_key.display(secret) if secret else None,
            "key_id": created.recovery_key_id,
            "password_key_id": created.password_key_id,
            "vault": (vault.url or vault.where) if vault and on else None,
            "account": vault.account if vault and on else None,
            "device_cache": created.device_cache or None,
        }
    )
    ctx.out(f"Created repository {created.repo_id[:8]} at {without_password(created.location)}\n")
    if secret:
        ctx.out("Your 64-digit recovery key. Write it down and keep it somewhere safe;")
        ctx.out("it is shown only this once, and without it or the device nobody can restore:\n")
        ctx.out(recovery_key_block(secret) + "\n")
        ctx.out("Stock restic opens this repository with the same 64 digits typed without")
        ctx.out("spaces as the password (see `backvault key show --help`).")
    if on and vault:
        ctx.out(
            f"Your password now opens this repository through {vault.where} "
            f"(account {vault.account}); a limited number of wrong guesses is allowed."
        )
    for url, why in created.missed_realms.items():
        ctx.warn(
            f"warning: the realm {url} did not take the registration ({why}); this device "
            "keeps its part, sealed, and delivers it when a later command opens the repository"
        )
    if created.device_cache:
        ctx.out(f"This device remembers the repository key in {created.device_cache}.")
    problem = created.password_problem
    if problem is not None:
        if not isinstance(problem, VAULT_ERRORS) or vault is None:
            raise problem
        failure = vault_failure(problem, vault.url, vault.account, vault.where)
        fail(
            f"the repository was created, but the password could not be turned on: "
            f"{failure}; run `backvault key add --password` later",
            failure.code,
        )


@click.command("forget-device")
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


@click.group(invoke_without_command=True)
@click.pass_context
def config(click_ctx: click.Context) -> None:
    """Show settings (with where each comes from), or set and unset them."""
    if click_ctx.invoked_subcommand is None:
        ctx = click_ctx.find_object(Context)
        assert ctx is not None
        doc = ctx.settings().describe()
        ctx.emit_json(doc)
        for key in KEYS:
            source = doc["sources"].get(key, "not set")
            value = doc[key]
            shown_value = ", ".join(value) if isinstance(value, list) else value
            ctx.out(f"{key:<15} {shown_value if value is not None else '-':<40} ({source})")
        ctx.out(f"file: {doc['file']}")


@config.command("set")
@click.argument("name")
@click.argument("value", required=False)
@click.option("--realm", metavar="URL", help="With vault.token: the token for this realm.")
@pass_context
def config_set(ctx: Context, name: str, value: str | None, realm: str | None) -> None:
    """Set NAME (repository, vault.url, vault.account, vault.realms, vault.threshold) to
    VALUE. vault.realms is a list of realm URLs (or ID@URL), separated by commas.

    The vault token is never given on the command line (other users see command lines,
    and shells keep them): `backvault config set vault.token` asks for it at a hidden
    prompt, `backvault config set vault.token -` reads it from standard input. It is kept
    in the OS keyring (or a file only you can read), not in the settings file. Each realm
    has its own token: `backvault config set vault.token --realm URL`."""
    if realm is not None and name != TOKEN:
        fail("--realm goes with vault.token only", EXIT_USAGE)
    if name == TOKEN:
        token = read_token(value)
        where = store_realm_token(realm.rstrip("/"), token) if realm else store_token(token)
        ctx.emit_json({"set": name, "realm": realm, "where": where})
        ctx.out(f"{name}{f' for {realm}' if realm else ''} stored in {where}")
        return
    if value is None:
        fail(f"give a value: `backvault config set {name} VALUE`", EXIT_USAGE)
    try:
        path = set_value(name, value)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    ctx.emit_json({"set": name, "file": str(path)})
    ctx.out(f"{name} = {value} (in {path})")


@config.command("unset")
@click.argument("name")
@click.option("--realm", metavar="URL", help="With vault.token: the token for this realm.")
@pass_context
def config_unset(ctx: Context, name: str, realm: str | None) -> None:
    """Remove NAME from the settings (the token from the keyring too)."""
    if realm is not None and name != TOKEN:
        fail("--realm goes with vault.token only", EXIT_USAGE)
    if name == TOKEN:
        removed = forget_realm_token(realm.rstrip("/")) if realm else forget_token()
        ctx.emit_json({"unset": name, "removed": removed})
        ctx.out(f"{name} removed from: {', '.join(removed)}" if removed else f"{name} was not set")
        return
    try:
        path = set_value(name, None)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    ctx.emit_json({"unset": name, "file": str(path)})
    ctx.out(f"{name} removed from {path}")


@click.command()
@click.option("--keep", is_flag=True, help="Keep the demo's files afterwards.")
@click.option(
    "--realms",
    type=click.IntRange(3, 5),
    help="Tell it with this many threshold realms on loopback instead of one vault "
    "(docs/realms.md): one stopped mid-story, one rolled back.",
)
def demo(keep: bool, realms: int | None) -> None:
    """The whole story on embedded defaults, offline, in under a minute."""
    if realms is not None:
        from backvault.demo_realms import main as run_realms_demo

        run_realms_demo(realms, keep)
        return
    from backvault.demo import main as run_demo

    run_demo(keep)
