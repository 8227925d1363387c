"""Which snapshots to keep: restic's `forget` policies, as pure functions.

Snapshots are grouped (by host and paths by default); in each group, newest first, every
``--keep-*`` rule keeps the newest snapshot of each of its last N buckets (hours, days,
ISO weeks, months, years), ``--keep-last N`` the N newest, ``--keep-tag T`` every snapshot
tagged T. A snapshot is kept if any rule keeps it, and the reasons are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from backvault.repo.format import Snapshot
from backvault.repo.timefmt import parse_ns

GROUP_FIELDS = ("host", "paths", "tags")


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (
            self.last
            or self.hourly
            or self.daily
            or self.weekly
            or self.monthly
            or self.yearly
            or self.tags
        )


@dataclass
class Decision:
    snapshot_id: str
    snapshot: Snapshot
    keep: bool
    reasons: list[str] = field(default_factory=list)


def _local(snapshot: Snapshot) -> datetime:
    return datetime.fromtimestamp(parse_ns(snapshot.time) / 1e9, tz=UTC).astimezone()


_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


def group_key(snapshot: Snapshot, group_by: tuple[str, ...]) -> tuple[object, ...]:
    key: list[object] = []
    for name in group_by:
        if name == "host":
            key.append(snapshot.hostname)
        elif name == "paths":
            key.append(tuple(sorted(snapshot.paths)))
        elif name == "tags":
            key.append(tuple(sorted(snapshot.tags)))
        else:
            raise ValueError(f"--group-by takes host, paths and tags, not {name!r}")
    return tuple(key)


def apply(
    snapshots: list[tuple[str, Snapshot]],
    policy: Policy,
    group_by: tuple[str, ...] = ("host", "paths"),
) -> list[Decision]:
    if policy.empty():
        raise ValueError(
            "no policy given: nothing would be kept, so nothing is removed; "
            "pass at least one --keep-* option"
        )
    groups: dict[tuple[object, ...], list[tuple[str, Snapshot]]] = {}
    for item in snapshots:
        groups.setdefault(group_key(item[1], group_by), []).append(item)
    decisions: list[Decision] = []
    for members in groups.values():
        members.sort(key=lambda item: (parse_ns(item[1].time), item[0]), reverse=True)
        counts = {name: getattr(policy, name) for name in _BUCKETS}
        last_bucket: dict[str, tuple[int, ...] | None] = dict.fromkeys(_BUCKETS)
        remaining_last = policy.last
        for snapshot_id, snapshot in members:
            reasons = []
            if remaining_last > 0:
                reasons.append("last")
                remaining_last -= 1
            when = _local(snapshot)
            for name, bucket_of in _BUCKETS.items():
                if counts[name] <= 0:
                    continue
                bucket = bucket_of(when)
                if bucket != last_bucket[name]:
                    last_bucket[name] = bucket
                    counts[name] -= 1
                    reasons.append(name)
            matched = [t for t in policy.tags if t in snapshot.tags]
            if matched:
                reasons.append("tag " + ",".join(matched))
            decisions.append(Decision(snapshot_id, snapshot, bool(reasons), reasons))
    return decisions
