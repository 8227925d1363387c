"""The backup's data path: file data to sealed chunks (on workers) to packs (on one
packer thread), and each file's blob ids back to the walk.

Pieces of files (whole small files, ranges of large ones and of databases) go to the
workers in batches (``engine.parallel.Batcher``); a worker seals them (``sealer``). The
packer thread takes the results in order of arrival, adds the sealed chunks to packs
(``RepositoryWriter``), indexes the packs worker processes wrote themselves, and
completes a file's future once all its pieces are in, so writing packs never holds up the
workers.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from typing import NamedTuple

from backvault.engine.parallel import Batcher, WorkerPool
from backvault.engine.sealer import (
    FILE,
    RANGES,
    ChunkSealer,
    Piece,
    StoredIds,
    TaskResult,
    cut_file,
    flush_packs,
    learn_known,
    seal_pieces,
    sealer_in_worker,
)
from backvault.repo.format import BlobType, ContentIds
from backvault.repo.repository import Repository
from backvault.repo.writer import RepositoryWriter

_MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024
# Files up to this size are cut and sealed whole by one worker; larger ones are cut first,
# then sealed in pieces by every worker. A worker reads a whole file into a buffer it
# keeps: 4 MiB, the size of the pieces, holds it at that (8 MiB kept 4 MiB more in each).
WHOLE_FILE_MAX = 4 * 1024 * 1024
# Pieces go to the workers in tasks of about this many bytes or _BATCH_PIECES pieces.
_PIECE_BYTES = 4 * 1024 * 1024
_BATCH_PIECES = 64
# Every task is charged at least this much against the in-flight budget.
_MIN_CHARGE = 256 * 1024


class _FileWork:
    """A file whose pieces are with the workers; ``future`` gives its blob ids.

    Its pieces are counted as they are queued (a database's are made as they go, not
    listed first: 190 000 ranges took 28 MiB): ``add_piece`` for each, ``queued`` once
    all are; ``piece_done`` as each comes back. The last of these completes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._remaining = 1  # the queuing itself, until ``queued``
        # The ids of the pieces done so far, in order, back to back (a database's are
        # ~6 MB: one buffer, not its pieces and a joined copy of them at the end); those
        # of pieces done before one ahead of them, by position, until it is.
        self._ids = io.BytesIO()
        self._next_position = 0
        self._ahead: dict[int, bytes] = {}
        self.error: OSError | None = None
        self.future: Future[ContentIds] = Future()

    def add_ids(self, position: int, ids: bytes) -> None:
        """The ids of the piece at ``position`` (then ``piece_done``)."""
        with self._lock:
            self._ahead[position] = ids
            while self._next_position in self._ahead:
                self._ids.write(self._ahead.pop(self._next_position))
                self._next_position += 1

    def add_piece(self) -> None:
        with self._lock:
            self._remaining += 1

    def queued(self) -> None:
        self._one_done()

    def piece_done(self) -> None:
        self._one_done()

    def fail(self, exc: BaseException) -> None:
        """Queuing its pieces failed: it fails, whatever comes back."""
        with self._lock:
            if not self.future.done():
                self.future.set_exception(exc)

    def _one_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining or self.future.done():  # (done: failed as a whole)
                return
            if self.error is not None:
                self.future.set_exception(self.error)
            elif self._ahead:  # (a piece's ids never came: not a result to store)
                self.future.set_exception(RuntimeError("a file's pieces came back incomplete"))
            else:
                # ``getvalue`` hands over the buffer itself (no copy) once it is its size.
                joined, self._ids = self._ids.getvalue(), io.BytesIO()
                self.future.set_result(ContentIds(joined))


def _pieces(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[list[tuple[int, int]], int]]:
    """Ranges in pieces of about _PIECE_BYTES (never empty), each with its size."""
    piece: list[tuple[int, int]] = []
    size = 0
    for offset, length in ranges:
        if piece and size + length > _PIECE_BYTES:
            yield piece, size
            piece, size = [], 0
        piece.append((offset, length))
        size += length
    if piece:
        yield piece, size


class _PieceTag(NamedTuple):
    work: _FileWork
    position: int  # the piece's place in its file
    size: int  # input bytes


class _Delivery(NamedTuple):
    pieces: list[_PieceTag]
    future: Future[TaskResult]
    release: Callable[[], None]  # gives the task's bytes back to the budget


class SealingPipeline:
    """Seals file data into the repository. ``start`` once the index is loaded; then
    ``store_file``/``store_ranges`` (and ``flush`` at the end of a folder); ``finish``
    (or ``abort`` after an error). ``on_read(n)`` hears of every n bytes read."""

    def __init__(self, repo: Repository, workers: int, on_read: Callable[[int], None]) -> None:
        self.repo = repo
        self._on_read = on_read
        # The writer, once there is one: worker processes started before it learn what
        # the repository holds through ``learn_known``.
        self._writer_box: list[RepositoryWriter] = []
        self.pool = self._worker_pool(workers)
        self._results: queue.SimpleQueue[_Delivery | None] = queue.SimpleQueue()
        self._packer_error: BaseException | None = None
        self._packer = threading.Thread(target=self._pack_results, name="backvault-packer")
        self._batcher: Batcher[Piece, _PieceTag, TaskResult] = Batcher(
            self.pool,
            seal_pieces,
            self._deliver,
            budget_bytes=_MAX_IN_FLIGHT_BYTES,
            batch_bytes=_PIECE_BYTES,
            batch_items=_BATCH_PIECES,
            min_charge=_MIN_CHARGE,
        )

    @property
    def writer(self) -> RepositoryWriter:
        return self._writer_box[0]

    def _worker_pool(self, workers: int) -> WorkerPool:
        """Threads seal chunks for the writer in this process; past a few MiB of work,
        worker processes take over (for a backend with direct file I/O), writing packs of
        their own through the same backend stack, reopened from its spec."""
        key, backend, config, box = (
            self.repo.key,
            self.repo.backend,
            self.repo.config,
            self._writer_box,
        )
        if not backend.capabilities.direct_file_io:
            return WorkerPool(None, workers)
        return WorkerPool(
            None,
            workers,
            make_context=sealer_in_worker,
            process_args=lambda: (
                key.to_json(),
                config,
                backend.spec(),
                box[0].known_ids() if box else b"",
            ),
        )

    def expect(self, work_bytes: int) -> None:
        """Work of this size is coming: start the worker processes early if it is big."""
        self.pool.expect(work_bytes)

    def reads_in_processes(self, work_bytes: int) -> bool:
        """Whether a file of this size would be read by worker processes (not threads of
        this process)."""
        return self.pool.would_use_processes(work_bytes)

    def start(self) -> None:
        """The index is loaded: make the writer and start the packer."""
        writer = RepositoryWriter(self.repo)
        self._writer_box.append(writer)
        self.pool.set_local_context(ChunkSealer(self.repo.key, writer.knows))
        if self.pool.uses_processes:
            self.pool.on_each_process(learn_known, writer.known_ids())
        self._packer.start()

    def finish(self) -> None:
        """Every file is stored: take the packs the worker processes still hold, stop the
        workers and the packer, write the open packs and the index."""
        for packs in self.pool.on_each_process(flush_packs):
            for pack_id, blobs in packs:
                self.writer.adopt_pack(pack_id, blobs)
        self.pool.shutdown()
        self._stop_packer()
        self.writer.flush()

    def cancel_workers(self) -> None:
        self.pool.shutdown(cancel=True)

    def abort(self) -> None:
        """After an error: stop, and index what was uploaded, so the next run reuses it."""
        self.pool.shutdown(cancel=True)
        if self._packer.is_alive():
            self._stop_packer()
        if self._writer_box:
            with contextlib.suppress(Exception):
                self.writer.flush()

    # --- handing file data to the workers --------------------------------------------

    def store_file(self, path: str, size: int) -> Future[ContentIds]:
        """Queue a file for the workers; its future gives the blob ids of its content."""
        if size <= WHOLE_FILE_MAX:
            work = _FileWork()
            self._add_piece(work, 0, Piece(FILE, path), size)
            work.queued()
            return work.future
        # A large file is cut first (one task), then sealed in pieces by every worker.
        cuts = self.pool.submit(cut_file, path).result()
        return self.store_ranges(path, cuts, compress=None)

    def store_ranges(
        self,
        path: str,
        ranges: Iterable[tuple[int, int]],
        compress: bool | None,
        database: bool = False,
        identity: tuple[int, int] | None = None,
    ) -> Future[ContentIds]:
        """Queue given byte ranges of a file, cut into pieces of about _PIECE_BYTES
        (``database``: SQLite pages; ``identity``: the (device, inode) the file must
        have, see ``Piece``)."""
        work = _FileWork()
        try:
            for index, (piece_ranges, size) in enumerate(_pieces(ranges)):
                piece = Piece(RANGES, path, piece_ranges, compress, database, identity)
                self._add_piece(work, index, piece, size)
        except BaseException as exc:
            work.fail(exc)  # its pieces queued so far must not make a whole file
            raise
        finally:
            work.queued()
        return work.future

    def _add_piece(self, work: _FileWork, index: int, piece: Piece, size: int) -> None:
        self._raise_packer_error()
        work.add_piece()
        try:
            self._batcher.add(piece, _PieceTag(work, index, size), size)
        except BaseException:
            work.piece_done()  # never handed out: not waited for
            raise

    def flush(self) -> None:
        """Hand the queued pieces to a worker now (a folder's files are all queued)."""
        self._batcher.submit()

    def _deliver(
        self, pieces: list[_PieceTag], future: Future[TaskResult], release: Callable[[], None]
    ) -> None:
        # Runs on the pool's thread: pass the results on, so that writing packs never
        # holds up the workers.
        self._results.put(_Delivery(pieces, future, release))

    # --- the packer thread -----------------------------------------------------------

    def _pack_results(self) -> None:
        """Add the workers' sealed chunks to packs, in order of arrival, and complete
        each file once all its pieces are in."""
        while True:
            delivery = self._results.get()
            if delivery is None:
                return
            failed: BaseException | None = None
            try:
                if delivery.future.cancelled():
                    failed = CancelledError()
                elif self._packer_error is None:
                    self._add_results(delivery)
            except BaseException as exc:
                self._packer_error = exc
            finally:
                delivery.release()
            failed = self._packer_error or failed
            if failed is not None:  # nobody must wait for these files for ever
                for tag in delivery.pieces:
                    tag.work.fail(failed)

    def _add_results(self, delivery: _Delivery) -> None:
        exc = delivery.future.exception()
        if exc is not None:
            raise exc
        outcome = delivery.future.result()
        writer = self.writer
        for pack_id, blobs in outcome.packs:
            writer.adopt_pack(pack_id, blobs)
        for (work, index, size), result in zip(delivery.pieces, outcome.pieces, strict=True):
            if isinstance(result, OSError):
                work.error = work.error or result
            elif work.error is not None:
                pass
            elif isinstance(result, StoredIds):  # from a worker process
                ids = result.blob_ids()
                writer.expect([i for i, stored in zip(ids, result.stored, strict=True) if stored])
                for blob_id, stored in zip(ids, result.stored, strict=True):
                    if not stored and not writer.knows(blob_id):
                        raise RuntimeError(f"blob {blob_id.hex()[:12]} is not stored")
                work.add_ids(index, result.ids)
            else:  # from a thread of this process: sealed here, stored by this writer
                for chunk in result:
                    if chunk.sealed is not None:
                        writer.add_sealed(BlobType.DATA, chunk)
                    elif not writer.knows(chunk.id):
                        raise RuntimeError(f"blob {chunk.id.hex()[:12]} is not stored")
                work.add_ids(index, b"".join([chunk.id for chunk in result]))
            self._on_read(size)
            work.piece_done()

    def _stop_packer(self) -> None:
        self._results.put(None)
        self._packer.join()
        self._raise_packer_error()

    def _raise_packer_error(self) -> None:
        if self._packer_error is not None:
            raise self._packer_error
