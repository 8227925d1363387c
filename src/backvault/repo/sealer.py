"""The backup's heavy work: cut file data into chunks, hash, compress and encrypt them.

It runs in worker processes (see ``workers``), which know the blobs the repository held
when they started and the ones they sealed themselves; a chunk they know comes back as its
id alone. The parent decides, exactly, what is stored: a chunk two workers both sealed is
stored once (``RepositoryWriter.add_sealed``).

A piece of work names a file and what to take from it: the whole file, cut with FastCDC
(``FILE``), or given byte ranges (``RANGES``: SQLite pages, or the chunks of a large file
that ``cut_file`` found). File data never travels between processes; sealed chunks do.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple

import zstandard

from ..crypto.aead import Key
from ..storage.local import LocalBackend
from . import format as fmt
from .chunker import ContentChunker, chunker_seed
from .format import BlobType, Config, PackedBlob
from .repository import Repository
from .writer import MIN_SAVING_DIVISOR, RepositoryWriter, SealedChunk

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
        self,
        key: Key,
        is_known: Callable[[bytes], bool],
        remember_sealed: bool,
        compression_level: int = 3,
    ) -> None:
        self.key = key
        self._seed = chunker_seed(key)
        self._is_known = is_known
        # A worker process remembers what it sealed (so it does not seal it again); with
        # threads, ``is_known`` already sees everything handed to the writer.
        self._sealed: set[bytes] | None = set() if remember_sealed else None
        self._level = compression_level
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

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "zstd", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._level)
            self._local.zstd = compressor
        return compressor

    def seal(self, data: bytes | memoryview, compress: bool) -> SealedChunk:
        blob_id = fmt.sha256(data)
        if (self._sealed is not None and blob_id in self._sealed) or self._is_known(blob_id):
            return SealedChunk(blob_id, len(data), None, None)
        if self._sealed is not None:
            self._sealed.add(blob_id)
        if compress:
            compressed = self._compressor().compress(data)
            if len(compressed) <= len(data) - len(data) // MIN_SAVING_DIVISOR - 1:
                return SealedChunk(blob_id, len(data), self.key.seal(compressed), len(data))
        return SealedChunk(blob_id, len(data), self.key.seal(data), None)

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
    return TaskResult(_store_in_own_packs(sealer, results), _take_packs(sealer))


def _store_in_own_packs(sealer: ChunkSealer, results: list[PieceResult]) -> list[PieceResult]:
    """Store the new chunks in the worker's packs; they go back as id and size only."""
    writer = sealer.writer
    if writer is None:
        return results
    stored: list[PieceResult] = []
    for result in results:
        if isinstance(result, OSError):
            stored.append(result)
            continue
        chunks = []
        for chunk in result:
            if chunk.sealed is not None:
                writer.add_sealed(BlobType.DATA, chunk)
                chunk = chunk._replace(sealed=None, sealed_length=len(chunk.sealed))
            chunks.append(chunk)
        stored.append(chunks)
    return stored


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
    key_doc: dict[str, object], config: Config, root: str, known_ids: bytes
) -> ChunkSealer:
    """A worker process's sealer, writing packs into the local repository at ``root``."""
    key = Key.from_json(key_doc)
    known: set[bytes] = set()
    sealer = ChunkSealer(key, known.__contains__, remember_sealed=True)
    sealer.known = known
    learn_known(sealer, known_ids)
    repo = Repository(LocalBackend(root), key, config, None)
    repo.assume_empty_index()
    sealer.writer = RepositoryWriter(repo, fresh_dedupe=True)
    return sealer
