"""Listing a snapshot's files (``backvault ls``): depth first, in tree order.

A small walk of its own until the engine's one tree walker takes it over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backvault.app.errors import TooManyEntries
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
    entries: list[dict[str, Any]] = []
    # A stack of our own: a snapshot may nest folders deeper than Python's recursion limit.
    stack = [("", iter(repo.load_tree(snap.tree)))]
    while stack:
        prefix, nodes = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            continue
        path = f"{prefix}/{node.name}"
        entries.append({"path": path, "type": node.type, "size": node.size, "mtime": node.mtime})
        if node.type == "dir" and node.subtree is not None:
            stack.append((path, iter(repo.load_tree(node.subtree))))
    return Listing(name, entries)
