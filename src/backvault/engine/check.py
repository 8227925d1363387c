"""Checking a repository: structure always, every byte with ``read_data``."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from backvault.crypto.aead import OVERHEAD
from backvault.engine.parallel import WorkerPool, reader_pool
from backvault.engine.walk import walk
from backvault.repo import format as fmt
from backvault.repo.blobs import BlobLocation, BlobReader, PackReport
from backvault.repo.errors import DamagedObject
from backvault.repo.format import BlobType, Node, PackedBlob
from backvault.repo.repository import Repository
from backvault.storage import FileType


@dataclass
class CheckResult:
    snapshots: int = 0
    trees: int = 0
    packs: int = 0
    blobs: int = 0
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


class _TreeProblem(DamagedObject):
    """A snapshot names a tree the index does not have as a tree: ``kind`` and ``name``
    begin its message ("tree 1a2b3c4d5e6f", "blob 1a2b3c4d5e6f")."""

    def __init__(self, kind: str, tree_id: bytes, problem: str) -> None:
        super().__init__(f"{kind} {tree_id.hex()[:12]}", problem)


def expected_pack_size(blobs: list[PackedBlob]) -> int:
    # entry sizes: 1+4+32 = 37 plain, 1+4+4+32 = 41 compressed
    header = sum(41 if b.compressed else 37 for b in blobs)
    return sum(b.length for b in blobs) + header + OVERHEAD + fmt.HEADER_LENGTH_SIZE


class Checker:
    def __init__(
        self,
        repo: Repository,
        advance: Callable[[int], None] | None = None,
    ) -> None:
        self.repo = repo
        self.result = CheckResult()
        self._advance = advance or (lambda _n: None)

    def run(
        self, read_data: bool = False, subset: Callable[[str], bool] | None = None
    ) -> CheckResult:
        pool = None
        if read_data:
            pool = reader_pool(self.repo.backend, self.repo.key)
            if self.repo.backend.capabilities.direct_file_io:
                # Worker processes start now, while the index is read and the trees are
                # walked (before any pack was read, those and the start took ~0.5 s of a
                # 3 s check). This listing only sizes the work; the one that counts comes
                # after the index, so that a pack saved meanwhile is found with its index.
                # (Remote storage is read on threads: no start to hide, no listing.)
                listed = self.repo.list_objects(FileType.DATA)
                pool.expect(sum(size for name, size in listed if subset is None or subset(name)))
        try:
            return self._run(read_data, subset, pool)
        finally:
            if pool is not None:
                pool.shutdown(cancel=True)

    def _run(
        self,
        read_data: bool,
        subset: Callable[[str], bool] | None,
        pool: WorkerPool | None,
    ) -> CheckResult:
        errors: list[DamagedObject] = []
        self.repo.load_index(errors=errors)
        self.result.errors.extend(str(e) for e in errors)
        for kind in (FileType.INDEX, FileType.SNAPSHOT, FileType.LOCK):
            self._list_objects(kind)  # (data/ below) reports files none of the repository's
        # Each pack's blobs made when wanted, not all kept (~40 MB for a big database).
        pack_ids = self.repo.indexed_pack_ids()
        indexed_blobs = self.repo.indexed_pack_lister()
        stored = dict(self._list_objects(FileType.DATA))
        for pack_id in pack_ids:
            name = pack_id.hex()
            if name not in stored:
                self.result.errors.append(f"data/{name} is missing (listed in the index)")
                continue
            expected = expected_pack_size(indexed_blobs(pack_id) or [])
            if stored[name] != expected:
                self.result.errors.append(
                    f"data/{name} has {stored[name]} bytes, the index implies {expected}"
                )
        indexed = {p.hex() for p in pack_ids}
        for name in stored:
            if name not in indexed:
                self.result.warnings.append(
                    f"data/{name} is not in any index (left by an interrupted backup; "
                    "harmless, a future prune removes it)"
                )
        self.result.packs = len(stored)
        reading: _PackReading | None = None
        if pool is not None:
            chosen = [name for name in sorted(stored) if subset is None or subset(name)]
            reading = _PackReading(pool, chosen, stored, indexed_blobs, self._advance)
        try:
            self._check_snapshots_and_trees()
            if reading is not None:
                reading.add_to(self.result)  # after the trees' errors, as before
        finally:
            if reading is not None:
                reading.stop()
        return self.result

    def _list_objects(self, kind: FileType) -> list[tuple[str, int]]:
        """``repo.list_objects``, each file there that is none of the repository's
        reported: no command reads, parses or deletes it, and restic ignores it too."""
        unexpected: list[str] = []
        found = self.repo.list_objects(kind, unexpected)
        for name in sorted(unexpected):
            self.result.errors.append(
                f"{kind.value}/: the file {name!r} is not a repository object (its name is "
                "not a 64-digit hex id; backvault and restic ignore it): move it out of "
                "the repository"
            )
        return found

    def _check_snapshots_and_trees(self) -> None:
        errors: list[DamagedObject] = []
        snapshots = self.repo.list_snapshots(errors=errors)
        self.result.errors.extend(str(e) for e in errors)
        self.result.snapshots = len(snapshots)
        seen: set[bytes] = set()  # each tree is checked once, in the first snapshot met
        shapes: dict[bytes, fmt.TreeShape] = {}
        for name, snap in reversed(snapshots):
            label = f"snapshot {name[:8]}"

            def load(tree_id: bytes) -> list[Node]:
                location = self.repo.lookup(tree_id, BlobType.TREE) or self.repo.lookup(tree_id)
                if location is None:
                    raise _TreeProblem("tree", tree_id, "is not in any index")
                if location.blob.type is not BlobType.TREE:
                    raise _TreeProblem("blob", tree_id, "is not a tree")
                nodes = self.repo.load_tree(tree_id, keep=False)  # each tree read once
                self.result.trees += 1
                shapes[tree_id] = fmt.TreeShape.of(nodes)
                return nodes

            def damaged(path: str, exc: DamagedObject, label: str = label) -> None:
                # Where the tree is, for messages: "snapshot 1a2b3c4d: home: chat".
                where = label + path.replace("/", ": ")
                if isinstance(exc, _TreeProblem):
                    self.result.errors.append(f"{exc.name} ({where}) {exc.problem}")
                else:
                    self.result.errors.append(f"{exc} (tree of {where})")

            for path, node in walk(
                self.repo, snap.tree, load=load, on_damaged=damaged, seen=seen, max_entries=None
            ):
                self._check_content(node, path, label)
        # Folders may share trees: a snapshot of a few trees can expand to 2^40 entries,
        # which restore refuses. Each tree is added up once.
        totals: dict[bytes, tuple[int, int]] = {}
        for name, snap in snapshots:
            entries, _ = fmt.expanded_totals(snap.tree, shapes.get, totals)
            if entries > fmt.MAX_RESTORE_ENTRIES:
                self.result.errors.append(
                    f"snapshot {name[:8]} expands to {entries:,} entries when restored (its "
                    f"folders share subtrees), more than the {fmt.MAX_RESTORE_ENTRIES:,} a "
                    "restore makes"
                )

    def _check_content(self, node: Node, path: str, snapshot: str) -> None:
        """The blobs of an entry are indexed as data, and hold what its size says."""
        where = snapshot + path.rsplit("/", 1)[0].replace("/", ": ")
        held: int | None = 0
        for blob_id in node.content or []:
            loc = self._data_blob(blob_id)
            if loc is None:
                self.result.errors.append(
                    f"data blob {blob_id.hex()[:12]} of {node.name!r} ({where}) is not in any index"
                )
                held = None
            elif loc.blob.type is not BlobType.DATA:
                self.result.errors.append(f"blob {blob_id.hex()[:12]} of {node.name!r} is not data")
                held = None
            elif held is not None:
                held += loc.blob.plaintext_length
        if node.type == "file" and held is not None and held != node.size:
            # A restore refuses such a file (its blobs cannot fill it, or would write
            # past its end): name it before a restore is needed.
            self.result.errors.append(
                f"file {path} ({snapshot}) has the wrong size: its blobs hold "
                f"{held} bytes by the index, its entry says {node.size}"
            )

    def _data_blob(self, blob_id: bytes) -> BlobLocation | None:
        """Where a data blob is by the index, found as data if it is stored as both
        types."""
        return self.repo.lookup(blob_id, BlobType.DATA) or self.repo.lookup(blob_id)


class _PackReading:
    """Reads whole packs on ``pool`` (``parallel.reader_pool``), a few at a time, from a
    thread of its own: started at once, it reads while the caller walks the trees."""

    def __init__(
        self,
        pool: WorkerPool,
        names: list[str],
        sizes: dict[str, int],
        indexed_blobs: Callable[[bytes], list[PackedBlob] | None],
        advance: Callable[[int], None],
    ) -> None:
        self._names = names
        self._sizes = sizes
        self._indexed_blobs = indexed_blobs
        self._advance = advance
        self._errors: list[str] = []
        self._bytes_read = 0
        self._blobs_ok = 0
        self._failure: BaseException | None = None
        self._stopping = threading.Event()
        self._pool = pool
        self._thread = threading.Thread(target=self._run, name="backvault-check-read", daemon=True)
        self._thread.start()

    def add_to(self, result: CheckResult) -> None:
        """Wait for every pack; add what was found to ``result`` (or raise what stopped
        the reading)."""
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        result.bytes_read += self._bytes_read
        result.blobs += self._blobs_ok
        result.errors.extend(self._errors)

    def stop(self) -> None:
        """Stop reading (after the pack in hand); wait for it."""
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._read()
        except BaseException as exc:  # raised in the caller's thread by ``add_to``
            self._failure = exc

    def _read(self) -> None:
        pool = self._pool
        window: collections.deque[tuple[str, Future[PackReport]]] = collections.deque()
        pending = iter(self._names)
        while not self._stopping.is_set():
            while len(window) < 2 * pool.workers:
                name = next(pending, None)
                if name is None:
                    break
                window.append(
                    (name, pool.submit(BlobReader.read_pack, name, work_bytes=self._sizes[name]))
                )
            if not window:
                return
            name, future = window.popleft()
            self._add_pack_report(name, future.result(), self._indexed_blobs(bytes.fromhex(name)))

    def _add_pack_report(
        self, name: str, report: PackReport, indexed: list[PackedBlob] | None
    ) -> None:
        self._advance(report.bytes_read)
        self._bytes_read += report.bytes_read
        self._errors.extend(report.errors)
        self._blobs_ok += report.blobs_ok
        if indexed is not None and report.header is not None:
            # The uncompressed length too: an index that lies about it makes a restore
            # place the file's next blobs at the wrong offset.
            ours = set(report.header)
            theirs = {(b.id, b.offset, b.length, b.uncompressed_length) for b in indexed}
            if not theirs <= ours:
                self._errors.append(f"data/{name}: the index does not match the pack header")
