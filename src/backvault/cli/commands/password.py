"""``backvault password change|check|disable`` and turning the password on
(``key add --password``): the password the vault keeps."""

from __future__ import annotations

import time

import click

from backvault.app import password as passwords
from backvault.cli.context import Context, pass_context
from backvault.cli.failures import (
    ERASED_MESSAGE,
    EXIT_RECORD_REPLACED,
    EXIT_USAGE,
    EXIT_WRONG_KEY,
    fail,
)
from backvault.cli.prompts import read_new_password, read_password
from backvault.cli.repository import Lock, opened, report_recovery
from backvault.device.settings import VaultSettings
from backvault.repo.repository import KeySlot
from backvault.vaultclient.realm_slots import RealmRecovery


def warn_renamed(ctx: Context, renamed: dict[str, str]) -> None:
    for old, new in renamed.items():
        ctx.warn(
            f"key slot {old[:8]} (written by an earlier version) no longer shows its kind to "
            f"the storage provider; its id is now {new[:8]}"
        )


def warn_unverified_slots(ctx: Context, unverified: list[KeySlot]) -> None:
    """Slots an earlier version named password slots in clear are never removed on that
    word (whoever can write the storage could have renamed the recovery key so)."""
    for slot in unverified:
        ctx.warn(
            f"key slot {slot.id[:8]} was named a password slot by an earlier version, in "
            "clear, which backvault cannot verify, so it was left in place; if it is your old "
            "password slot it opens nothing any more (`backvault key remove` removes it)"
        )


def check_degraded_flag(ctx: Context, vault: VaultSettings, allow_degraded: bool) -> None:
    if allow_degraded and not vault.uses_realms:
        fail(
            "--allow-degraded needs realms (vault.realms): one vault has no partial state",
            EXIT_USAGE,
        )


def report_registration(ctx: Context, missed: dict[str, str], cleanup: Exception | None) -> None:
    """What a realm registration left undone: realms to deliver to later, the single
    vault's record not deleted."""
    for url, why in missed.items():
        ctx.warn(
            f"warning: the realm {url} did not take the new registration ({why}); this device "
            "keeps its part, sealed, and delivers it when a later command opens the repository"
        )
    if cleanup is not None:
        ctx.warn(
            f"warning: the single vault's record could not be deleted ({cleanup}); the realms "
            "hold the password now. Delete it later with `backvault password disable` "
            "after unsetting vault.realms"
        )


def enable_password(ctx: Context, max_attempts: int | None, allow_degraded: bool = False) -> None:
    """``key add --password``: a password slot; the account's earlier ones go."""
    vault = ctx.require_vault()  # before the key is asked for
    check_degraded_flag(ctx, vault, allow_degraded)
    with opened(ctx, Lock.NONE) as repo:
        password = read_new_password(ctx)
        done = passwords.set_password(repo, vault, password, max_attempts, allow_degraded)
    report_registration(ctx, done.missed_realms, done.cleanup_problem)
    warn_unverified_slots(ctx, done.unverified)
    warn_renamed(ctx, done.renamed)
    ctx.emit_json(
        {
            "password_key_id": done.key_id,
            "vault": vault.url or vault.where,
            "account": vault.account,
            "replaced": done.replaced,
            "renamed": done.renamed,
        }
    )
    ctx.out(
        f"Added password slot {done.key_id[:8]}: your password opens this repository through "
        f"{vault.where} (account {vault.account})."
    )


@click.group()
def password() -> None:
    """Change, check or turn off the password kept by the vault."""


@password.command("change")
@click.option("--max-attempts", type=int, help="Wrong guesses allowed.")
@click.option(
    "--allow-degraded",
    is_flag=True,
    help="With realms: go on when at least the threshold of realms took the new "
    "registration; the others get theirs later.",
)
@pass_context
def password_change(ctx: Context, max_attempts: int | None, allow_degraded: bool) -> None:
    """Set a new password: a new slot secret and vault record; the old ones are erased.

    Opens the repository first with this device's key, BACKVAULT_KEY, or the current
    password."""
    vault = ctx.require_vault()  # before the key is asked for
    check_degraded_flag(ctx, vault, allow_degraded)
    with opened(ctx, Lock.NONE) as repo:
        passwords.require_password_slot(repo, vault)
        new = read_new_password(ctx, "BACKVAULT_NEW_PASSWORD")
        # Replaces the record (with realms: at every realm, or t of them when degraded).
        done = passwords.set_password(repo, vault, new, max_attempts, allow_degraded)
    report_registration(ctx, done.missed_realms, done.cleanup_problem)
    warn_unverified_slots(ctx, done.unverified)
    warn_renamed(ctx, done.renamed)
    ctx.emit_json(
        {
            "password_key_id": done.key_id,
            "removed": done.replaced,
            "renamed": done.renamed,
            "realms_missed": done.missed_realms,
        }
    )
    ctx.out("Password changed: the old one no longer opens anything.")


@password.command("check")
@pass_context
def password_check(ctx: Context) -> None:
    """Check that you still know your password (a real login: a wrong one uses an attempt;
    a right one forgives this device's wrong tries, not other people's).

    First, at no cost, checks that the vault still holds the record this device
    registered."""
    vault = ctx.require_vault()
    record = passwords.vault_record(vault)
    status = record.status
    if not status.get("exists"):
        fail(ERASED_MESSAGE, EXIT_WRONG_KEY)
    if record.ours is False:
        fail(
            f"{vault.where} holds a record for account {vault.account!r} that this "
            f"device did not register (it registered {str(record.remembered)[:16]}, the vault "
            f"holds {str(status.get('fingerprint') or status.get('version'))[:16]}): someone with the account token "
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
    if "threshold" in status:  # realms
        ctx.out(
            f"The realms allow {left} more wrong {'guess' if left == 1 else 'guesses'} "
            f"({status['threshold']} of {status['realms']} realms take part in each); this "
            "check counts as one until it succeeds."
        )
        for url, why in dict(status.get("unreachable") or {}).items():
            ctx.warn(f"warning: realm {url} counted as spent: {why}")
    else:
        ctx.out(
            f"The vault allows {left} more wrong {'guess' if left == 1 else 'guesses'} "
            f"(and at most {status.get('guess_cap')} within {status.get('guess_cap_days', 0):g} "
            "days); this check counts as one until it succeeds."
        )
    if left == 1:
        ctx.warn("warning: a wrong password now erases the key for good")
    typed = read_password("Password")
    if not typed:
        fail("no password given (BACKVAULT_PASSWORD or a prompt)", EXIT_USAGE)
    # A vault error here (wrong password, an outage between the login's two steps) reaches
    # the exit-code table like every other command's.
    recovery = passwords.check_password(vault, typed)
    if isinstance(recovery, RealmRecovery):
        report_recovery(ctx, recovery)
        if recovery.spent:
            ctx.emit_json({"ok": True, "attempts_left": 0, "spent": True})
            ctx.out("Your password is right, and that was its last use (see the warning).")
            return
        after = passwords.vault_record(vault).status
        ctx.emit_json(
            {
                "ok": True,
                "attempts_left": after.get("attempts_left"),
                "record_is_ours": record.ours,
                "version": after.get("version"),
                "realm_problems": recovery.problems,
            }
        )
        ctx.out(
            f"Your password is right. The realms allow {after.get('attempts_left')} wrong "
            "guesses now (this device's wrong tries forgiven)."
        )
        for url, why in recovery.problems.items():
            ctx.warn(f"warning: realm {url} did not do its part: {why}")
        return
    result = recovery.login
    report_recovery(ctx, recovery)
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
    vault = ctx.require_vault()  # before the key is asked for
    with opened(ctx, Lock.NONE) as repo:
        done = passwords.disable_password(repo, vault)
    warn_unverified_slots(ctx, done.unverified)
    ctx.emit_json({"removed": done.removed})
    ctx.out("The password is turned off: the vault record is erased and the slot removed.")
