"""``backvault check|forget|prune|repair index|unlock``: keeping a repository sound and
its size in check."""

from __future__ import annotations

from collections.abc import Callable

import click

from backvault.app.checking import subset_filter
from backvault.app.retention import forget as apply_retention
from backvault.app.retention import groups_of
from backvault.cli.context import Context
from backvault.cli.failures import EXIT_INCOMPLETE, EXIT_USAGE, fail
from backvault.cli.repository import Lock, with_repository
from backvault.cli.ui import human_bytes, progress_bar, when
from backvault.engine import prune as pruning
from backvault.engine.check import Checker
from backvault.repo import policy as retention
from backvault.repo.lock import remove_stale_locks
from backvault.repo.repository import Repository
from backvault.storage import FileType


def parse_subset(
    _click_ctx: click.Context, _param: click.Parameter, value: str | None
) -> Callable[[str], bool] | None:
    return subset_filter(value)  # a malformed subset fails before the key prompt


@click.command()
@click.option("--read-data", is_flag=True, help="Also read and verify every stored byte.")
@click.option(
    "--read-data-subset",
    "subset",
    callback=parse_subset,
    help="Read only part of the data: n/t, or a percentage.",
)
@with_repository(lock=Lock.SHARED)
def check(
    ctx: Context, repo: Repository, read_data: bool, subset: Callable[[str], bool] | None
) -> None:
    """Check the repository's structure (and with --read-data, all data)."""
    read_data = read_data or subset is not None
    total = sum(size for _, size in repo.list_objects(FileType.DATA)) if read_data else None
    with progress_bar(ctx, "check") as reporter:
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


@click.command()
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
@with_repository(lock=lambda params: Lock.SHARED if params["dry_run"] else Lock.EXCLUSIVE)
def forget(
    ctx: Context,
    repo: Repository,
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
    policy = retention.Policy(
        keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_tags
    )
    forgotten = apply_retention(repo, policy, groups_of(group_by), dry_run)
    for decision in forgotten.oldest_first():
        mark = "keep  " if decision.keep else "remove"
        ctx.out(
            f"{mark} {decision.snapshot_id[:8]}  {when(decision.snapshot.time)}  "
            f"{', '.join(decision.reasons)}"
        )
    ctx.emit_json(
        {
            "keep": [
                {"id": d.snapshot_id, "reasons": d.reasons} for d in forgotten.decisions if d.keep
            ],
            "remove": forgotten.removed,
            "dry_run": dry_run,
        }
    )
    verb = "would remove" if dry_run else "removed"
    ctx.out(f"{verb} {len(forgotten.removed)} of {len(forgotten.decisions)} snapshots")
    if then_prune and not dry_run:
        run_prune(ctx, repo, dry_run=False, max_unused=0.05)  # under forget's exclusive lock


def run_prune(ctx: Context, repo: Repository, dry_run: bool, max_unused: float) -> None:
    """Prune; the caller holds the exclusive lock."""
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


def parse_share(_click_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    try:
        return float(value.rstrip("%")) / 100
    except ValueError:
        fail(f"--max-unused takes a percentage, not {value!r}", EXIT_USAGE)


@click.command()
@click.option("--dry-run", is_flag=True, help="Only show what would be done.")
@click.option(
    "--max-unused",
    default="5%",
    show_default=True,
    callback=parse_share,
    help="Repack packs with more unused data than this.",
)
@with_repository(lock=Lock.EXCLUSIVE)
def prune(ctx: Context, repo: Repository, dry_run: bool, max_unused: float) -> None:
    """Remove data no snapshot references (safe to interrupt at any point)."""
    run_prune(ctx, repo, dry_run, max_unused)


@click.group()
def repair() -> None:
    """Repair a damaged repository."""


@repair.command("index")
@with_repository(lock=Lock.EXCLUSIVE)
def repair_index(ctx: Context, repo: Repository) -> None:
    """Rebuild the index from the packs' own headers (after index files were lost or damaged)."""
    count, bad = pruning.rebuild_index(repo)
    ctx.emit_json({"packs_indexed": count, "unreadable_packs": bad})
    ctx.out(f"indexed {count} packs")
    for line in bad:
        ctx.warn(f"unreadable pack: {line}")
    if bad:
        fail(
            f"{len(bad)} packs could not be read; run `backvault check --read-data`",
            EXIT_INCOMPLETE,
        )


@click.command()
@click.option("--remove-all", is_flag=True, help="Remove every lock, not only stale ones.")
@with_repository(lock=Lock.NONE)
def unlock(ctx: Context, repo: Repository, remove_all: bool) -> None:
    """Remove stale locks (older than 30 minutes, or whose process is gone)."""
    removed = remove_stale_locks(repo, all_locks=remove_all)
    ctx.emit_json({"removed": removed})
    ctx.out(f"removed {removed} locks")
