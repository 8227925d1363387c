"""The one tree walker (engine/walk.py): depth first, a folder before its entries, in
tree order; hooks to choose folders and hear of damage and of folders left; a snapshot
that expands to too many entries is refused before anything is yielded; a walk of each
tree once goes through shared folders once."""

from __future__ import annotations

from pathlib import Path

import pytest

from backvault.engine.walk import TooManyEntries, walk
from backvault.repo import format as fmt
from backvault.repo.errors import DamagedObject
from backvault.repo.format import BlobType, Node
from backvault.repo.repository import Repository
from backvault.repo.writer import RepositoryWriter
from backvault.storage import LocalBackend


def folder(name: str, subtree: bytes) -> Node:
    return Node(name=name, type="dir", mode=0o755 | 0x80000000, subtree=subtree)


def file(name: str) -> Node:
    return Node(name=name, type="file", mode=0o644, size=0, content=[])


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)


def tree(writer: RepositoryWriter, *nodes: Node) -> bytes:
    return writer.add(BlobType.TREE, fmt.encode_tree(nodes))


def test_entries_come_depth_first_in_tree_order_with_folders_left_after_their_entries(
    repo: Repository,
) -> None:
    writer = RepositoryWriter(repo)
    inner = tree(writer, file("z"), file("a"))
    top = tree(writer, folder("b", inner), file("a"), folder("c", tree(writer)))
    writer.flush()
    events: list[str] = []
    for path, node in walk(repo, top, leave=lambda p: events.append(f"leave {p or '/'}")):
        events.append(f"{node.type} {path}")
    assert events == [
        "file /a",
        "dir /b",
        "file /b/a",
        "file /b/z",
        "leave /b",
        "dir /c",
        "leave /c",
        "leave /",
    ]
    only_top = [path for path, _ in walk(repo, top, descend=lambda p, n: False)]
    assert only_top == ["/a", "/b", "/c"]


def test_a_damaged_tree_is_reported_or_raised(repo: Repository) -> None:
    writer = RepositoryWriter(repo)
    missing = bytes(32)
    top = tree(writer, folder("gone", missing), file("kept"))
    writer.flush()
    damaged: list[str] = []
    paths = [p for p, _ in walk(repo, top, on_damaged=lambda p, e: damaged.append(p))]
    assert paths == ["/gone", "/kept"] and damaged == ["/gone"]
    with pytest.raises(DamagedObject):
        list(walk(repo, top))


def test_shared_folders_expand_beyond_the_limit_or_are_walked_once(repo: Repository) -> None:
    writer = RepositoryWriter(repo)
    level = tree(writer, *(file(f"f{i}") for i in range(10)))
    for _ in range(6):  # each level holds the one below ten times: 10^7 entries
        level = tree(writer, *(folder(f"d{i}", level) for i in range(10)))
    writer.flush()
    with pytest.raises(TooManyEntries, match="expands to"):
        next(walk(repo, level, max_entries=1_000_000))
    seen: set[bytes] = set()
    once = list(walk(repo, level, seen=seen))
    assert len(seen) == 7 and len(once) == 7 * 10
