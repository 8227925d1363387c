"""Forgetting snapshots a retention policy does not keep (restic's policies)."""

from __future__ import annotations

from dataclasses import dataclass

from backvault.app.errors import InvalidArgument
from backvault.repo import policy as retention
from backvault.repo.repository import Repository


def groups_of(group_by: str) -> tuple[str, ...]:
    """``--group-by host,paths`` as the policy takes it."""
    return tuple(g.strip() for g in group_by.split(",") if g.strip())


@dataclass(frozen=True)
class Forgotten:
    """What the policy decided; ``oldest_first()`` for showing it."""

    decisions: list[retention.Decision]  # in the policy's order
    removed: list[str]  # snapshot ids removed (or that would be, on a dry run), oldest first

    def oldest_first(self) -> list[retention.Decision]:
        return sorted(self.decisions, key=lambda d: d.snapshot.time)


def forget(
    repo: Repository, policy: retention.Policy, groups: tuple[str, ...], dry_run: bool
) -> Forgotten:
    """Apply ``policy`` per group and remove the snapshots it does not keep (the caller
    holds the exclusive lock; on a dry run, nothing is removed)."""
    try:
        decisions = retention.apply(repo.list_snapshots(), policy, groups)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    ordered = sorted(decisions, key=lambda d: d.snapshot.time)
    removed = [d.snapshot_id for d in ordered if not d.keep]
    if not dry_run:
        for snapshot_id in removed:
            repo.remove_snapshot(snapshot_id)
    return Forgotten(decisions, removed)
