"""Turning stored bytes into verified plaintext.

``BlobReader`` reads blobs and whole packs and verifies them: decrypt (MAC first),
decompress, and check the SHA-256 the blob is named by. ``backvault.engine.parallel.reader_pool``
runs that work on every core.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import zstandard

from backvault.crypto.aead import OVERHEAD, AuthenticationFailed, Key
from backvault.repo import format as fmt
from backvault.repo.compression import ThreadCompressors
from backvault.repo.errors import DamagedObject
from backvault.repo.format import BlobType, PackedBlob
from backvault.storage import Backend, FileType, ObjectNotFound, RangeReader, StorageError

# A blob as it travels between processes: its id, offset and length in its pack, and its
# uncompressed length (None if it is stored uncompressed). A plain tuple: pickling a
# dataclass per blob cost more than verifying an 8 KiB blob (~5 us a blob, 180,000 blobs
# for a 1.45 GB database).
BlobEntry = tuple[bytes, int, int, int | None]

# The plaintexts of a restore run are written with one pwritev per this many bytes (or
# _WRITE_PIECES blobs), not one pwrite per blob: a write per 8 KiB SQLite chunk was over
# a quarter of the workers' profile samples in a restore of a 1.45 GB database, a gathered
# write per 256 KiB under a tenth. Small, so a worker holds little more memory.
_WRITE_BYTES = 256 * 1024
_WRITE_PIECES = 512  # below IOV_MAX (1024 on Linux)

_DATA_LIMIT = fmt.MAX_BLOB_PLAINTEXT[BlobType.DATA.value]

# check --read-data decrypts blobs up to this size into a reused buffer (see read_pack).
_CHECK_BUFFER_BYTES = 256 * 1024
# A thread reading whole packs keeps a buffer for them up to this size (restic 0.14
# closes a pack once it passes 16 MiB; ours are 4-8 MiB); a bigger pack is read into an
# object of its own.
_KEPT_PACK_BUFFER_BYTES = 32 * 1024 * 1024
# A large blob stored uncompressed is checked a slice of this size at a time.
_SLICE_BYTES = 256 * 1024 + 16
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: bytes
    blob: PackedBlob


@dataclass
class PackReport:
    """What reading one whole pack found (``check --read-data``)."""

    bytes_read: int = 0
    blobs_ok: int = 0
    # The pack header's blobs as (id, offset, length, uncompressed length), compact for
    # the way back to the main process.
    header: list[BlobEntry] | None = None
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
        self._direct_file_io = backend.capabilities.direct_file_io
        self._local = threading.local()
        self._zstd = ThreadCompressors()

    def open_blob(self, blob: PackedBlob, sealed: bytes | memoryview, label: str) -> bytes:
        """Decrypt, decompress and verify one blob's bytes as read from its pack."""
        try:
            plain = self.key.open(sealed)
        except AuthenticationFailed as exc:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} does not decrypt") from exc
        if blob.uncompressed_length is not None:
            check_blob_size(blob, label)
        verified = self._verify(blob.id, blob.uncompressed_length, plain, label)
        assert isinstance(verified, bytes)
        return verified

    def _buffer(self, name: str, size: int) -> bytearray:
        """This thread's reusable buffer ``name``, at least ``size`` bytes. A buffer too
        small is replaced, not resized: views of the old one may still be alive."""
        buffer: bytearray | None = getattr(self._local, name, None)
        if buffer is None or len(buffer) < size:
            buffer = bytearray(max(size, 2 * len(buffer or b"")))
            setattr(self._local, name, buffer)
        return buffer

    def write_run(
        self,
        pack_id: bytes,
        blobs: Sequence[BlobEntry],
        fd: int,
        file_offset: int,
        gathered: GatheredWrites | None = None,
        packs: RangeReader | None = None,
    ) -> int:
        """Read a run of data blobs of one pack, verify each and write their plaintexts,
        one after another, to ``fd`` from ``file_offset`` on; the bytes of the run. The
        restore's hot path: one read buffer and one plaintext buffer per thread are
        reused, and verified plaintexts are gathered and written together (``pwritev``).
        An uncompressed blob is decrypted into its own region of the plaintext buffer,
        where it stays until written; a compressed one is decrypted into the free region
        and decompressed into a new object. Nothing is written before it is verified.

        With ``gathered``, plaintexts are gathered across runs that follow one another in
        a file: a run's may still wait there when it returns (``gathered.flush`` writes
        them; a write that fails names the runs it held, by ``gathered.run``). ``packs``
        reads the pack (a reader that may keep packs open between runs)."""
        pack = pack_id.hex()
        label = f"data/{pack}"
        base = blobs[0][1]
        length = blobs[-1][1] + blobs[-1][2] - base
        out = GatheredWrites() if gathered is None else gathered
        if out.fd != fd or out.end != file_offset:
            out.flush()
            out.fd, out.end = fd, file_offset
        view = self._read_range(pack, base, length, label, packs)
        buffer = self._buffer("plain", max(_WRITE_BYTES, max(entry[2] for entry in blobs)))
        if out.buffer is not buffer:
            out.buffer, out.used = buffer, 0  # views of the old one keep it alive
        room = memoryview(buffer)
        capacity = len(buffer)
        open_into = self.key.open_into
        verify = self._verify
        run = out.run
        queued = 0
        for blob_id, offset, sealed_length, uncompressed in blobs:
            if (
                out.used + sealed_length > capacity
                or out.pending >= _WRITE_BYTES
                or len(out.pieces) >= _WRITE_PIECES
            ):
                out.flush()
            if sealed_length > _DATA_LIMIT + OVERHEAD or (
                uncompressed is not None and uncompressed > _DATA_LIMIT
            ):
                blob = PackedBlob(blob_id, BlobType.DATA, offset, sealed_length, uncompressed)
                check_blob_size(blob, label)
            start = offset - base
            try:
                plain: bytes | memoryview = open_into(
                    view[start : start + sealed_length], room[out.used :]
                )
            except AuthenticationFailed as exc:
                raise DamagedObject(label, f"blob {blob_id.hex()[:12]} does not decrypt") from exc
            if uncompressed is None:
                out.used += len(plain)  # the plaintext stays in the buffer until written
            plain = verify(blob_id, uncompressed, plain, label)
            out.pieces.append(plain)
            out.pending += len(plain)
            out.end += len(plain)
            if not out.runs or out.runs[-1] != run:
                out.runs.append(run)
            queued += len(plain)
        if gathered is None:
            out.flush()
        return queued

    def _verify(
        self, blob_id: bytes, expected: int | None, plain: bytes | memoryview, label: str
    ) -> bytes | memoryview:
        """Decompress (if the blob is compressed: ``expected``, its uncompressed length by
        the index or pack header, is not None) into at most that length, and check the
        blob's SHA-256. The caller has checked the lengths against the blob size limit."""
        if expected is not None:
            try:
                # A frame that records its size is decompressed into a buffer of that size
                # whatever max_output_size says: a few KiB could claim gigabytes.
                claimed = zstandard.frame_content_size(plain)
                if claimed not in (-1, expected):
                    raise DamagedObject(
                        label,
                        f"blob {blob_id.hex()[:12]}: its compressed data holds {claimed} "
                        f"bytes, the index says {expected}",
                    )
                plain = self._zstd.decompressor().decompress(plain, max_output_size=expected)
            except zstandard.ZstdError as exc:
                raise DamagedObject(label, f"blob {blob_id.hex()[:12]}: {exc}") from exc
            if len(plain) != expected:
                raise DamagedObject(
                    label,
                    f"blob {blob_id.hex()[:12]}: it decompresses to {len(plain)} bytes, the "
                    f"index says {expected}",
                )
        if fmt.sha256(plain) != blob_id:
            raise DamagedObject(label, f"blob {blob_id.hex()[:12]} has the wrong content")
        return plain

    def _read_range(
        self, pack: str, offset: int, length: int, label: str, packs: RangeReader | None = None
    ) -> memoryview:
        """``length`` bytes of a pack from ``offset`` (through ``packs`` if given). From a
        backend with direct file I/O they are read into this thread's reusable buffer:
        valid until its next use."""
        try:
            if self._direct_file_io:
                view = memoryview(self._buffer("read", length))[:length]
                if packs is not None:
                    got = packs.read_into(pack, offset, view)
                else:
                    got = self.backend.load_into(FileType.DATA, pack, offset, view)
            else:
                view = memoryview(self.backend.load(FileType.DATA, pack, offset, length))
                got = len(view)
        except ObjectNotFound as exc:
            raise DamagedObject(label, "the pack is missing") from exc
        except StorageError as exc:
            raise DamagedObject(label, str(exc)) from exc
        if got != length:
            raise DamagedObject(label, "the pack is truncated")
        return view

    def read_pack(self, name: str) -> PackReport:
        """Read a whole pack and verify its name, its header and every blob in it."""
        label = f"data/{name}"
        report = PackReport()
        try:
            data = self._whole_pack(name)
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
            header = decode_pack_header_blob(
                self.key, bytes(view[offset : offset + length]), offset, label
            )
        except fmt.FormatError as exc:
            report.errors.append(str(DamagedObject(label, str(exc))))
            return report
        except DamagedObject as exc:
            report.errors.append(str(exc))
            return report
        # A small blob is decrypted into this thread's reusable buffer; a large one (a
        # media chunk, whose size dwarfs the cost of a new object) into its own object,
        # freed at once: a buffer of the largest blob kept by every thread and worker
        # raised the peak memory of a check by 30 MiB.
        small = [blob.length for blob in header if blob.length <= _CHECK_BUFFER_BYTES]
        out = self._buffer("check", max(small, default=0))
        for blob in header:
            sealed = view[blob.offset : blob.offset + blob.length]
            try:
                if blob.length <= _CHECK_BUFFER_BYTES:
                    self._check_blob(blob, sealed, label, out)
                elif blob.uncompressed_length is None:
                    self._check_stored_blob(blob, sealed, label)
                else:
                    self.open_blob(blob, sealed, label)
                report.blobs_ok += 1
            except DamagedObject as exc:
                report.errors.append(str(exc))
        report.header = [(b.id, b.offset, b.length, b.uncompressed_length) for b in header]
        return report

    def _whole_pack(self, name: str) -> bytes | memoryview:
        """A whole pack's bytes: from a backend with direct file I/O, read into this
        thread's kept buffer (valid until its next pack). A new object for every pack
        (4-8 MiB, mapped afresh by the C library and unmapped when freed) cost a page fault
        per 4 KiB read: ~400 000 in a check of 1.6 GB, which restic's makes ~20 000 of."""
        if not self._direct_file_io:
            return self.backend.load(FileType.DATA, name)
        size = self.backend.stat(FileType.DATA, name)
        if size > _KEPT_PACK_BUFFER_BYTES:  # read once into its own object, freed after
            return self.backend.load(FileType.DATA, name)
        buffer: bytearray | None = getattr(self._local, "pack", None)
        if buffer is None or len(buffer) <= size:
            # Replaced, not resized (views of the old one may be alive), by one of the
            # size asked for, rounded up to a MiB: packs of one repository are about one size.
            buffer = bytearray(-(-(size + 1) // _MIB) * _MIB)
            self._local.pack = buffer
        # A byte more than its size: a pack that grew since (whose bytes must not pass
        # for the pack) is read again whole; one cut since is what it holds now.
        view = memoryview(buffer)[: size + 1]
        got = self.backend.load_into(FileType.DATA, name, 0, view)
        if got > size:
            return self.backend.load(FileType.DATA, name)
        return view[:got]

    def _check_stored_blob(self, blob: PackedBlob, sealed: memoryview, label: str) -> None:
        """``open_blob`` for a large blob stored uncompressed (a media chunk), whose
        plaintext is not kept: decrypted and hashed a slice at a time into this thread's
        small buffer. (Its plaintext as an object of its own, ~1 MiB, was mapped afresh
        and faulted in page by page for every chunk.)"""
        digest = hashlib.sha256()
        try:
            for plain in self.key.open_in_slices(sealed, self._buffer("slices", _SLICE_BYTES)):
                digest.update(plain)
        except AuthenticationFailed as exc:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} does not decrypt") from exc
        if digest.digest() != blob.id:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} has the wrong content")

    def _check_blob(self, blob: PackedBlob, sealed: memoryview, label: str, out: bytearray) -> None:
        """``open_blob`` for a blob whose plaintext is not kept: decrypted into ``out``."""
        try:
            plain = self.key.open_into(sealed, out)
        except AuthenticationFailed as exc:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} does not decrypt") from exc
        if blob.uncompressed_length is not None:
            check_blob_size(blob, label)
        self._verify(blob.id, blob.uncompressed_length, plain, label)


def blob_lengths_fit(kind: BlobType, length: int, uncompressed: int | None) -> bool:
    """Whether a blob of ``kind`` with these lengths (as the index or a pack header gives
    them) passes ``check_blob_size``: the bounds, without an object per blob."""
    limit = fmt.MAX_BLOB_PLAINTEXT[kind.value]
    plaintext = length - OVERHEAD if uncompressed is None else uncompressed
    return OVERHEAD <= length <= limit + OVERHEAD and plaintext <= limit


def check_blob_size(blob: PackedBlob, label: str) -> None:
    """Refuse a blob whose lengths (as the index or a pack header gives them) are more
    than a blob of its type may hold, before anything is read or decompressed; or less
    than sealing adds (its plaintext would count negative bytes: a restore adding up a
    file's blobs could then be made to write past the file's size)."""
    if blob_lengths_fit(blob.type, blob.length, blob.uncompressed_length):
        return
    if blob.length < OVERHEAD:
        raise DamagedObject(
            label,
            f"blob {blob.id.hex()[:12]} claims {blob.length} bytes, fewer than a sealed blob "
            f"has ({OVERHEAD})",
        )
    limit = fmt.MAX_BLOB_PLAINTEXT[blob.type.value]
    if blob.plaintext_length > limit or blob.length > limit + OVERHEAD:
        raise DamagedObject(
            label,
            f"blob {blob.id.hex()[:12]} claims {max(blob.plaintext_length, blob.length)} bytes, "
            f"more than a {blob.type.value} blob may hold ({limit})",
        )


class GatheredWrites:
    """Verified plaintexts of a restore waiting to be written together: the next bytes of
    the file ``fd`` from ``end - pending`` on (``BlobReader.write_run``). ``run`` is set
    by the caller to a tag of the run being written; ``runs`` are the tags of the runs
    with bytes waiting, which a write that fails did not write. One at a time per thread
    (its plaintexts may wait in the thread's plaintext buffer)."""

    __slots__ = ("buffer", "end", "fd", "pending", "pieces", "run", "runs", "used", "writing")

    def __init__(self) -> None:
        self.fd = -1
        self.end = 0
        self.pieces: list[bytes | memoryview] = []
        self.pending = 0
        self.buffer: bytearray | None = None
        self.used = 0  # bytes of ``buffer`` that waiting plaintexts hold
        self.run: object = None
        self.runs: list[object] = []
        self.writing = False  # a write is under way (set still if it raised)

    def flush(self) -> None:
        """Write what waits (OSError if that fails: ``runs`` then still names whose bytes
        were not written, and nothing waits any more)."""
        pieces = self.pieces
        if pieces:
            offset = self.end - self.pending
            self.pieces, self.pending, self.used = [], 0, 0
            self.writing = True
            _pwritev_all(self.fd, pieces, offset)
            self.writing = False
        self.runs.clear()


def _pwritev_all(fd: int, pieces: list[bytes | memoryview], offset: int) -> None:
    """Write ``pieces`` one after another from ``offset`` on, whatever short writes
    ``pwritev`` makes (one ``pwrite`` each where there is no ``pwritev``: macOS < 11)."""
    pwritev = getattr(os, "pwritev", None)
    if pwritev is None:
        for piece in pieces:
            _pwrite_all(fd, piece, offset)
            offset += len(piece)
        return
    while pieces:
        n = pwritev(fd, pieces, offset)
        offset += n
        if n == sum(len(piece) for piece in pieces):
            return
        done = 0
        while n >= len(pieces[done]):
            n -= len(pieces[done])
            done += 1
        pieces = [memoryview(pieces[done])[n:], *pieces[done + 1 :]]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
