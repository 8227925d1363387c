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
from collections.abc import Callable, Collection, Iterable
from typing import NamedTuple

import zstandard

from backvault.crypto.aead import Key
from backvault.repo import format as fmt
from backvault.repo.chunker import ContentChunker, chunker_seed
from backvault.repo.compression import ThreadCompressors
from backvault.repo.format import ID_SIZE, BlobType, Config, PackedBlob
from backvault.repo.index import EMPTY_STARTS, group_ids, grouped_has
from backvault.repo.repository import Repository
from backvault.repo.writer import RepositoryWriter, SealedChunk, seal_blob
from backvault.storage import BackendSpec, open_backend_from_spec
from backvault.storage.local import read_into

FILE = "file"
RANGES = "ranges"
_SAMPLE = 16 * 1024
# A worker fills one pack while the one before is written in the background: 4 MiB each
# (restic 0.14's size) keeps that at the memory one 8 MiB pack took.
WORKER_PACK_TARGET = 4 * 1024 * 1024


# SQLite pages are compressed at zstd level 1, other data at 3. A database is most of a
# heavy user's data, in 8 KiB chunks where zstd is slow (250 MB/s per core at level 3 on
# the benchmark's pages, 309 MB/s at 1) and gains little from the higher level (pages
# compressed to 46.8 % at 3, 48.2 % at 1).
DATABASE_COMPRESSION_LEVEL = 1


class Piece(NamedTuple):
    kind: str  # FILE or RANGES
    path: str
    ranges: list[tuple[int, int]] | None = None  # (offset, length), for RANGES
    compress: bool | None = None  # None: judge on the first chunk of the piece
    database: bool = False  # SQLite pages (compressed at DATABASE_COMPRESSION_LEVEL)
    # (device, inode) the file must have: a database read in place, which the app may
    # replace by a rename while it is held (the path would then name a file not held).
    identity: tuple[int, int] | None = None


class PackSaveFailed(RuntimeError):
    """A worker process could not save one of its packs (not an ``OSError``: a piece's
    ``OSError`` means its file could not be read, and is reported against that file)."""


class StoredIds(NamedTuple):
    """A piece's chunks as a worker process reports them (a list of ``SealedChunk`` per
    chunk cost more to send than to make): their ids back to back, and for each one byte,
    1 if this worker stored it (in a pack it reports with this task or a later one), 0 if
    it was stored already."""

    ids: bytes
    stored: bytes

    def blob_ids(self) -> list[bytes]:
        return [self.ids[i : i + 32] for i in range(0, len(self.ids), 32)]


PieceResult = list[SealedChunk] | StoredIds | OSError


class TaskResult(NamedTuple):
    """A task's results, and the packs a worker process wrote while doing it."""

    pieces: list[PieceResult]
    packs: list[tuple[bytes, Collection[PackedBlob]]]


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
        self._zstd_pages = ThreadCompressors(min(compression_level, DATABASE_COMPRESSION_LEVEL))
        self._local = threading.local()
        # A worker process stores the blobs it seals in packs of its own, written to the
        # repository directly (sealed data never travels back to the parent).
        self.writer: RepositoryWriter | None = None
        self.known: KnownIds | None = None  # what ``is_known`` answers from, in a worker

    def _chunker(self) -> ContentChunker:
        chunker = getattr(self._local, "chunker", None)
        if chunker is None:
            chunker = ContentChunker(self._seed)
            self._local.chunker = chunker
        return chunker

    def seal(self, data: bytes | memoryview, compress: bool, database: bool = False) -> SealedChunk:
        blob_id = fmt.sha256(data)
        writer = self.writer
        if self._is_known(blob_id) or (writer is not None and writer.knows(blob_id)):
            return SealedChunk(blob_id, len(data), None, None)
        compressor = None
        if compress:
            compressor = (self._zstd_pages if database else self._zstd).compressor()
        sealed, uncompressed_length = seal_blob(self.key, compressor, data)
        chunk = SealedChunk(blob_id, len(data), sealed, uncompressed_length)
        if writer is None:
            return chunk
        try:
            writer.add_sealed(BlobType.DATA, chunk)  # into this worker's own pack
        except OSError as exc:
            # A pack that could not be saved (the one before, saved in the background, or
            # this one): not an error of the file being read now (an OSError of a piece
            # says that file was unreadable), and the backup cannot go on without it.
            raise PackSaveFailed(f"a pack could not be saved: {exc}") from exc
        return chunk._replace(sealed=None, sealed_length=len(sealed))

    def _seal_all(
        self, chunks: Iterable[bytes | memoryview], compress: bool | None, database: bool = False
    ) -> list[SealedChunk]:
        sealed = []
        for chunk in chunks:
            if compress is None:
                compress = compresses(chunk)
            sealed.append(self.seal(chunk, compress, database))
        return sealed

    def store(self, piece: Piece) -> list[SealedChunk]:
        if piece.kind == FILE:  # a file small enough to hold in memory whole
            fd = os.open(piece.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = _read_whole(fd)
            finally:
                os.close(fd)
            return self._seal_all(self._chunker().cut(data), piece.compress)
        assert piece.ranges is not None
        fd = os.open(piece.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if piece.identity is not None:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != piece.identity:
                    raise OSError(
                        errno.EIO, "it was replaced while being read; back up again", piece.path
                    )
            return self._seal_all(
                _read_ranges(fd, piece.path, piece.ranges), piece.compress, piece.database
            )
        finally:
            os.close(fd)


_reading = threading.local()
# The largest reading buffer a thread keeps: pieces' spans (about 4 MiB, a chunk more at
# most) and whole small files fit.
_KEPT_BUFFER_MAX = 16 * 1024 * 1024


def _read_buffer(size: int) -> memoryview:
    """This thread's buffer for reading pieces, as a view of ``size`` bytes: reused from
    piece to piece (a new 4 MiB object per piece left the heap fragmented: a worker held
    14 MiB more). Valid until the thread's next piece: its chunks are sealed, and no view
    of them kept, before that."""
    buffer: bytearray | None = getattr(_reading, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)  # a new one, not resized: views of the old may be alive
        if size <= _KEPT_BUFFER_MAX:
            _reading.buffer = buffer
        # (else used once: a file the walk saw small may have grown to any size since)
    return memoryview(buffer)[:size]


def _read_whole(fd: int) -> memoryview:
    """A whole (small) file, into this thread's reading buffer (see ``_read_buffer``)."""
    size = os.fstat(fd).st_size
    view = _read_buffer(size + 1)  # one byte more: a file that grew is read to its end
    got = read_into(fd, view, 0)
    if got > size:  # it grew while being read: as it is now, whatever its size
        chunks = [bytes(view[:got])]
        while chunk := os.pread(fd, 1024 * 1024, sum(len(c) for c in chunks)):
            chunks.append(chunk)
        return memoryview(b"".join(chunks))
    return view[:got]


def _read_ranges(fd: int, path: str, ranges: list[tuple[int, int]]) -> Iterable[bytes | memoryview]:
    """The ranges' bytes. Ranges that follow each other (a database's pages, a large
    file's chunks) are read with one call and handed out as views: a call per 8 KiB page
    showed in profiles."""
    start = 0
    while start < len(ranges):
        end, offset = start + 1, ranges[start][0]
        span = ranges[start][1]
        while end < len(ranges) and ranges[end][0] == offset + span:
            span += ranges[end][1]
            end += 1
        view = _read_buffer(span)
        if read_into(fd, view, offset) != span:
            raise OSError(errno.EIO, "it shrank while it was being read; back up again", path)
        position = 0
        for _, length in ranges[start:end]:
            yield view[position : position + length]
            position += length
        start = end


def seal_pieces(sealer: ChunkSealer, pieces: list[Piece]) -> TaskResult:
    """Runs in a worker: each piece's sealed chunks, or the error that stopped it."""
    results: list[PieceResult] = []
    for piece in pieces:
        try:
            chunks = sealer.store(piece)
        except OSError as exc:
            results.append(exc)
            continue
        if sealer.writer is None:  # threads: the sealed chunks go to the parent's writer
            results.append(chunks)
        else:
            results.append(
                StoredIds(
                    b"".join(chunk.id for chunk in chunks),
                    bytes(1 if chunk.sealed_length else 0 for chunk in chunks),
                )
            )
    _fold_written_ids(sealer)
    return TaskResult(results, _take_packs(sealer))


# A worker's own writer remembers the blobs it wrote in a ``set`` (about 100 bytes each);
# past this many they move to the worker's ``KnownIds`` (about 40).
_FOLD_WRITTEN_AT = 16_384


def _fold_written_ids(sealer: ChunkSealer) -> None:
    writer, known = sealer.writer, sealer.known
    if writer is not None and known is not None and writer.written_count() >= _FOLD_WRITTEN_AT:
        known.update(b"".join(writer.take_written_ids()))


def _take_packs(sealer: ChunkSealer) -> list[tuple[bytes, Collection[PackedBlob]]]:
    if sealer.writer is None:
        return []
    return sealer.writer.take_written_packs()


def flush_packs(sealer: ChunkSealer) -> list[tuple[bytes, Collection[PackedBlob]]]:
    """Runs in each worker at the end: write the open pack; every pack not yet reported."""
    if sealer.writer is not None:
        sealer.writer.flush(write_index=False)
    return _take_packs(sealer)


def cut_file(sealer: ChunkSealer, path: str) -> list[tuple[int, int]]:
    """Runs in a worker: the (offset, length) of a large file's chunks, so its sealing can
    be shared out in pieces."""
    return sealer._chunker().boundaries(path)


class KnownIds:
    """A set of blob ids in 32 bytes per id (a ``set`` of ``bytes`` takes about 100, in
    every worker process, for every blob of the repository), grouped by their first two
    bytes as the index groups them (``repo.index.group_ids``): a lookup searches one
    bucket with ``bytes.find``. Made without an object per id (a sorted set of them took
    ~70 MiB for a moment in each worker of a 400 000-blob repository)."""

    def __init__(self) -> None:
        self._ids = b""
        self._starts = EMPTY_STARTS

    def update(self, packed_ids: bytes) -> None:
        """Add ids given back to back, 32 bytes each."""
        if len(packed_ids) % ID_SIZE:
            raise ValueError("known ids are not a whole number of 32-byte ids")
        if packed_ids:
            self._ids, _, self._starts = group_ids(self._ids, packed_ids)

    def __contains__(self, blob_id: object) -> bool:
        return isinstance(blob_id, bytes) and grouped_has(self._ids, self._starts, blob_id)


def learn_known(sealer: ChunkSealer, known_ids: bytes) -> None:
    """Runs in a worker: these blobs (32-byte ids, back to back) are stored already."""
    if sealer.known is not None and known_ids:
        sealer.known.update(known_ids)


def sealer_in_worker(
    key_doc: dict[str, object], config: Config, backend_spec: BackendSpec, known_ids: bytes
) -> ChunkSealer:
    """A worker process's sealer, writing packs through the parent's backend stack,
    reopened from its spec."""
    key = Key.from_json(key_doc)
    known = KnownIds()
    sealer = ChunkSealer(key, known.__contains__)
    sealer.known = known
    learn_known(sealer, known_ids)
    repo = Repository(open_backend_from_spec(backend_spec), key, config, None)
    repo.assume_empty_index()
    sealer.writer = RepositoryWriter(
        repo, pack_target=WORKER_PACK_TARGET, fresh_dedupe=True, background_saves=True
    )
    return sealer
