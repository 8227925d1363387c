"""Listing a snapshot's files (``backvault ls``): depth first, in tree order, through the
engine's one tree walker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backvault.app.errors import TooManyEntries
from backvault.engine.walk import walk
from backvault.repo import format as fmt
from backvault.repo.repository import Repository


@dataclass(frozen=True)
class Listing:
    snapshot_id: str
    entries: list[dict[str, Any]]  # path, type, size, mtime


def list_snapshot(repo: Repository, ref: str) -> Listing:
    """Every entry of snapshot ``ref`` (an ID prefix or "latest")."""
    name, snap = repo.find_snapshot(ref)
    # Shared subtrees are legitimate (every empty folder is the same tree), but a tree can
    # name the same folder twice at every level: count before listing 2^40 entries.
    expanded, _ = fmt.expanded_totals(
        snap.tree, lambda tree: fmt.TreeShape.of(repo.load_tree(tree)), {}
    )
    if expanded > fmt.MAX_RESTORE_ENTRIES:
        raise TooManyEntries(
            f"snapshot {name[:8]} expands to {expanded:,} entries, more than "
            f"{fmt.MAX_RESTORE_ENTRIES:,} (a tree that names the same folder many times); "
            "not listing it"
        )
    entries = [
        {"path": path, "type": node.type, "size": node.size, "mtime": node.mtime}
        for path, node in walk(repo, snap.tree, max_entries=None)  # counted above
    ]
    return Listing(name, entries)
