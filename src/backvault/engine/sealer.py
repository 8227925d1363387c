"""The backup's heavy work: cut file data into chunks, hash, compress and encrypt them.

It runs in worker processes (see ``engine.parallel``), which know the blobs the repository held
when they started and the ones they stored themselves; a chunk they know comes back as its
id alone. A worker stores what it seals in packs of its own, written to the repository
directly, and reports those packs; the parent indexes them. Two workers that meet the same
new chunk at the same moment both store it (as two concurrent restic backups would).
With threads in the parent instead, sealed chunks go to the parent's writer, which
stores each once (``RepositoryWriter.add_sealed``).

A piece of work names a file and what to take from it: the whole file, cut with FastCDC
(``FILE``), or given byte ranges (``RANGES``: SQLite pages, or the chunks of a large file
that ``cut_file`` found). File data never travels between processes.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple

import zstandard

from backvault.crypto.aead import Key
from backvault.repo import format as fmt
from backvault.repo.chunker import ContentChunker, chunker_seed
from backvault.repo.compression import ThreadCompressors
from backvault.repo.format import BlobType, Config, PackedBlob
from backvault.repo.repository import Repository
from backvault.repo.writer import RepositoryWriter, SealedChunk, seal_blob
from backvault.storage import BackendSpec, open_backend_from_spec

FILE = "file"
RANGES = "ranges"
_SAMPLE = 16 * 1024


class Piece(NamedTuple):
    kind: str  # FILE or RANGES
    path: str
    ranges: list[tuple[int, int]] | None = None  # (offset, length), for RANGES
    compress: bool | None = None  # None: judge on the first chunk of the piece


PieceResult = list[SealedChunk] | OSError


class TaskResult(NamedTuple):
    """A task's results, and the packs a worker process wrote while doing it."""

    pieces: list[PieceResult]
    packs: list[tuple[bytes, list[PackedBlob]]]


def compresses(first_chunk: bytes | memoryview) -> bool:
    """Whether a file's data is worth compressing, judged on a sample of its first chunk:
    photos, voice notes and videos are already compressed and are stored as they are,
    without spending CPU on trying every chunk."""
    sample = first_chunk[:_SAMPLE]
    if len(sample) < 512:
        return True
    return len(zstandard.ZstdCompressor(level=1).compress(sample)) < len(sample) * 0.97


class ChunkSealer:
    """Seals chunks with the master key. Safe to share between threads."""

    def __init__(
        self, key: Key, is_known: Callable[[bytes], bool], compression_level: int = 3
    ) -> None:
        self.key = key
        self._seed = chunker_seed(key)
        self._is_known = is_known
        self._zstd = ThreadCompressors(compression_level)
        self._local = threading.local()
        # A worker process stores the blobs it seals in packs of its own, written to the
        # repository directly (sealed data never travels back to the parent).
        self.writer: RepositoryWriter | None = None
        self.known: set[bytes] | None = None  # what ``is_known`` answers from, in a worker

    def _chunker(self) -> ContentChunker:
        chunker = getattr(self._local, "chunker", None)
        if chunker is None:
            chunker = ContentChunker(self._seed)
            self._local.chunker = chunker
        return chunker

    def seal(self, data: bytes | memoryview, compress: bool) -> SealedChunk:
        blob_id = fmt.sha256(data)
        writer = self.writer
        if self._is_known(blob_id) or (writer is not None and writer.knows(blob_id)):
            return SealedChunk(blob_id, len(data), None, None)
        sealed, uncompressed_length = seal_blob(
            self.key, self._zstd.compressor() if compress else None, data
        )
        chunk = SealedChunk(blob_id, len(data), sealed, uncompressed_length)
        if writer is None:
            return chunk
        writer.add_sealed(BlobType.DATA, chunk)  # into this worker's own pack
        return chunk._replace(sealed=None, sealed_length=len(sealed))

    def _seal_all(
        self, chunks: Iterable[bytes | memoryview], compress: bool | None
    ) -> list[SealedChunk]:
        sealed = []
        for chunk in chunks:
            if compress is None:
                compress = compresses(chunk)
            sealed.append(self.seal(chunk, compress))
        return sealed

    def store(self, piece: Piece) -> list[SealedChunk]:
        if piece.kind == FILE:  # a file small enough to hold in memory whole
            with open(piece.path, "rb") as handle:
                data = handle.read()
            return self._seal_all(self._chunker().cut(data), piece.compress)
        assert piece.ranges is not None
        fd = os.open(piece.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self._seal_all(_read_ranges(fd, piece.path, piece.ranges), piece.compress)
        finally:
            os.close(fd)


def _read_ranges(fd: int, path: str, ranges: list[tuple[int, int]]) -> Iterable[bytes]:
    for offset, length in ranges:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, "it shrank while it was being read; back up again", path)
        yield data


def seal_pieces(sealer: ChunkSealer, pieces: list[Piece]) -> TaskResult:
    """Runs in a worker: each piece's sealed chunks, or the error that stopped it."""
    results: list[PieceResult] = []
    for piece in pieces:
        try:
            results.append(sealer.store(piece))
        except OSError as exc:
            results.append(exc)
    return TaskResult(results, _take_packs(sealer))


def _take_packs(sealer: ChunkSealer) -> list[tuple[bytes, list[PackedBlob]]]:
    if sealer.writer is None:
        return []
    packs = list(sealer.writer.written_packs.items())
    sealer.writer.written_packs.clear()
    return packs


def flush_packs(sealer: ChunkSealer) -> list[tuple[bytes, list[PackedBlob]]]:
    """Runs in each worker at the end: write the open pack; every pack not yet reported."""
    if sealer.writer is not None:
        sealer.writer.flush(write_index=False)
    return _take_packs(sealer)


def cut_file(sealer: ChunkSealer, path: str) -> list[tuple[int, int]]:
    """Runs in a worker: the (offset, length) of a large file's chunks, so its sealing can
    be shared out in pieces."""
    return sealer._chunker().boundaries(path)


def learn_known(sealer: ChunkSealer, known_ids: bytes) -> None:
    """Runs in a worker: these blobs (32-byte ids, back to back) are stored already."""
    if sealer.known is not None:
        sealer.known.update(known_ids[i : i + 32] for i in range(0, len(known_ids), 32))


def sealer_in_worker(
    key_doc: dict[str, object], config: Config, backend_spec: BackendSpec, known_ids: bytes
) -> ChunkSealer:
    """A worker process's sealer, writing packs through the parent's backend stack,
    reopened from its spec."""
    key = Key.from_json(key_doc)
    known: set[bytes] = set()
    sealer = ChunkSealer(key, known.__contains__)
    sealer.known = known
    learn_known(sealer, known_ids)
    repo = Repository(open_backend_from_spec(backend_spec), key, config, None)
    repo.assume_empty_index()
    sealer.writer = RepositoryWriter(repo, fresh_dedupe=True)
    return sealer
