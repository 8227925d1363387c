"""Writing blobs: dedupe, compress, encrypt, fill packs, upload, then index.

Order of writes follows restic's rules (design.rst, "Read and Write Ordering"): packs
first, then the index files that list them, then (the caller) the snapshot. An
interrupted run therefore leaves at worst packs that no snapshot references yet: earlier
snapshots stay intact, and the next run reuses every pack already indexed.

Thread safety: ``add`` may be called from several threads at once; compression and
encryption run outside the lock (zstandard and OpenSSL release the GIL).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import zstandard

from backvault.crypto.aead import OVERHEAD, Key
from backvault.repo import format as fmt
from backvault.repo.compression import ThreadCompressors
from backvault.repo.format import ID_SIZE, BlobType, PackedBlob
from backvault.repo.repository import Repository
from backvault.storage import FileType, Spool

# Every worker process holds a pack open: 8 MiB keeps memory low (restic 0.14 writes 4 MiB).
PACK_TARGET_SIZE = 8 * 1024 * 1024
INDEX_FLUSH_PACKS = 50  # write an index file after this many packs (progress survives a crash)
# Store a blob compressed only if that saves at least 1/32 of it: photos, voice notes and
# videos are already compressed and are stored as they are.
_MIN_SAVING_DIVISOR = 32


def _saves_enough(compressed_length: int, length: int) -> bool:
    return compressed_length <= length - length // _MIN_SAVING_DIVISOR - 1


class SealedChunk(NamedTuple):
    id: bytes
    plain_length: int
    # The sealed blob; None if the blob was already stored when the work started, or if
    # a worker process stored it in a pack of its own (then ``sealed_length`` is its size).
    sealed: bytes | memoryview | None
    uncompressed_length: int | None  # set when the blob holds compressed data
    sealed_length: int = 0


def seal_blob(
    key: Key, compressor: zstandard.ZstdCompressor | None, data: bytes | bytearray | memoryview
) -> tuple[bytes, int | None]:
    """A blob's sealed bytes, compressed first when a compressor is given and that saves
    enough; and its uncompressed length if it was compressed."""
    if compressor is not None:
        compressed = compressor.compress(data)
        if _saves_enough(len(compressed), len(data)):
            return key.seal(compressed), len(data)
    return key.seal(data), None


# A pack being filled is kept in memory up to this many bytes, then written to a spool
# of the backend (``Backend.spool``: a hidden file renamed when the pack is complete, for
# a local repository) where there is one: each worker process held its open pack and the one being saved,
# 8 MiB each.
SPOOL_PART_BYTES = 1024 * 1024


# A blob larger than this (a big folder's tree: a database's lists ~190 000 ids, ~13 MB
# of JSON) is compressed and sealed a slice at a time (``_seal_large``): never a
# compressed copy of its whole size (zstd's one-shot output starts at its worst case),
# nor of its plaintext. One larger than a pack's target is sealed straight into a pack of
# its own, spooled a MiB at a time: not even the sealed blob is held beside the pack.
# (Blobs between the two go to the open pack as usual: a pack of its own for each would
# make many small packs, of trees and of the chunks restic cuts, up to 8 MiB, when prune
# repacks them.)
LARGE_BLOB_BYTES = 1024 * 1024


def _compressed(
    stream: zstandard.ZstdCompressionObj, parts: Iterable[bytes | bytearray | memoryview]
) -> Iterator[bytes]:
    for part in parts:
        compressed = stream.compress(part)
        if compressed:
            yield compressed
    yield stream.flush()


def _same(
    parts: Iterable[bytes | bytearray | memoryview], blob_id: bytes
) -> Iterator[bytes | bytearray | memoryview]:
    """``parts`` as they come, and RuntimeError after the last if they are not the bytes
    of ``blob_id`` (read again to be sealed: never stored under another's id)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        yield part
    if digest.digest() != blob_id:
        raise RuntimeError("a blob's parts changed between two readings")


def _fill(pack: _Pack, parts: Iterable[bytes]) -> int:
    """Add ``parts`` to the pack's bytes (moved to its spool, if it has one, a MiB at a
    time); their length."""
    length = 0
    for part in parts:
        pack.data += part
        length += len(part)
        if pack.spool is not None and len(pack.data) >= SPOOL_PART_BYTES:
            pack.spill()
    return length


@dataclass
class _Pack:
    blob_type: BlobType
    data: bytearray = field(default_factory=bytearray)  # what is not yet in the spool
    blobs: list[PackedBlob] = field(default_factory=list)
    size: int = 0  # its bytes so far, spooled or not
    spool: Spool | None = None
    spooled: hashlib._Hash | None = None  # the SHA-256 of what is in the spool

    def spill(self) -> None:
        """Move what is in memory to the spool."""
        assert self.spool is not None
        if self.spooled is None:
            self.spooled = hashlib.sha256()
        self.spooled.update(self.data)
        self.spool.write(self.data)
        self.data = bytearray()

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()


@dataclass
class WriteStats:
    blobs_new: int = 0
    blobs_duplicate: int = 0
    bytes_plain_new: int = 0
    bytes_stored_new: int = 0
    packs_written: int = 0
    index_files_written: int = 0


class RepositoryWriter:
    def __init__(
        self,
        repo: Repository,
        pack_target: int = PACK_TARGET_SIZE,
        compression_level: int = 3,
        on_pack_written: Callable[[int], None] | None = None,
        fresh_dedupe: bool = False,
        background_saves: bool = False,
    ) -> None:
        """``fresh_dedupe``: dedupe only against what this writer wrote (prune's repacking
        must copy blobs even though the index still lists their old packs); its packs are
        neither added to the repository's index nor listed in an index file: its caller
        does that, from ``written_packs``.

        ``background_saves``: a full pack is written (and synced) on a thread of its own
        while the caller fills the next, one at a time; its error is raised by the next
        pack or by ``flush``. For a caller that adds blobs from one thread (a worker
        process): writing and syncing a pack is then no longer time it stops working."""
        repo.ensure_index()
        self._fresh = fresh_dedupe
        # The packs written, for a caller that indexes them itself (a fresh writer's do
        # not go into the index): a backup's would hold an object per blob it stores.
        self.written_packs: dict[bytes, Collection[PackedBlob]] = {}
        self.repo = repo
        self.pack_target = pack_target
        self.stats = WriteStats()
        self._lock = threading.Lock()
        self._reserved: set[bytes] = set()
        self._written: set[bytes] = set()
        self._open: dict[BlobType, _Pack] = {}
        # The packs no index file lists yet, kept as their headers (``compact_pack_blobs``).
        self._unindexed: dict[bytes, Collection[PackedBlob]] = {}
        self._zstd = ThreadCompressors(compression_level)
        self._on_pack_written = on_pack_written
        self._saver = (
            ThreadPoolExecutor(1, thread_name_prefix="backvault-save") if background_saves else None
        )
        self._saving: Future[None] | None = None
        self._spools = True  # until the backend says it has none

    def add(
        self,
        blob_type: BlobType,
        data: bytes | bytearray,
        blob_id: bytes | None = None,
        compress: bool = True,
    ) -> bytes:
        """Store a blob unless the repository (or this run) already has it; returns its id.
        ``compress=False`` skips the attempt (for data already known not to compress)."""
        if blob_id is None:
            blob_id = fmt.sha256(data)
        return self._store(
            blob_type,
            blob_id,
            lambda: fmt.in_slices((data,), LARGE_BLOB_BYTES),
            len(data),
            compress,
        )

    def add_parts(
        self, blob_type: BlobType, parts: Callable[[], Iterable[bytes]], compress: bool = True
    ) -> bytes:
        """``add`` of the bytes ``parts()`` gives, never joined: read once for the blob's
        id and size, then again to seal them (a slice at a time: ``_seal_large``) if it is
        new (a big folder's tree: ``fmt.tree_parts``)."""
        digest = hashlib.sha256()
        size = 0
        for part in parts():
            digest.update(part)
            size += len(part)
        blob_id = digest.digest()
        return self._store(
            blob_type,
            blob_id,
            lambda: _same(fmt.in_slices(parts(), LARGE_BLOB_BYTES), blob_id),
            size,
            compress,
        )

    def _store(
        self,
        blob_type: BlobType,
        blob_id: bytes,
        parts: Callable[[], Iterable[bytes | bytearray | memoryview]],
        size: int,
        compress: bool,
    ) -> bytes:
        with self._lock:
            known = (not self._fresh and self.repo.has_blob(blob_id)) or blob_id in self._reserved
            if known or blob_id in self._written:
                self.stats.blobs_duplicate += 1
                return blob_id
            self._reserved.add(blob_id)
        compressor = self._zstd.compressor() if compress else None
        sealed: list[bytes | bytearray | memoryview]
        if size > LARGE_BLOB_BYTES:
            alone = size > self.pack_target
            large, uncompressed_length = self._seal_large(
                blob_type, compressor, parts, size, spooled=alone
            )
            if alone:  # a pack of its own
                large.blobs.append(
                    PackedBlob(blob_id, blob_type, 0, large.size, uncompressed_length)
                )
                with self._lock:
                    self.stats.blobs_new += 1
                    self.stats.bytes_plain_new += size
                    self.stats.bytes_stored_new += large.size
                self._write_pack(large)
                return blob_id
            # Into the open pack a spool part at a time, as it spills.
            sealed = list(fmt.in_slices((large.data,), SPOOL_PART_BYTES))
        else:
            pieces = list(parts())
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if len(data) != size:
                raise RuntimeError("a blob's parts changed between two readings")
            whole, uncompressed_length = seal_blob(self.repo.key, compressor, data)
            sealed = [whole]
        with self._lock:
            full = self._append(blob_type, blob_id, sealed, size, uncompressed_length)
        if full is not None:
            self._write_pack(full)
        return blob_id

    def add_sealed(self, blob_type: BlobType, chunk: SealedChunk) -> None:
        """Store a chunk a worker sealed, unless the repository (or this run) has it."""
        with self._lock:
            if self.knows(chunk.id):
                self.stats.blobs_duplicate += 1
                return
            if chunk.sealed is None:
                raise RuntimeError(f"blob {chunk.id.hex()[:12]} was taken as stored, but is not")
            self._reserved.add(chunk.id)
            full = self._append(
                blob_type, chunk.id, [chunk.sealed], chunk.plain_length, chunk.uncompressed_length
            )
        if full is not None:
            self._write_pack(full)

    def knows(self, blob_id: bytes) -> bool:
        """Whether the repository has the blob, or this run stores it."""
        return self.repo.has_blob(blob_id) or blob_id in self._reserved or blob_id in self._written

    def known_ids(self) -> bytes:
        """Every blob id ``knows`` (32 bytes each), for worker processes."""
        with self._lock:
            extra = self._reserved | self._written
        return self.repo.blob_ids_joined() + b"".join(extra)

    def _append(
        self,
        blob_type: BlobType,
        blob_id: bytes,
        sealed: Sequence[bytes | bytearray | memoryview],
        plain_length: int,
        uncompressed_length: int | None,
    ) -> _Pack | None:
        """Add a sealed blob (its parts) to the open pack (holding the lock); the pack if
        now full."""
        pack = self._open.setdefault(blob_type, _Pack(blob_type))
        length = sum(len(part) for part in sealed)
        pack.blobs.append(PackedBlob(blob_id, blob_type, pack.size, length, uncompressed_length))
        pack.size += length
        for part in sealed:
            pack.data += part
            if len(pack.data) >= SPOOL_PART_BYTES and self._spools:
                self._spill(pack)
        self.stats.blobs_new += 1
        self.stats.bytes_plain_new += plain_length
        self.stats.bytes_stored_new += length
        if pack.size >= self.pack_target:
            return self._open.pop(blob_type)
        return None

    def _seal_large(
        self,
        blob_type: BlobType,
        compressor: zstandard.ZstdCompressor | None,
        parts: Callable[[], Iterable[bytes | bytearray | memoryview]],
        size: int,
        spooled: bool,
    ) -> tuple[_Pack, int | None]:
        """A large blob sealed a part at a time into the bytes of a new pack (moved to the
        backend's spool a MiB at a time if ``spooled`` and it has one): compressed into
        one zstd frame that records its size, as ``seal_blob`` writes it, if that saves
        enough, else (``parts`` is called again) as it is. The pack (``size`` the sealed
        blob's, no blob listed yet) and the blob's uncompressed length."""
        key = self.repo.key
        pack = self._new_pack(blob_type, spooled)
        try:
            if compressor is not None:
                stream = compressor.compressobj(size=size)
                pack.size = _fill(pack, key.seal_stream(_compressed(stream, parts())))
                if _saves_enough(pack.size - OVERHEAD, size):
                    return pack, size
                pack.discard()
                pack = self._new_pack(blob_type, spooled)
            pack.size = _fill(pack, key.seal_stream(parts()))
            if pack.size - OVERHEAD != size:
                raise RuntimeError("a blob's parts changed between two readings")
        except BaseException:
            pack.discard()
            raise
        return pack, None

    def _new_pack(self, blob_type: BlobType, spooled: bool) -> _Pack:
        """An empty pack, with a spool of the backend if asked and it has one."""
        spool = self.repo.backend.spool(FileType.DATA) if spooled and self._spools else None
        if spooled:
            self._spools = spool is not None
        return _Pack(blob_type, spool=spool)

    def _spill(self, pack: _Pack) -> None:
        """Move the pack's bytes in memory to its spool (made now if it has none)."""
        if pack.spool is None:
            pack.spool = self.repo.backend.spool(FileType.DATA)
            self._spools = pack.spool is not None
        if pack.spool is not None:
            pack.spill()

    def _write_pack(self, pack: _Pack) -> None:
        if self._saver is None:
            self._save_pack(pack)
            return
        self._wait_for_save()  # one pack saved at a time: memory stays at two packs
        self._saving = self._saver.submit(self._save_pack, pack)

    def _wait_for_save(self) -> None:
        """Wait for the pack being saved in the background; raise its error."""
        saving, self._saving = self._saving, None
        if saving is not None:
            saving.result()

    def _save_pack(self, pack: _Pack) -> None:
        try:
            # The blobs lie back to back from the pack's start, as ``_append`` adds them:
            # kept as the header lists them (``PackBlobs``) from here on, and sent so to a
            # worker's parent (an object per blob to pickle, unpickle and index cost more).
            plain_header = fmt.encode_pack_header(pack.blobs)
            blobs = fmt.PackBlobs(plain_header, len(pack.blobs))
            header = self.repo.key.seal(plain_header)
            pack.data += header
            pack.data += len(header).to_bytes(4, "little")
            size = pack.size + len(header) + 4
            backend = self.repo.backend
            if pack.spool is not None:
                pack.spill()
                assert pack.spooled is not None
                pack_id = pack.spooled.digest()
                pack.spool.save_as(pack_id.hex())
            else:
                pack_id = fmt.sha256(pack.data)
                if backend.capabilities.direct_file_io:  # takes the buffer as it is: no copy
                    backend.save(FileType.DATA, pack_id.hex(), pack.data)  # type: ignore[arg-type]
                else:  # storage clients want bytes
                    backend.save(FileType.DATA, pack_id.hex(), bytes(pack.data))
        finally:
            pack.discard()
        self._record_pack(pack_id, blobs)
        if self._on_pack_written:
            self._on_pack_written(size)

    def expect(self, blob_ids: list[bytes]) -> None:
        """Worker processes stored these blobs in packs they have not reported yet
        (``adopt_pack`` will): count them as stored by this run from now on."""
        with self._lock:
            stored = self._stored
            self._reserved.update(i for i in blob_ids if not stored(i))

    def _stored(self, blob_id: bytes) -> bool:
        """Whether the blob is in a pack this writer wrote (or the repository had)."""
        return blob_id in self._written or (not self._fresh and self.repo.has_blob(blob_id))

    def adopt_pack(self, pack_id: bytes, blobs: Collection[PackedBlob]) -> None:
        """Index a pack a worker process wrote (it may repeat blobs another worker stored
        at the same moment: restic's format allows that, and prune removes them)."""
        columns = fmt.blob_columns(blobs)
        with self._lock:
            self.stats.blobs_new += len(columns.lengths)
            self.stats.bytes_plain_new += columns.plaintext_bytes()
            self.stats.bytes_stored_new += sum(columns.lengths)
        self._record_pack(pack_id, blobs, columns.ids)

    def _record_pack(
        self, pack_id: bytes, blobs: Collection[PackedBlob], ids: bytes | None = None
    ) -> None:
        """A pack is stored: index it (an index file after every INDEX_FLUSH_PACKS).
        ``ids``: its blobs' ids back to back, if known."""
        if ids is None:
            ids = fmt.blob_columns(blobs).ids
        blob_ids = [ids[at : at + ID_SIZE] for at in range(0, len(ids), ID_SIZE)]
        write_index: dict[bytes, Collection[PackedBlob]] | None = None
        with self._lock:
            if self._fresh:  # its caller indexes its packs: it remembers them until then
                self.written_packs[pack_id] = blobs
                self._written.update(blob_ids)
            else:  # the repository's index answers for them from now on
                self.repo.add_to_index(pack_id, blobs)
            self._reserved.difference_update(blob_ids)
            if not self._fresh:
                self._unindexed[pack_id] = (
                    blobs
                    if isinstance(blobs, fmt.PackBlobs)
                    else fmt.compact_pack_blobs(list(blobs))
                )
            self.stats.packs_written += 1
            if len(self._unindexed) >= INDEX_FLUSH_PACKS:
                write_index, self._unindexed = self._unindexed, {}
        if write_index is not None:
            self._save_index(write_index)

    def written_count(self) -> int:
        """How many blob ids ``take_written_ids`` would give."""
        with self._lock:
            return len(self._written)

    def take_written_ids(self) -> list[bytes]:
        """The ids of the blobs in packs this writer wrote, which it forgets from now on
        (``knows`` no longer answers for them): a worker process keeps them in a compact
        set of its own instead."""
        with self._lock:
            ids, self._written = list(self._written), set()
        return ids

    def take_written_packs(self) -> list[tuple[bytes, Collection[PackedBlob]]]:
        """The packs written since the last call (a worker process reports them)."""
        with self._lock:
            packs = list(self.written_packs.items())
            self.written_packs.clear()
        return packs

    def _save_index(self, packs: dict[bytes, Collection[PackedBlob]]) -> None:
        self.repo.save_index(packs)
        with self._lock:
            self.stats.index_files_written += 1

    def flush(self, write_index: bool = True) -> None:
        """Write every open pack, then (unless told not to) the index of everything not
        yet indexed."""
        with self._lock:
            packs = [p for p in self._open.values() if p.blobs]
            self._open.clear()
        for pack in packs:
            self._write_pack(pack)
        self._wait_for_save()
        with self._lock:
            index, self._unindexed = self._unindexed, {}
            missing = len(self._reserved)
        if index and write_index:
            self._save_index(index)
        if missing:
            raise RuntimeError(f"{missing} blobs were to be stored by this run but are in no pack")
