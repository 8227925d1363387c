"""The one walk over a snapshot's trees: restore, check, prune and ``ls`` use it.

Depth first, a folder before its entries, in tree order (restic's). A snapshot is data
from whoever holds the master key, so the walk is guarded:

- no recursion: a stack of its own (a snapshot may nest folders thousands deep), and only
  the path of the folder being walked is a string (a path kept per level would cost the
  square of the depth);
- folders may share subtrees, so a few trees can expand to 2^40 entries: a walk of every
  path first adds the snapshot up (``fmt.expanded_totals``, each tree once) and refuses
  one of more than ``max_entries``; a walk of each tree once (``seen``) needs no limit;
- tree ids are hashes of their content, so a tree cannot hold itself (no cycles); trees
  with duplicate or unsafe names, or numbers out of range, are refused when read
  (``fmt.decode_tree``) and reported as damaged.

``walk(repo, tree_id)`` yields ``(path, node)`` for every entry (path "/a/b"); its
keyword hooks let a caller choose which folders to enter and hear of damaged trees and
of folders left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from backvault.repo import format as fmt
from backvault.repo.errors import DamagedObject, RepositoryError
from backvault.repo.format import Node
from backvault.repo.repository import Repository


class TooManyEntries(RepositoryError):
    """A snapshot expands to more entries than a walk of every path may go through."""


def is_folder(path: str, node: Node) -> bool:
    """The default of ``descend``: folders (with a subtree) are entered."""
    return node.type == "dir" and node.subtree is not None


def walk(
    repo: Repository,
    tree_id: bytes,
    *,
    descend: Callable[[str, Node], bool] = is_folder,
    enter: Callable[[str, Node], bool] | None = None,
    leave: Callable[[str], None] | None = None,
    on_damaged: Callable[[str, DamagedObject], None] | None = None,
    load: Callable[[bytes], list[Node]] | None = None,
    seen: set[bytes] | None = None,
    max_entries: int | None = fmt.MAX_RESTORE_ENTRIES,
) -> Iterator[tuple[str, Node]]:
    """Every entry below tree ``tree_id`` as ``(path, node)``, depth first.

    - ``descend(path, node)``: whether to walk into this entry's subtree (default: a
      folder's), asked after the entry was yielded;
    - ``enter(path, node)``: called once the subtree was read, before its entries; False
      skips them (``leave`` is then not called for it);
    - ``leave(path)``: a folder's entries are done (also for the top, path "");
    - ``on_damaged(path, exc)``: a tree that cannot be read is skipped and reported here
      (without it, the DamagedObject is raised);
    - ``load(tree_id)``: how a tree is read (default ``repo.load_tree``);
    - ``seen``: walk each tree once: trees already in it are not walked, and those walked
      are added (then no expansion limit applies);
    - ``max_entries``: refuse (TooManyEntries, before yielding anything) a snapshot that
      expands to more entries; None: the caller checked.
    """
    read = load or repo.load_tree
    if seen is None and max_entries is not None:
        check_expansion(repo, tree_id, max_entries, read)
    top = _read(read, tree_id, "", on_damaged, seen)
    stack: list[tuple[Iterator[Node], str]] = [(iter(top or []), "")]
    rel = ""
    while stack:
        nodes, name = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            if leave is not None:
                leave(rel)
            if stack:
                rel = rel[: len(rel) - len(name) - 1]  # back to the folder above
            continue
        path = f"{rel}/{node.name}"
        yield path, node
        if node.subtree is None or not descend(path, node):
            continue
        below = _read(read, node.subtree, path, on_damaged, seen)
        if below is None or (enter is not None and not enter(path, node)):
            continue
        stack.append((iter(below), node.name))
        rel = path


def _read(
    read: Callable[[bytes], list[Node]],
    tree_id: bytes,
    path: str,
    on_damaged: Callable[[str, DamagedObject], None] | None,
    seen: set[bytes] | None,
) -> list[Node] | None:
    if seen is not None:
        if tree_id in seen:
            return None
        seen.add(tree_id)
    try:
        return read(tree_id)
    except DamagedObject as exc:
        if on_damaged is None:
            raise
        on_damaged(path, exc)
        return None


def check_expansion(
    repo: Repository,
    tree_id: bytes,
    max_entries: int,
    load: Callable[[bytes], list[Node]] | None = None,
    totals: dict[bytes, tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """Entries and file bytes of the tree with every folder expanded (damaged trees
    count as empty); TooManyEntries if more than ``max_entries``. ``totals`` keeps the
    sums by tree, for another call."""
    read = load or repo.load_tree

    def shape(tree: bytes) -> fmt.TreeShape | None:
        try:
            return fmt.TreeShape.of(read(tree))
        except DamagedObject:
            return None

    entries, size = fmt.expanded_totals(tree_id, shape, {} if totals is None else totals)
    if entries > max_entries:
        raise TooManyEntries(
            f"the snapshot expands to {entries:,} entries (its folders share subtrees), "
            f"more than the {max_entries:,} a walk goes through"
        )
    return entries, size
