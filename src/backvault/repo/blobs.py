"""Turning stored bytes into verified plaintext, on every core.

``BlobReader`` reads blobs and whole packs and verifies them: decrypt (MAC first),
decompress, and check the SHA-256 the blob is named by. ``BlobPool`` runs that work in
worker processes when the repository is on a local disk, so decrypting, hashing and
writing use every core: threads would spend their time handing Python's GIL to each other
(every hash, decryption and write of a small blob releases and retakes it). For remote
storage the network dominates, and the pool uses threads in the one process.

A worker process gets the master key once, through the pipe that starts it, and keeps it
in memory only, as the parent does.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import zstandard

from ..crypto.aead import AuthenticationFailed, Key
from ..storage import Backend, FileType, ObjectNotFound, StorageError
from ..storage.local import LocalBackend
from . import format as fmt
from .errors import DamagedObject
from .format import PackedBlob

T = TypeVar("T")

# Below this much work, starting worker processes costs more than it saves.
PROCESS_THRESHOLD_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class BlobLocation:
    pack_id: bytes
    blob: PackedBlob


@dataclass
class PackReport:
    """What reading one whole pack found (``check --read-data``)."""

    bytes_read: int = 0
    blobs_ok: int = 0
    header: list[PackedBlob] | None = None
    errors: list[str] = field(default_factory=list)


def decode_pack_header_blob(
    key: Key, sealed: bytes, header_offset: int, label: str
) -> list[PackedBlob]:
    """Decrypt and parse a pack's header, which starts at ``header_offset`` in the pack."""
    try:
        blobs = fmt.decode_pack_header(key.open(sealed))
    except AuthenticationFailed as exc:
        raise DamagedObject(label, "its header does not decrypt") from exc
    except fmt.FormatError as exc:
        raise DamagedObject(label, str(exc)) from exc
    if blobs and blobs[-1].offset + blobs[-1].length > header_offset:
        raise DamagedObject(label, "its header describes more data than the pack holds")
    return blobs


class BlobReader:
    """Reads and verifies blobs of one repository; safe to share between threads."""

    def __init__(self, backend: Backend, key: Key) -> None:
        self.backend = backend
        self.key = key
        self._local = threading.local()

    def _zstd(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "zstd", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            self._local.zstd = decompressor
        return decompressor

    def open_blob(self, blob: PackedBlob, sealed: bytes | memoryview, label: str) -> bytes:
        """Decrypt, decompress and verify one blob's bytes as read from its pack."""
        try:
            plain = self.key.open(sealed)
        except AuthenticationFailed as exc:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} does not decrypt") from exc
        if blob.uncompressed_length is not None:
            try:
                plain = self._zstd().decompress(plain, max_output_size=blob.uncompressed_length)
            except zstandard.ZstdError as exc:
                raise DamagedObject(label, f"blob {blob.id.hex()[:12]}: {exc}") from exc
        if fmt.sha256(plain) != blob.id:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} has the wrong content")
        return plain

    def load_run(self, locations: list[BlobLocation]) -> list[bytes]:
        """Blobs stored one after another in one pack, read with a single request."""
        first, last = locations[0].blob, locations[-1].blob
        pack = locations[0].pack_id.hex()
        label = f"data/{pack}"
        length = last.offset + last.length - first.offset
        try:
            data = self.backend.load(FileType.DATA, pack, first.offset, length)
        except ObjectNotFound as exc:
            raise DamagedObject(label, "the pack is missing") from exc
        except StorageError as exc:
            raise DamagedObject(label, str(exc)) from exc
        if len(data) != length:
            raise DamagedObject(label, "the pack is truncated")
        view = memoryview(data)
        blobs = []
        for loc in locations:
            start = loc.blob.offset - first.offset
            blobs.append(self.open_blob(loc.blob, view[start : start + loc.blob.length], label))
        return blobs

    def read_pack(self, name: str) -> PackReport:
        """Read a whole pack and verify its name, its header and every blob in it."""
        label = f"data/{name}"
        report = PackReport()
        try:
            data = self.backend.load(FileType.DATA, name)
        except (ObjectNotFound, StorageError) as exc:
            report.errors.append(f"{label} cannot be read: {exc}")
            return report
        report.bytes_read = len(data)
        if fmt.sha256(data).hex() != name:
            report.errors.append(f"{label} is damaged: its content does not match its name")
            return report
        view = memoryview(data)
        try:
            if len(data) < 4:
                raise DamagedObject(label, "the pack is truncated")
            offset, length = fmt.pack_header_span(len(data), int.from_bytes(data[-4:], "little"))
            report.header = decode_pack_header_blob(
                self.key, bytes(view[offset : offset + length]), offset, label
            )
        except fmt.FormatError as exc:
            report.errors.append(str(DamagedObject(label, str(exc))))
            return report
        except DamagedObject as exc:
            report.errors.append(str(exc))
            return report
        for blob in report.header:
            try:
                self.open_blob(blob, view[blob.offset : blob.offset + blob.length], label)
                report.blobs_ok += 1
            except DamagedObject as exc:
                report.errors.append(str(exc))
        return report


def worker_processes(work_bytes: int, backend: Backend) -> int:
    """How many worker processes to use for this much work (0: threads in this process).

    ``BACKVAULT_WORKER_PROCESSES`` overrides: 0 never uses processes, N uses N for any
    amount of work."""
    setting = os.environ.get("BACKVAULT_WORKER_PROCESSES", "auto").strip().lower()
    if not isinstance(backend, LocalBackend):
        return 0
    if setting not in ("", "auto"):
        try:
            return max(0, int(setting))
        except ValueError:
            return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) < 2 or work_bytes < PROCESS_THRESHOLD_BYTES:
        return 0
    return cores or 2


# --- the worker side ----------------------------------------------------------------------

_worker_reader: BlobReader | None = None


def _start_worker(key_doc: dict[str, Any], root: str) -> None:
    # Ctrl-C reaches the whole process group: the parent decides what happens, so a worker
    # must not die half-way through a write on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_reader
    _worker_reader = BlobReader(LocalBackend(root), Key.from_json(key_doc))


def _in_worker(fn: Callable[..., T], *args: Any) -> T:
    assert _worker_reader is not None, "worker not started"
    return fn(_worker_reader, *args)


class BlobPool:
    """Runs ``fn(reader, *args)`` for BlobReader work, in worker processes (``processes``
    > 0, local repositories only) or in threads of this process."""

    def __init__(self, backend: Backend, key: Key, processes: int, threads: int) -> None:
        self.processes = processes if isinstance(backend, LocalBackend) else 0
        self._executor: Executor
        self._reader: BlobReader | None = None
        if self.processes:
            assert isinstance(backend, LocalBackend)
            # spawn, not fork: the parent has threads (progress bars, storage clients),
            # and a forked child could inherit a lock one of them held.
            self._executor = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(key.to_json(), str(backend.root)),
            )
            self.workers = self.processes
        else:
            self._reader = BlobReader(backend, key)
            self._executor = ThreadPoolExecutor(threads, thread_name_prefix="backvault-blobs")
            self.workers = threads

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """``fn`` must be a module-level function (worker processes import it by name)."""
        if self._reader is not None:
            return self._executor.submit(fn, self._reader, *args)
        return self._executor.submit(_in_worker, fn, *args)

    def shutdown(self, cancel: bool = False) -> None:
        self._executor.shutdown(wait=True, cancel_futures=cancel)
