"""Writing blobs: dedupe, compress, encrypt, fill packs, upload, then index.

Order of writes follows restic's rules (design.rst, "Read and Write Ordering"): packs
first, then the index files that list them, then (the caller) the snapshot. An
interrupted run therefore leaves at worst packs that no snapshot references yet: earlier
snapshots stay intact, and the next run reuses every pack already indexed.

Thread safety: ``add`` may be called from several threads at once; compression and
encryption run outside the lock (zstandard and OpenSSL release the GIL).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard

from ..storage import FileType
from . import format as fmt
from .format import BlobType, IndexFile, PackedBlob
from .repository import Repository

PACK_TARGET_SIZE = 16 * 1024 * 1024
INDEX_FLUSH_PACKS = 50  # write an index file after this many packs (progress survives a crash)
# Store a blob compressed only if that saves at least 1/32 of it: photos, voice notes and
# videos are already compressed and are stored as they are.
_MIN_SAVING_DIVISOR = 32


@dataclass
class _Pack:
    blob_type: BlobType
    data: bytearray = field(default_factory=bytearray)
    blobs: list[PackedBlob] = field(default_factory=list)


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
    ) -> None:
        """``fresh_dedupe``: dedupe only against what this writer wrote (prune's repacking
        must copy blobs even though the index still lists their old packs)."""
        repo.ensure_index()
        self._fresh = fresh_dedupe
        self.written_packs: dict[bytes, list[PackedBlob]] = {}
        self.repo = repo
        self.pack_target = pack_target
        self.stats = WriteStats()
        self._lock = threading.Lock()
        self._reserved: set[bytes] = set()
        self._written: set[bytes] = set()
        self._open: dict[BlobType, _Pack] = {}
        self._unindexed: IndexFile = IndexFile()
        self._unindexed_count = 0
        self._local = threading.local()
        self._level = compression_level
        self._on_pack_written = on_pack_written

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "zstd", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._level)
            self._local.zstd = compressor
        return compressor

    def add(
        self, blob_type: BlobType, data: bytes, blob_id: bytes | None = None, compress: bool = True
    ) -> bytes:
        """Store a blob unless the repository (or this run) already has it; returns its id.
        ``compress=False`` skips the attempt (for data already known not to compress)."""
        if blob_id is None:
            blob_id = fmt.sha256(data)
        with self._lock:
            known = (not self._fresh and self.repo.has_blob(blob_id)) or blob_id in self._reserved
            if known or blob_id in self._written:
                self.stats.blobs_duplicate += 1
                return blob_id
            self._reserved.add(blob_id)
        compressed = self._compressor().compress(data) if compress else data
        if compress and len(compressed) <= len(data) - len(data) // _MIN_SAVING_DIVISOR - 1:
            sealed = self.repo.key.seal(compressed)
            uncompressed_length: int | None = len(data)
        else:
            sealed = self.repo.key.seal(data)
            uncompressed_length = None
        full: _Pack | None = None
        with self._lock:
            pack = self._open.setdefault(blob_type, _Pack(blob_type))
            pack.blobs.append(
                PackedBlob(blob_id, blob_type, len(pack.data), len(sealed), uncompressed_length)
            )
            pack.data += sealed
            self.stats.blobs_new += 1
            self.stats.bytes_plain_new += len(data)
            self.stats.bytes_stored_new += len(sealed)
            if len(pack.data) >= self.pack_target:
                full = self._open.pop(blob_type)
        if full is not None:
            self._write_pack(full)
        return blob_id

    def _write_pack(self, pack: _Pack) -> None:
        header = self.repo.key.seal(fmt.encode_pack_header(pack.blobs))
        pack.data += header
        pack.data += len(header).to_bytes(4, "little")
        data = bytes(pack.data)
        pack_id = fmt.sha256(data)
        self.repo.backend.save(FileType.DATA, pack_id.hex(), data)
        write_index: IndexFile | None = None
        with self._lock:
            if not self._fresh:
                self.repo.add_to_index(pack_id, pack.blobs)
            self.written_packs[pack_id] = pack.blobs
            for blob in pack.blobs:
                self._reserved.discard(blob.id)
                self._written.add(blob.id)
            self._unindexed.packs[pack_id] = pack.blobs
            self._unindexed_count += 1
            self.stats.packs_written += 1
            if self._unindexed_count >= INDEX_FLUSH_PACKS and not self._fresh:
                write_index, self._unindexed = self._unindexed, IndexFile()
                self._unindexed_count = 0
        if self._on_pack_written:
            self._on_pack_written(len(data))
        if write_index is not None:
            self._save_index(write_index)

    def _save_index(self, index: IndexFile) -> None:
        self.repo.save_unpacked(FileType.INDEX, index.to_json())
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
        with self._lock:
            index, self._unindexed = self._unindexed, IndexFile()
            self._unindexed_count = 0
        if index.packs and write_index:
            self._save_index(index)
