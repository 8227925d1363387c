"""``backvault key list|add|remove|show``: the repository's key slots."""

from __future__ import annotations

import click

from backvault.app import keys
from backvault.cli.commands.password import enable_password, warn_renamed
from backvault.cli.context import Context, pass_context
from backvault.cli.failures import EXIT_USAGE, fail
from backvault.cli.prompts import key_from_env_or_prompt
from backvault.cli.repository import Lock, opened, with_repository
from backvault.cli.ui import recovery_key_block, table, when
from backvault.crypto import recovery_key
from backvault.repo.repository import Repository


@click.group()
def key() -> None:
    """List, add, remove and show key slots."""


@key.command("list")
@with_repository(lock=Lock.NONE)
def key_list(ctx: Context, repo: Repository) -> None:
    """List the key slots of the repository."""
    slots = repo.list_keys()
    ctx.emit_json(
        [
            {
                "id": s.id,
                "kind": keys.slot_kind(s),
                "username": s.username,
                "hostname": s.hostname,
                "created": s.created,
                "current": s.current,
            }
            for s in slots
        ]
    )
    rows = [("*" if s.current else "", s.id[:8], keys.slot_kind(s), when(s.created)) for s in slots]
    ctx.show(table(("", "ID", "kind", "created"), rows))


@key.command("add")
@click.option(
    "--password",
    "with_password",
    is_flag=True,
    help="Add a password slot checked by the vault instead of a recovery key.",
)
@click.option("--max-attempts", type=int, help="With --password: wrong guesses allowed.")
@click.option(
    "--allow-degraded",
    is_flag=True,
    help="With --password and realms: go on when at least the threshold of realms took the new "
    "registration; the others get theirs later.",
)
@pass_context
def key_add(
    ctx: Context, with_password: bool, max_attempts: int | None, allow_degraded: bool
) -> None:
    """Add another 64-digit recovery key (shown once), or with --password a password slot;
    data is not re-uploaded."""
    if with_password:
        enable_password(ctx, max_attempts, allow_degraded)
        return
    if allow_degraded:
        fail("--allow-degraded goes with --password", EXIT_USAGE)
    with opened(ctx, Lock.NONE) as repo:
        added = keys.add_recovery_key(repo)
    warn_renamed(ctx, added.renamed)
    canonical = recovery_key.canonical(added.secret)
    ctx.emit_json({"key_id": added.key_id, "recovery_key": canonical, "renamed": added.renamed})
    ctx.out(f"Added recovery key {added.key_id[:8]}. Write it down; it is shown only this once:\n")
    ctx.out(recovery_key_block(added.secret))


@key.command("remove")
@click.argument("key_id")
@with_repository(lock=Lock.NONE)
def key_remove(ctx: Context, repo: Repository, key_id: str) -> None:
    """Remove a key slot (never the last one)."""
    removed = keys.remove_slot(repo, key_id, ctx.require_vault)
    if removed.record_left_alone:
        ctx.warn(
            "this slot was named a password slot by an earlier version, in clear, which "
            "backvault cannot verify: the vault's record is left alone (`backvault password "
            "disable` erases it)"
        )
    ctx.emit_json({"removed": removed.slot.id})
    ctx.out(f"Removed key slot {removed.slot.id[:8]} ({removed.kind}).")


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
    text = key_from_env_or_prompt()
    if text is None:
        fail("give the key in BACKVAULT_KEY or run interactively to type it", EXIT_USAGE)
    checked = keys.check_key(location, text)
    ctx.emit_json({"key_id": checked.key_id, "restic_password": checked.restic_password})
    ctx.out(
        f"This key opens repository {checked.repo_id[:8]} (key slot {str(checked.key_id)[:8]})."
    )
    ctx.out(f"As restic's password it is:\n\n    {checked.restic_password}\n")
    if for_restic:
        ctx.out(f"With stock restic:  restic -r {location} restore latest --target DIR")
        ctx.out("and paste the line above when restic asks for the repository password.")
