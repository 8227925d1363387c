"""``backvault schedule install|remove``: daily unattended backups with this device's
cached key (a systemd user timer, or a cron line)."""

from __future__ import annotations

import click

from backvault.cli.context import Context, pass_context
from backvault.cli.failures import EXIT_USAGE, fail
from backvault.device import keycache
from backvault.storage import open_backend


@click.group()
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
        fail(str(exc), EXIT_USAGE)
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
