"""``backvault backup|snapshots|ls|restore``: putting data in and getting it back."""

from __future__ import annotations

import click

from backvault.app.listing import list_snapshot
from backvault.cli.context import Context
from backvault.cli.failures import EXIT_INCOMPLETE, EXIT_USAGE, fail
from backvault.cli.repository import Lock, with_repository
from backvault.cli.ui import human_bytes, progress_bar, shown, table, when
from backvault.device.paths import private_temp_dir, repository_cache_dir
from backvault.engine.archiver import Backup
from backvault.engine.restorer import Restorer
from backvault.repo.errors import DamagedObject
from backvault.repo.repository import Repository


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--tag", "tags", multiple=True, help="Tag the snapshot (repeatable).")
@click.option("--host", help="Hostname to record (default: this machine's).")
@with_repository(lock=Lock.SHARED, index_cache=True)
def backup(
    ctx: Context, repo: Repository, paths: tuple[str, ...], tags: tuple[str, ...], host: str | None
) -> None:
    """Back up PATHS (folders, files, SQLite databases) as a new snapshot."""
    folder = repository_cache_dir(repo.config.id)
    state_file = None if folder is None else folder / "sqlite-state.json"
    with progress_bar(ctx, "backup") as reporter:
        try:
            result = Backup(
                repo, reporter, sqlite_state_file=state_file, temp_dir=private_temp_dir()
            ).run(list(paths), tags=list(tags), hostname=host, scan_first=reporter.bar is not None)
        except FileNotFoundError as exc:
            fail(f"cannot back up: {exc}", EXIT_USAGE)
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


@click.command()
@with_repository(lock=Lock.NONE)
def snapshots(ctx: Context, repo: Repository) -> None:
    """List snapshots, oldest first."""
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
        rows = [
            (
                name[:8],
                when(snap.time),
                shown(snap.hostname),
                shown(",".join(snap.tags)),
                "\n".join(shown(path) for path in snap.paths),
            )
            for name, snap in items
        ]
        ctx.show(table(("ID", "time", "host", "tags", "paths"), rows))
        ctx.out(f"{len(items)} snapshots")
    for error in errors:
        ctx.error_line(str(error))
    if errors:
        fail(f"{len(errors)} snapshot files are damaged", EXIT_INCOMPLETE)


@click.command("ls")
@click.argument("snapshot")
@with_repository(lock=Lock.NONE, index_cache=True)
def ls_command(ctx: Context, repo: Repository, snapshot: str) -> None:
    """List the files in SNAPSHOT (an ID or 'latest')."""
    listing = list_snapshot(repo, snapshot)
    ctx.emit_json({"snapshot": listing.snapshot_id, "entries": listing.entries})
    for entry in listing.entries:
        ctx.out(shown(entry["path"]))


@click.command()
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
@with_repository(lock=Lock.NONE, index_cache=True)
def restore(
    ctx: Context,
    repo: Repository,
    snapshot: str,
    target: str,
    includes: tuple[str, ...],
    overwrite: bool,
    special_files: bool,
    keep_setuid: bool,
    ignore_free_space: bool,
) -> None:
    """Restore SNAPSHOT (an ID or 'latest') into TARGET."""
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
