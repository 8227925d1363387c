"""Writing files: the main thread creates each file's temporary copy and hands its runs
to the workers in batches; a worker reads, verifies and writes a run at its offset
(``restore_runs``); whoever finishes a file's last run puts it in place. Hard links are
made last, from the first file's copy."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from backvault.engine.parallel import Batcher
from backvault.engine.restorer.common import (
    _FULL_ERRNOS,
    EntryRefused,
    RestoreBase,
    _entry_path,
    _FileJob,
    _FolderJob,
    _listed,
)
from backvault.engine.restorer.selection import Run, iter_runs
from backvault.engine.target_folders import StagedFile, UnsafeTarget, open_staged
from backvault.repo.blobs import BlobEntry, BlobReader, GatheredWrites
from backvault.repo.errors import DamagedObject, RepositoryError
from backvault.repo.format import Node
from backvault.storage import FileType

_IN_FLIGHT_BYTES = 32 * 1024 * 1024

# Runs go to the workers in batches of about this many bytes (or _BATCH_RUNS runs): one
# task per small file would spend more time passing tasks between processes than working.
_BATCH_BYTES = 4 * 1024 * 1024

_BATCH_RUNS = 64

# What runs in flight cost beyond their bytes, charged against the in-flight budget: a
# batch at least _MIN_BATCH_CHARGE and a blob at least _ENTRY_CHARGE (its entry, in this
# process and on its way to a worker). Runs of tiny blobs (a file that names one 1-byte
# blob 400 000 times, a pack of thousands of 1-byte blobs) would otherwise all be in
# flight at once however little data they hold.
_MIN_BATCH_CHARGE = 256 * 1024
_ENTRY_CHARGE = 256

# Created once, by the main thread: never opened if it exists, never through a symlink.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# A run of blobs to restore (its pack and blobs' entries: ``selection.Run``), the file,
# and the offset in it.
_RunPayload = tuple[bytes, list[BlobEntry], StagedFile, int]


class FilesMixin(RestoreBase):
    _batcher: Batcher[_RunPayload, _FileJob, list[int | RepositoryError]] | None
    _hardlinks: dict[tuple[int, int], _FileJob]
    _deferred_links: list[tuple[_FileJob, Node, _FolderJob]]

    def _start_file(self, node: Node, folder: _FolderJob, path: str) -> bool:
        """Create the file's temporary copy in the staging folder (once: O_EXCL) and hand
        its runs to the workers."""
        link_key = (node.device_id, node.inode) if node.links > 1 and node.inode else None
        if link_key is not None and link_key in self._hardlinks:
            self._hold(folder)
            self._deferred_links.append((self._hardlinks[link_key], node, folder))
            return True
        # Runs are made from the index as they are sent (a big database's runs, made all
        # at once, held ~220 bytes a blob: 40 MB for 184 000 blobs), and checked as they
        # go: the index gives every blob's length, and a run that would end past the
        # file's size (an index that lies about a blob would have the workers write at
        # offsets up to 2^63) is never sent; the file is then damaged.
        runs = iter_runs(self.repo, node.content or [])
        try:
            first = next(runs, None)
        except DamagedObject as exc:
            self._add_damaged(path, str(exc))
            return False
        if first is None and node.size != 0:
            self._add_damaged(path, _wrong_size(0, node.size))
            return False
        staging = self._staging_for(folder)
        tmp = secrets.token_hex(8)
        fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=staging.fd)
        try:
            st = os.fstat(fd)
            staged = StagedFile(staging.shared, tmp, st.st_dev, st.st_ino)
            # One hold of its own until all its runs are sent: workers finishing the runs
            # sent so far do not finish the file.
            job = _FileJob(node, folder, staging, staged, 1, link_key is not None)
            self._hold(folder)
            if link_key is not None:
                self._hardlinks[link_key] = job
            if first is None:
                self._finish_file(job, fd)  # nothing to write: finished with this descriptor
                return True
        finally:
            os.close(fd)
        self._send_runs(job, first, runs)
        return True

    def _send_runs(self, job: _FileJob, first: Run, rest: Iterator[Run]) -> None:
        """Hand a file's runs to the workers, each at its offset, then release the file's
        own hold (finishing it if every run was written already). A blob missing from the
        index, or runs that hold more or fewer bytes than the file's size, stop the
        sending: the file is damaged (removed once the runs sent are done)."""
        assert self._batcher is not None
        size = job.node.size
        offset = 0
        error: str | None = None
        try:
            for pack_id, entries, plaintext, stored in itertools.chain((first,), rest):
                if offset + plaintext > size:
                    error = _wrong_size(offset + plaintext, size, more=True)
                    break
                with job.lock:
                    job.remaining += 1
                charge = stored + _ENTRY_CHARGE * len(entries)
                self._batcher.add((pack_id, entries, job.staged, offset), job, charge)
                offset += plaintext
            else:
                if offset != size:
                    error = _wrong_size(offset, size)
        except DamagedObject as exc:
            error = str(exc)
        with job.lock:
            if error is not None:
                job.error = job.error or error
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self._finish_file(job)

    def _batch_done(
        self,
        jobs: list[_FileJob],
        future: Future[list[int | RepositoryError]],
        release: Callable[[], None],
    ) -> None:
        """Runs were written (or failed): count them, and finish each file after its last."""
        try:
            if future.cancelled():
                return  # interrupted: the staging folders are removed with what is in them
            exc = future.exception()
            if exc is not None:
                self._set_fatal(exc)
                outcomes: list[int | RepositoryError] = [0] * len(jobs)
            else:
                outcomes = future.result()
            for job, outcome in zip(jobs, outcomes, strict=True):
                with job.lock:
                    if isinstance(outcome, RepositoryError):
                        job.error = job.error or str(outcome)
                    else:
                        job.written += outcome
                    job.remaining -= 1
                    last = job.remaining == 0
                if not isinstance(outcome, RepositoryError):
                    self.progress.advance(outcome)
                if last:
                    self._finish_file(job)
        except BaseException as exc:
            self._set_fatal(exc)
        finally:
            release()

    def _finish_file(self, job: _FileJob, fd: int | None = None) -> None:
        """Give the finished temporary copy its owner, mode and times (through a
        descriptor of the very inode this restore created) and put it in place; or
        remove it, if it is damaged."""
        if self._fatal is None and job.error is None and job.written != job.node.size:
            job.error = f"restored {job.written} bytes, expected {job.node.size}"
        staging = job.staging
        try:
            if job.error is not None or self._fatal is not None:
                # After a fatal error (a full disk) the restore stops: its unfinished
                # files are removed, not reported as damaged.
                with contextlib.suppress(OSError):
                    os.unlink(job.staged.name, dir_fd=staging.fd)
                if job.error is not None and self._fatal is None:
                    path = job.path
                    self._add_damaged(path, job.error)
                    self.progress.note(f"damaged: {_listed(path)}: {job.error}")
                return
            self._set_file_metadata(staging, job.staged, job.node, lambda: job.path, fd)
            placed = job.staged.name
            if job.anchor:
                placed = secrets.token_hex(8)
                os.link(job.staged.name, placed, src_dir_fd=staging.fd, dst_dir_fd=staging.fd)
            try:
                self._place(staging, placed, job.folder, job.node.name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(placed, dir_fd=staging.fd)
                raise
        except (UnsafeTarget, EntryRefused, OSError, OverflowError) as exc:
            self._entry_failed(lambda: job.path, exc)
            return
        finally:
            self._release(job.folder)
        with self._lock:
            self.result.files += 1
            self.result.bytes += job.written
        job.succeeded = True

    def _make_deferred_links(self) -> None:
        """Hard links to files restored earlier in this run: linked in the staging folder
        from the first file's own temporary copy (kept there for this), then renamed into
        place like any entry."""
        for first, node, folder in self._deferred_links:
            path = functools.partial(_entry_path, folder, node)
            try:
                if not first.succeeded:
                    self._add_damaged(
                        path, f"hard link to {_listed(first.path)}, which was not restored"
                    )
                    continue
                staging = first.staging
                tmp = secrets.token_hex(8)
                os.link(first.staged.name, tmp, src_dir_fd=staging.fd, dst_dir_fd=staging.fd)
                try:
                    # By name: the staging folder is private, and the inode may already
                    # have a mode this user cannot open it with.
                    identity = (first.staged.device, first.staged.inode)
                    self._set_staged_metadata(staging.fd, tmp, node, path, identity)
                    self._place(staging, tmp, folder, node.name)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=staging.fd)
                    raise
            except (UnsafeTarget, EntryRefused, OSError, OverflowError) as exc:
                self._entry_failed(path, exc)
                continue
            finally:
                self._release(folder)
            with self._lock:
                self.result.files += 1


class RunNotWritten(RepositoryError):
    pass


def restore_runs(reader: BlobReader, runs: list[_RunPayload]) -> list[int | RepositoryError]:
    """Runs in a worker: read, verify and write each run at its offset of its file (the
    temporary copy the main thread created, opened without creating or following anything
    and checked to be that inode). Gives each run's bytes written, or what stopped it; a
    full disk, or a staging folder that was moved or replaced, stops the whole batch.

    Runs of a file that follow one another are written together (a database restored
    after days of changes is tens of thousands of short runs, alternating between the
    first backup's packs and the later ones), and the packs read stay open for the
    batch: a write and an open per run cost more than reading it."""
    outcomes: list[int | RepositoryError] = []
    files: dict[StagedFile, int] = {}  # a file's runs often come one after another: open it once
    gathered = GatheredWrites()
    try:
        with reader.backend.range_reader(FileType.DATA) as packs:
            for pack_id, entries, staged, offset in runs:
                fd = files.get(staged)
                if fd is None or fd != gathered.fd or offset != gathered.end:
                    # What waits is another file's (or not followed by this run): its
                    # failure is its runs', not this one's.
                    _flush(outcomes, gathered)
                gathered.run = len(outcomes)
                outcomes.append(0)
                try:
                    if fd is None:
                        fd = files[staged] = open_staged(staged)
                    outcomes[-1] = reader.write_run(pack_id, entries, fd, offset, gathered, packs)
                except (UnsafeTarget, DamagedObject) as exc:
                    outcomes[-1] = exc
                except (OSError, OverflowError) as exc:
                    if gathered.writing:  # a gathered write failed
                        _write_failed(outcomes, gathered, exc)
                    else:  # opening the file, or reading: this run only
                        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
                            raise
                        why = exc.strerror if isinstance(exc, OSError) else None
                        outcomes[-1] = RunNotWritten(f"cannot be written: {why or exc}")
            _flush(outcomes, gathered)
    finally:
        for fd in files.values():
            os.close(fd)
    return outcomes


def _flush(outcomes: list[int | RepositoryError], gathered: GatheredWrites) -> None:
    """Write what waits; a failure is that of the runs whose bytes it held only."""
    gathered.run = None
    try:
        gathered.flush()
    except (OSError, OverflowError) as exc:
        _write_failed(outcomes, gathered, exc)


def _write_failed(
    outcomes: list[int | RepositoryError],
    gathered: GatheredWrites,
    exc: OSError | OverflowError,
) -> None:
    """A write failed: a full disk stops the batch; any other failure is the failure of
    the run being written and of every run whose bytes the write held."""
    gathered.writing = False
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        raise exc
    why = exc.strerror if isinstance(exc, OSError) else None
    _not_written(outcomes, gathered, f"cannot be written: {why or exc}")


def _not_written(outcomes: list[int | RepositoryError], gathered: GatheredWrites, why: str) -> None:
    """The runs whose bytes a failed write held, and the run being written, were not
    written (a run already found damaged keeps that reason)."""
    for run in {*gathered.runs, gathered.run}:
        if isinstance(run, int) and 0 <= run < len(outcomes) and isinstance(outcomes[run], int):
            outcomes[run] = RunNotWritten(why)
    gathered.runs.clear()


def _wrong_size(held: int, size: int, *, more: bool = False) -> str:
    at_least = "at least " if more else ""
    return f"its blobs hold {at_least}{held} bytes by the index, its entry says {size}"
