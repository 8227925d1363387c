"""Turning stored bytes into verified plaintext.

``BlobReader`` reads blobs and whole packs and verifies them: decrypt (MAC first),
decompress, and check the SHA-256 the blob is named by. ``backvault.engine.parallel.reader_pool``
runs that work on every core.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import zstandard

from backvault.crypto.aead import OVERHEAD, AuthenticationFailed, Key
from backvault.repo import format as fmt
from backvault.repo.compression import ThreadCompressors
from backvault.repo.errors import DamagedObject
from backvault.repo.format import PackedBlob
from backvault.storage import Backend, FileType, ObjectNotFound, StorageError


@dataclass(frozen=True, slots=True)
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
        self._direct_file_io = backend.capabilities.direct_file_io
        self._local = threading.local()
        self._zstd = ThreadCompressors()

    def open_blob(self, blob: PackedBlob, sealed: bytes | memoryview, label: str) -> bytes:
        """Decrypt, decompress and verify one blob's bytes as read from its pack."""
        try:
            plain = self.key.open(sealed)
        except AuthenticationFailed as exc:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} does not decrypt") from exc
        verified = self._verify(blob, plain, label)
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

    def write_run(self, locations: list[BlobLocation], fd: int, file_offset: int) -> int:
        """Read a run of blobs, verify each and write its plaintext to ``fd`` from
        ``file_offset`` on; the bytes written. The restore's hot path: one read buffer
        and one decryption buffer per thread are reused, not a new object per blob."""
        first, last = locations[0].blob, locations[-1].blob
        pack = locations[0].pack_id.hex()
        label = f"data/{pack}"
        length = last.offset + last.length - first.offset
        view = self._read_range(pack, first.offset, length, label)
        out = self._buffer("plain", max(loc.blob.length for loc in locations))
        written = 0
        for loc in locations:
            start = loc.blob.offset - first.offset
            sealed = view[start : start + loc.blob.length]
            try:
                plain: bytes | memoryview = self.key.open_into(sealed, out)
            except AuthenticationFailed as exc:
                raise DamagedObject(
                    label, f"blob {loc.blob.id.hex()[:12]} does not decrypt"
                ) from exc
            plain = self._verify(loc.blob, plain, label)
            _pwrite_all(fd, plain, file_offset + written)
            written += len(plain)
        return written

    def _verify(
        self, blob: PackedBlob, plain: bytes | memoryview, label: str
    ) -> bytes | memoryview:
        """Decompress (if the blob is compressed) into at most the length the index (or
        pack header) gives, and check the blob's SHA-256."""
        expected = blob.uncompressed_length
        if expected is not None:
            check_blob_size(blob, label)
            name = f"blob {blob.id.hex()[:12]}"
            try:
                # A frame that records its size is decompressed into a buffer of that size
                # whatever max_output_size says: a few KiB could claim gigabytes.
                claimed = zstandard.frame_content_size(plain)
                if claimed not in (-1, expected):
                    raise DamagedObject(
                        label,
                        f"{name}: its compressed data holds {claimed} bytes, the index says "
                        f"{expected}",
                    )
                plain = self._zstd.decompressor().decompress(plain, max_output_size=expected)
            except zstandard.ZstdError as exc:
                raise DamagedObject(label, f"{name}: {exc}") from exc
            if len(plain) != expected:
                raise DamagedObject(
                    label,
                    f"{name}: it decompresses to {len(plain)} bytes, the index says {expected}",
                )
        if fmt.sha256(plain) != blob.id:
            raise DamagedObject(label, f"blob {blob.id.hex()[:12]} has the wrong content")
        return plain

    def _read_range(self, pack: str, offset: int, length: int, label: str) -> memoryview:
        """``length`` bytes of a pack from ``offset``. From a backend with direct file I/O
        they are read into this thread's reusable buffer: valid until its next use."""
        try:
            if self._direct_file_io:
                view = memoryview(self._buffer("read", length))[:length]
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


def check_blob_size(blob: PackedBlob, label: str) -> None:
    """Refuse a blob whose lengths (as the index or a pack header gives them) are more
    than a blob of its type may hold, before anything is read or decompressed."""
    limit = fmt.MAX_BLOB_PLAINTEXT[blob.type.value]
    if blob.plaintext_length > limit or blob.length > limit + OVERHEAD:
        raise DamagedObject(
            label,
            f"blob {blob.id.hex()[:12]} claims {max(blob.plaintext_length, blob.length)} bytes, "
            f"more than a {blob.type.value} blob may hold ({limit})",
        )


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
