"""Removing unreferenced data, and rebuilding the index — in an order that is safe to
interrupt at any point.

prune, under an exclusive lock:
 1. find every blob a snapshot references, walking every tree; if any snapshot or tree
    cannot be read, stop before deleting anything;
 2. repack: copy the still-used blobs of partly used packs into new packs;
 3. write new index files for everything kept (listing what they supersede);
 4. delete the old index files;
 5. only then delete packs no longer indexed: fully unused ones, repacked ones, and
    leftovers no index lists.
A crash between any two steps leaves a valid repository: at worst extra packs or index
entries that the next prune removes (restic's ordering rules, design.rst).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from backvault.engine.walk import walk
from backvault.repo.errors import DamagedObject, RepositoryError
from backvault.repo.format import BlobType, IndexFile, Node, PackedBlob
from backvault.repo.repository import Repository
from backvault.repo.writer import RepositoryWriter
from backvault.storage import FileType, ObjectNotFound

INDEX_PACKS_PER_FILE = 2000


@dataclass
class PrunePlan:
    used_blobs: set[bytes]
    keep: dict[bytes, list[PackedBlob]] = field(default_factory=dict)
    repack: dict[bytes, list[PackedBlob]] = field(default_factory=dict)
    remove: set[bytes] = field(default_factory=set)  # indexed packs with nothing used
    unindexed: set[str] = field(default_factory=set)  # packs no index lists
    bytes_total: int = 0
    bytes_unused: int = 0
    bytes_to_repack: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "packs_kept": len(self.keep),
            "packs_to_repack": len(self.repack),
            "packs_to_delete": len(self.remove) + len(self.unindexed),
            "unindexed_packs": len(self.unindexed),
            "bytes_total": self.bytes_total,
            "bytes_unused": self.bytes_unused,
            "bytes_to_repack": self.bytes_to_repack,
        }


def used_blobs(repo: Repository) -> set[bytes]:
    """Every blob any snapshot references. Raises if anything cannot be read: prune must
    never decide on partial knowledge."""
    errors: list[DamagedObject] = []
    snapshots = repo.list_snapshots(errors=errors)
    if errors:
        raise RepositoryError(
            f"prune stopped before deleting anything: {errors[0]}; run `backvault check` "
            "and deal with the damage first"
        )
    used: set[bytes] = set()
    trees: set[bytes] = set()

    def load(tree_id: bytes) -> list[Node]:
        if repo.lookup(tree_id) is None:
            raise RepositoryError(
                f"prune stopped before deleting anything: tree {tree_id.hex()[:12]} is in no "
                "index; run `backvault repair index`, then `backvault check`"
            )
        used.add(tree_id)
        return repo.load_tree(tree_id)

    def has_subtree(path: str, node: Node) -> bool:
        # Any entry's subtree is kept, a folder's or not: never delete what is referenced.
        return node.subtree is not None

    for _, snap in reversed(snapshots):
        for _path, node in walk(
            repo, snap.tree, descend=has_subtree, load=load, seen=trees, max_entries=None
        ):
            for blob_id in node.content or []:
                if repo.lookup(blob_id) is None:
                    raise RepositoryError(
                        f"prune stopped before deleting anything: data blob "
                        f"{blob_id.hex()[:12]} of {node.name!r} is in no index; run "
                        "`backvault repair index`, then `backvault check`"
                    )
                used.add(blob_id)
    return used


def plan(repo: Repository, max_unused: float = 0.05) -> PrunePlan:
    """Decide what to keep, repack and delete. A pack is repacked when more than
    ``max_unused`` of its bytes are unused (tree packs whenever anything is unused)."""
    repo.load_index()
    result = PrunePlan(used_blobs(repo))
    stored = dict(repo.list_objects(FileType.DATA))  # not-ids left out (check names them)
    seen_in_kept: set[bytes] = set()
    for pack_id, blobs in repo.indexed_packs().items():
        if pack_id.hex() not in stored:
            continue  # check reports missing packs; nothing to delete here
        size = sum(b.length for b in blobs)
        result.bytes_total += size
        used_here = [b for b in blobs if b.id in result.used_blobs and b.id not in seen_in_kept]
        unused = size - sum(b.length for b in used_here)
        result.bytes_unused += unused
        if not used_here:
            result.remove.add(pack_id)
            continue
        is_tree = blobs[0].type is BlobType.TREE
        if unused and (is_tree or unused > max_unused * size):
            result.repack[pack_id] = used_here
            result.bytes_to_repack += size - unused
        else:
            result.keep[pack_id] = blobs
        seen_in_kept.update(b.id for b in used_here)
    indexed = {p.hex() for p in repo.indexed_packs()}
    result.unindexed = {name for name in stored if name not in indexed}
    return result


def run(
    repo: Repository, prune_plan: PrunePlan, progress: Callable[[str], None] | None = None
) -> None:
    """Carry out a plan (the caller holds the exclusive lock)."""
    say = progress or (lambda _m: None)
    old_index_files = [name for name, _ in repo.list_objects(FileType.INDEX)]
    # 2. repack still-used blobs into new packs (written before any index mentions them)
    writer = RepositoryWriter(repo, fresh_dedupe=True)
    for pack_id, blobs in prune_plan.repack.items():
        say(f"repacking data/{pack_id.hex()[:12]}")
        for blob in blobs:
            sealed = repo.backend.load(FileType.DATA, pack_id.hex(), blob.offset, blob.length)
            plain = repo.decrypt_blob(blob, sealed, f"data/{pack_id.hex()}")
            writer.add(blob.type, plain, blob.id)
    writer.flush(write_index=False)
    # 3. new index files covering every kept and new pack, superseding the old ones
    entries: dict[bytes, list[PackedBlob]] = dict(prune_plan.keep)
    entries.update((pack_id, list(blobs)) for pack_id, blobs in writer.written_packs.items())
    # 4. the old index files go once the new ones are stored
    _replace_index(repo, entries, old_index_files)
    # 5. and only now the packs nothing indexes any more
    for pack_id in [*prune_plan.remove, *prune_plan.repack]:
        _remove_pack(repo, pack_id.hex())
    for name in prune_plan.unindexed:
        _remove_pack(repo, name)
    repo.load_index()


def _remove_pack(repo: Repository, name: str) -> None:
    with contextlib.suppress(ObjectNotFound):
        repo.backend.remove(FileType.DATA, name)


def rebuild_index(
    repo: Repository, progress: Callable[[str], None] | None = None
) -> tuple[int, list[str]]:
    """Write a new index from the pack headers themselves; returns (packs indexed,
    unreadable packs). Old index files are removed only after the new one is written."""
    say = progress or (lambda _m: None)
    old = [name for name, _ in repo.list_objects(FileType.INDEX)]
    index = IndexFile(supersedes=[])
    bad: list[str] = []
    for name, size in repo.list_objects(FileType.DATA):
        try:
            blobs = repo.read_pack_header(name, size)
        except (DamagedObject, ObjectNotFound) as exc:
            bad.append(f"{name}: {exc}")
            say(f"skipped data/{name}: {exc}")
            continue
        index.packs[bytes.fromhex(name)] = blobs
    _replace_index(repo, index.packs, old)
    repo.load_index()
    return len(index.packs), bad


def _replace_index(repo: Repository, packs: dict[bytes, list[PackedBlob]], old: list[str]) -> None:
    """Write index files for ``packs`` (superseding ``old``), then remove the old files:
    at every moment some complete index is stored."""
    items = list(packs.items())
    superseded = [bytes.fromhex(name) for name in old]
    for start in range(0, len(items), INDEX_PACKS_PER_FILE):
        chunk = dict(items[start : start + INDEX_PACKS_PER_FILE])
        repo.save_index_file(IndexFile(chunk, superseded))
    for name in old:
        with contextlib.suppress(ObjectNotFound):
            repo.backend.remove(FileType.INDEX, name)
