"""Pure encoders and parsers for restic's repository format version 2 (doc/design.rst).

No I/O and no keys here: callers encrypt and store what these functions produce. Every
parser raises :class:`FormatError` on anything malformed, with a message that names the
problem.

(Over 500 lines on purpose: every object of the format, its encoder next to its parser and
its limits, in the one file a reviewer checks against restic's design document.)
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import json
import operator
import re
import secrets
import stat
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple, overload

import zstandard

from backvault.crypto.aead import OVERHEAD

REPOSITORY_VERSION = 2
ID_SIZE = 32
MAX_UNPACKED_SIZE = 1 << 30  # refuse to decompress a bomb
# The largest plaintext a blob may have, by type: restic's chunker makes data blobs of at
# most 8 MiB; a tree blob of 256 MiB lists about a million entries. A blob that claims
# more is damaged: it is never read or decompressed (a zstd bomb of gigabytes).
MAX_BLOB_PLAINTEXT = {"data": 64 << 20, "tree": 256 << 20}


class FormatError(ValueError):
    """Repository data that does not follow restic's format."""


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def parse_id(text: Any, what: str = "id") -> bytes:
    if not isinstance(text, str) or len(text) != 2 * ID_SIZE:
        raise FormatError(f"{what}: expected 64 hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise FormatError(f"{what}: not hex") from exc


_OBJECT_NAME = re.compile(r"[0-9a-f]{64}")


def is_object_name(name: str) -> bool:
    """Whether ``name`` can be an object of the repository's data, index or snapshot
    folders: 64 lower-case hex digits, the id it is stored under. Any other file there
    (``data/ab/not-hex``) is none of the repository's: listings leave it out, as restic's
    do, and ``check`` reports it."""
    return _OBJECT_NAME.fullmatch(name) is not None


def json_problem(exc: ValueError | RecursionError) -> str:
    """What is wrong with JSON that ``json.loads`` refused. It raises RecursionError for
    arrays or objects nested deeper than Python's recursion limit: hostile data, which
    must be reported as damage like any other text that is not JSON."""
    if isinstance(exc, RecursionError):
        return "arrays or objects nested too deep"
    return str(exc)


def parse_content(texts: Any, what: str, consume: bool = False) -> ContentIds:
    """``parse_ids`` of a node's content, as ``ContentIds`` (which ``decode_tree`` may
    have made from the blob already)."""
    if isinstance(texts, ContentIds):
        return texts
    if not isinstance(texts, list):
        return ContentIds.of(parse_id(text, what) for text in texts)
    return ContentIds(b"".join(_joined_id_parts(texts, what, consume)))


def parse_ids(texts: Any, what: str = "ids", consume: bool = False) -> list[bytes]:
    """A list of ids (64 hex digits each): ``parse_id`` of each, but ~5 times faster (a
    tree node of a big database lists ~200 000). ``consume``: empty the list as its ids
    are made (its texts take ~110 bytes each, ids ~70)."""
    if not isinstance(texts, list):
        return [parse_id(text, what) for text in texts]
    ids: list[bytes] = []
    for raw in _joined_id_parts(texts, what, consume):
        ids.extend([raw[at : at + ID_SIZE] for at in range(0, len(raw), ID_SIZE)])
    return ids


def _joined_id_parts(texts: list[Any], what: str, consume: bool) -> Iterator[bytes]:
    """The ids of ``texts``, a part at a time, back to back: all of them joined would be
    another ~13 MB for 200 000 ids."""
    for first in range(0, len(texts), _PARSE_IDS):
        if consume:
            part = texts[:_PARSE_IDS]
            del texts[:_PARSE_IDS]
        else:
            part = texts[first : first + _PARSE_IDS]
        raw = _hex_ids_joined(part)
        if raw is None:
            raw = b"".join([parse_id(text, what) for text in part])  # names the wrong one
        yield raw


def _hex_ids_joined(texts: list[Any]) -> bytes | None:
    """The ids of ``texts`` back to back, or None if one is not 64 hex digits."""
    try:
        raw = bytes.fromhex("".join(texts))
    except (TypeError, ValueError):
        return None
    # fromhex skips whitespace: every id must be 64 characters, all hex digits.
    if len(raw) != ID_SIZE * len(texts) or set(map(len, texts)) - {2 * ID_SIZE}:
        return None
    return raw


def _node_content(texts: Any, name: str, consume: bool) -> ContentIds:
    """``parse_content`` of a node's content; a short list (a file's few ids: the usual
    case) without naming the node until something is wrong."""
    if isinstance(texts, list) and len(texts) <= _PARSE_IDS:
        raw = _hex_ids_joined(texts)
        if raw is not None:
            if consume:
                texts.clear()
            return ContentIds(raw)
    return parse_content(texts, f"content of {name!r}", consume)


_PARSE_IDS = 8192


class ContentIds(Sequence[bytes]):
    """A file's blob ids, 32 bytes each, back to back in one ``bytes``: a list of them as
    objects costs ~75 bytes an id (a database's node lists 190 000: ~14 MB, and a backup
    holds its parent's and its own). Reads as a sequence of ids; equal to another content
    list of the same ids, in any form."""

    __slots__ = ("joined",)

    def __init__(self, joined: bytes = b"") -> None:
        if len(joined) % ID_SIZE:
            raise FormatError("content ids are not a whole number of 32-byte ids")
        self.joined = joined

    @classmethod
    def of(cls, ids: Iterable[bytes]) -> ContentIds:
        if isinstance(ids, ContentIds):
            return ids
        ids = list(ids)
        if set(map(len, ids)) - {ID_SIZE}:
            raise FormatError("a content id is not 32 bytes")
        return cls(b"".join(ids))

    def __len__(self) -> int:
        return len(self.joined) // ID_SIZE

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> ContentIds: ...

    def __getitem__(self, index: int | slice) -> bytes | ContentIds:
        count = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(count)
            if step == 1:
                return ContentIds(self.joined[ID_SIZE * start : ID_SIZE * max(start, stop)])
            return ContentIds(b"".join(self[at] for at in range(start, stop, step)))
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("content index out of range")
        return self.joined[ID_SIZE * index : ID_SIZE * (index + 1)]

    def __iter__(self) -> Iterator[bytes]:
        joined = self.joined
        return (joined[at : at + ID_SIZE] for at in range(0, len(joined), ID_SIZE))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ContentIds):
            return self.joined == other.joined
        if isinstance(other, list | tuple):
            return len(other) == len(self) and all(map(operator.eq, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a list's equal: not hashable either

    def __repr__(self) -> str:
        return f"ContentIds({len(self)} ids)"


def in_slices(
    parts: Iterable[bytes | bytearray | memoryview], size: int
) -> Iterator[bytes | bytearray | memoryview]:
    """``parts`` as they come, any longer than ``size`` as views of slices of that size
    (big buffers compressed, sealed or written a slice at a time, never copied whole)."""
    for part in parts:
        if len(part) <= size:
            yield part
            continue
        view = memoryview(part)
        for at in range(0, len(view), size):
            yield view[at : at + size]


def joined_ids(ids: Sequence[bytes]) -> bytes:
    """``ids`` back to back (no copy for ``ContentIds``)."""
    return ids.joined if isinstance(ids, ContentIds) else b"".join(ids)


class BlobType(Enum):
    DATA = "data"
    TREE = "tree"


# --- unpacked files (index, snapshots, locks): encoding_version || data ---------------

_zstd_compressor = zstandard.ZstdCompressor(level=3)


def encode_unpacked(document: Any, compress: bool = True) -> bytes:
    """Plaintext of an unpacked file: ``0x02 || zstd(json)``, or bare JSON (config)."""
    raw = json.dumps(document, separators=(",", ":")).encode()
    if not compress:
        return raw
    return b"\x02" + _zstd_compressor.compress(raw)


def decode_unpacked(plaintext: bytes) -> Any:
    raw = unpacked_json(plaintext)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise FormatError(f"bad JSON: {json_problem(exc)}") from exc


def unpacked_json(plaintext: bytes) -> bytes:
    """The JSON text of an unpacked file's plaintext (decompressed), not decoded yet."""
    if not plaintext:
        raise FormatError("empty file")
    if plaintext[0] in b"[{":
        raw = plaintext
    elif plaintext[0] == 2:
        try:
            raw = zstandard.ZstdDecompressor().decompress(
                plaintext[1:], max_output_size=MAX_UNPACKED_SIZE
            )
        except zstandard.ZstdError as exc:
            raise FormatError(f"bad zstd data: {exc}") from exc
    else:
        raise FormatError(f"unknown encoding version {plaintext[0]}")
    return raw


# --- config --------------------------------------------------------------------------


# SQLite databases are cut into chunks of this many KiB (rounded up to whole pages) unless
# the repository's config says otherwise: every machine backing up to one repository must
# cut alike, or their chunks would not dedupe.
DEFAULT_SQLITE_CHUNK_KIB = 8
_CHUNK_KIB_FIELD = "backvault_sqlite_chunk_kib"  # restic ignores fields it does not know
MAX_SQLITE_CHUNK_KIB = 8 * 1024  # as large as the chunker's largest chunk (8 MiB)


@dataclass(frozen=True)
class Config:
    version: int
    id: str
    chunker_polynomial: str
    # backvault's own: the SQLite chunk size; None (absent from the file): the default.
    sqlite_chunk_kib: int | None = None

    @property
    def sqlite_chunk_bytes(self) -> int:
        return (self.sqlite_chunk_kib or DEFAULT_SQLITE_CHUNK_KIB) * 1024

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "id": self.id,
            "chunker_polynomial": self.chunker_polynomial,
        }
        if self.sqlite_chunk_kib is not None:
            doc[_CHUNK_KIB_FIELD] = self.sqlite_chunk_kib
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Config:
        if not isinstance(doc, dict):
            raise FormatError("config is not a JSON object")
        version = doc.get("version")
        if version not in (1, 2):
            raise FormatError(f"unsupported repository version {version!r}")
        repo_id, poly = doc.get("id"), doc.get("chunker_polynomial")
        if not isinstance(repo_id, str) or not isinstance(poly, str):
            raise FormatError("config lacks id or chunker_polynomial")
        chunk_kib = doc.get(_CHUNK_KIB_FIELD)
        if chunk_kib is not None and (
            type(chunk_kib) is not int or not 1 <= chunk_kib <= MAX_SQLITE_CHUNK_KIB
        ):
            raise FormatError(f"config: {_CHUNK_KIB_FIELD} must be 1 to {MAX_SQLITE_CHUNK_KIB}")
        return cls(version, repo_id, poly, chunk_kib)


# --- pack files: blobs || encrypted header || header length (uint32 LE) --------------

_PLAIN_ENTRY = struct.Struct("<BI32s")  # type, encrypted length, id
_COMPRESSED_ENTRY = struct.Struct("<BII32s")  # type, encrypted length, plain length, id
_TYPE_CODES = {
    (BlobType.DATA, False): 0,
    (BlobType.TREE, False): 1,
    (BlobType.DATA, True): 2,
    (BlobType.TREE, True): 3,
}
_CODE_TYPES = {code: key for key, code in _TYPE_CODES.items()}
_CODE_TYPE_NAMES = {code: blob_type.value for code, (blob_type, _) in _CODE_TYPES.items()}
_COMPRESSED_CODES = bytes(code for code, (_, compressed) in _CODE_TYPES.items() if compressed)
_PLAIN_CODES = bytes(code for code, (_, compressed) in _CODE_TYPES.items() if not compressed)
_TREE_OF_CODE = bytes(
    code in _CODE_TYPES and _CODE_TYPES[code][0] is BlobType.TREE for code in range(256)
)
HEADER_LENGTH_SIZE = 4


@dataclass(frozen=True, slots=True)
class PackedBlob:
    """A blob's place in a pack, as the pack header and the index describe it."""

    id: bytes
    type: BlobType
    offset: int
    length: int  # encrypted length in the pack
    uncompressed_length: int | None = None  # set only for compressed blobs

    def __reduce__(self) -> tuple[Callable[..., PackedBlob], tuple[Any, ...]]:
        # Worker processes send every blob they pack to the parent: a frozen dataclass's
        # default pickling looks up its fields for every object, and showed in profiles.
        return (
            PackedBlob,
            (self.id, self.type, self.offset, self.length, self.uncompressed_length),
        )

    @property
    def compressed(self) -> bool:
        return self.uncompressed_length is not None

    @property
    def plaintext_length(self) -> int:
        """Length of the blob's plaintext (decrypted and decompressed)."""
        if self.uncompressed_length is not None:
            return self.uncompressed_length
        return self.length - OVERHEAD


def encode_pack_header(blobs: Iterable[PackedBlob]) -> bytes:
    out = bytearray()
    for blob in blobs:
        code = _TYPE_CODES[(blob.type, blob.compressed)]
        if blob.uncompressed_length is None:
            out += _PLAIN_ENTRY.pack(code, blob.length, blob.id)
        else:
            out += _COMPRESSED_ENTRY.pack(code, blob.length, blob.uncompressed_length, blob.id)
    return bytes(out)


class PackBlobs(Collection[PackedBlob]):
    """A pack's blobs kept as its header lists them (37 or 41 bytes a blob, where a list
    of ``PackedBlob`` holds ~220): what a backup keeps of each pack it wrote until an index
    file lists it (50 packs of 8 KiB database chunks are ~50 000 blobs). Only for blobs
    back to back from the pack's start, as a pack is written (``compact_pack_blobs``)."""

    __slots__ = ("_count", "_header")

    def __init__(self, header: bytes, count: int) -> None:
        self._header = header
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[PackedBlob]:
        return iter(decode_pack_header(self._header))

    def __contains__(self, item: object) -> bool:
        return item in decode_pack_header(self._header)

    def __reduce__(self) -> tuple[Callable[..., PackBlobs], tuple[bytes, int]]:
        return (PackBlobs, (self._header, self._count))

    def columns(self) -> PackColumns:
        """The blobs' fields, a column each, without a ``PackedBlob`` per blob."""
        return pack_header_columns(self._header)

    def index_text(self) -> str:
        """This pack's entries in an index file: ``_index_blob_text`` of each blob,
        comma-separated, made from the header without a ``PackedBlob`` per blob (making
        and formatting those was ~0.3 s of a first backup of a 1.4 GB database)."""
        return _index_text_of_header(self._header)


def compact_pack_blobs(blobs: Sequence[PackedBlob]) -> Collection[PackedBlob]:
    """``blobs`` as ``PackBlobs`` if they lie back to back from offset 0 (the header then
    says everything about them), else as they are."""
    offset = 0
    for blob in blobs:
        if blob.offset != offset:
            return blobs
        offset += blob.length
    return PackBlobs(encode_pack_header(blobs), len(blobs))


def _entry_at(header: bytes, pos: int) -> struct.Struct:
    """The layout of the pack-header entry at ``pos``, by its type code; FormatError if
    the code is unknown or the entry cut."""
    code = header[pos]
    if code not in _CODE_TYPES:
        raise FormatError(f"pack header: unknown blob type {code}")
    entry = _COMPRESSED_ENTRY if _CODE_TYPES[code][1] else _PLAIN_ENTRY
    if pos + entry.size > len(header):
        raise FormatError("pack header: truncated entry")
    return entry


def _uniform_entry(header: bytes) -> struct.Struct | None:
    """The layout of every entry of a (non-empty) header whose entries are all of one
    size (a pack of compressed database pages; of media), else None. Exact: if the byte
    at every multiple of that size is a code of that size, reading the header entry by
    entry lands on exactly those bytes, so it holds only such entries."""
    for entry, codes in ((_COMPRESSED_ENTRY, _COMPRESSED_CODES), (_PLAIN_ENTRY, _PLAIN_CODES)):
        size = entry.size
        if header and len(header) % size == 0 and not header[::size].translate(None, codes):
            return entry
    return None


def decode_pack_header(header: bytes) -> list[PackedBlob]:
    blobs: list[PackedBlob] = []
    pos = offset = 0
    while pos < len(header):
        entry = _entry_at(header, pos)
        blob_type, compressed = _CODE_TYPES[header[pos]]
        if compressed:
            _, length, plain_length, blob_id = _COMPRESSED_ENTRY.unpack_from(header, pos)
        else:
            _, length, blob_id = _PLAIN_ENTRY.unpack_from(header, pos)
            plain_length = None
        blobs.append(PackedBlob(blob_id, blob_type, offset, length, plain_length))
        offset += length
        pos += entry.size
    return blobs


class PackColumns(NamedTuple):
    """A pack's blobs as columns: ``ids`` 32 bytes each back to back, ``tree`` 1 for a
    tree and 0 for data (a byte each), their lengths in the pack, and their uncompressed
    lengths (None for a blob stored as it is)."""

    ids: bytes
    tree: bytes
    lengths: tuple[int, ...]
    uncompressed_lengths: tuple[int | None, ...]

    def plaintext_bytes(self) -> int:
        """The sum of the blobs' ``PackedBlob.plaintext_length``."""
        total = 0
        for length, uncompressed in zip(self.lengths, self.uncompressed_lengths, strict=True):
            total += length - OVERHEAD if uncompressed is None else uncompressed
        return total


def pack_header_columns(header: bytes) -> PackColumns:
    """``decode_pack_header(header)`` as columns (blobs back to back from offset 0);
    entries all of one size are read in C."""
    entry = _uniform_entry(header)
    if entry is None:
        return blob_columns(decode_pack_header(header))
    kinds = header[:: entry.size]
    fields = list(zip(*entry.iter_unpack(header), strict=True))
    uncompressed = fields[2] if entry is _COMPRESSED_ENTRY else (None,) * len(kinds)
    return PackColumns(
        b"".join(fields[-1]), kinds.translate(_TREE_OF_CODE), fields[1], uncompressed
    )


def blob_columns(blobs: Collection[PackedBlob]) -> PackColumns:
    """``blobs`` as columns (those of ``PackBlobs`` read from its header)."""
    if isinstance(blobs, PackBlobs):
        return blobs.columns()
    return PackColumns(
        b"".join([blob.id for blob in blobs]),
        bytes([blob.type is BlobType.TREE for blob in blobs]),
        tuple([blob.length for blob in blobs]),
        tuple([blob.uncompressed_length for blob in blobs]),
    )


def _index_text_of_header(header: bytes) -> str:
    """``_index_blob_text`` of each blob ``decode_pack_header(header)`` lists, joined
    with commas: the same text, formatted straight from the header's entries."""
    uniform = _uniform_entry(header)
    if uniform is not None:
        return _uniform_index_text(header, uniform)
    entries: list[str] = []
    pos = offset = 0
    while pos < len(header):
        entry = _entry_at(header, pos)
        entries.append(_uniform_index_text(header[pos : pos + entry.size], entry, offset))
        offset += entry.unpack_from(header, pos)[1]
        pos += entry.size
    return ",".join(entries)


_INDEX_ENTRY_TEXT = '{"id":"%s","type":"%s","offset":%d,"length":%d'
_COMPRESSED_ENTRY_TEXT = _INDEX_ENTRY_TEXT + ',"uncompressed_length":%d}'


def _uniform_index_text(header: bytes, entry: struct.Struct, offset: int = 0) -> str:
    """``_index_text_of_header`` of entries all of ``entry``'s kind, the first at
    ``offset``; one ``%`` per entry (~0.5 µs: a ``PackedBlob`` and its text took ~1.7)."""
    types, entries = _CODE_TYPE_NAMES, list[str]()
    append = entries.append
    if entry is _COMPRESSED_ENTRY:
        text = _COMPRESSED_ENTRY_TEXT.__mod__
        for code, length, plain_length, blob_id in entry.iter_unpack(header):
            append(text((blob_id.hex(), types[code], offset, length, plain_length)))
            offset += length
    else:
        text = (_INDEX_ENTRY_TEXT + "}").__mod__
        for code, length, blob_id in entry.iter_unpack(header):
            append(text((blob_id.hex(), types[code], offset, length)))
            offset += length
    return ",".join(entries)


def pack_header_span(pack_size: int, header_length: int) -> tuple[int, int]:
    """Where the encrypted header sits in a pack: (offset, length), checked for sanity."""
    if header_length <= 0 or header_length + HEADER_LENGTH_SIZE > pack_size:
        raise FormatError(
            f"pack header length {header_length} does not fit a {pack_size}-byte pack"
        )
    return pack_size - HEADER_LENGTH_SIZE - header_length, header_length


# --- index -----------------------------------------------------------------------------


@dataclass
class IndexFile:
    packs: dict[bytes, list[PackedBlob]] = field(default_factory=dict)
    supersedes: list[bytes] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.supersedes:
            doc["supersedes"] = [s.hex() for s in self.supersedes]
        doc["packs"] = [
            {
                "id": pack_id.hex(),
                "blobs": [_index_blob_json(b) for b in blobs],
            }
            for pack_id, blobs in self.packs.items()
        ]
        return doc

    def encode(self) -> bytes:
        """The plaintext of this index file: ``encode_unpacked(self.to_json())``, the same
        JSON (``encode_index``)."""
        return encode_index(self.packs, self.supersedes)

    @classmethod
    def from_json(cls, doc: Any) -> IndexFile:
        if isinstance(doc, list):  # restic's first index format: a bare list of packs
            doc = {"packs": doc}
        if not isinstance(doc, dict) or not isinstance(doc.get("packs", []), list):
            raise FormatError("index is not a JSON object with packs")
        index = cls()
        index.supersedes = [parse_id(s, "supersedes") for s in doc.get("supersedes") or []]
        for pack in doc.get("packs") or []:
            try:
                pack_id = parse_id(pack["id"], "pack id")
                blobs = []
                for b in pack["blobs"] or []:
                    plain = b.get("uncompressed_length")
                    blobs.append(
                        PackedBlob(
                            parse_id(b["id"], "blob id"),
                            BlobType(b["type"]),
                            _nonneg_int(b["offset"]),
                            _nonneg_int(b["length"]),
                            None if plain is None else _nonneg_int(plain),
                        )
                    )
            except (KeyError, TypeError, ValueError) as exc:
                raise FormatError(f"index entry malformed: {exc}") from exc
            index.packs.setdefault(pack_id, []).extend(blobs)
        return index


def _nonneg_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"expected a non-negative integer, got {value!r}")
    return value


# How many bits each number of a tree node has in restic (Go's types), so a restore never
# meets one the system cannot take (chown of uid 2^40, mknod of device 2^70). A size is a
# file offset: at most 2^63 - 1.
_NODE_INT_BITS = {
    "mode": 32,
    "uid": 32,
    "gid": 32,
    "inode": 64,
    "device_id": 64,
    "size": 63,
    "links": 64,
    "device": 64,
}


# (key, 2^bits): the bound each number of a node stays below.
_NODE_INT_LIMITS = tuple((key, 1 << bits) for key, bits in _NODE_INT_BITS.items())


def _node_int(doc: dict[str, Any], key: str, name: str) -> int:
    value = _nonneg_int(doc.get(key, 0))
    if value >> _NODE_INT_BITS[key]:
        raise FormatError(
            f"tree node {name!r} has {key} {value}, out of range "
            f"(at most 2^{_NODE_INT_BITS[key]} - 1)"
        )
    return value


def encode_index(
    packs: Mapping[bytes, Iterable[PackedBlob]], supersedes: Sequence[bytes] = ()
) -> bytes:
    """The plaintext of an index file of ``packs``: ``encode_unpacked`` of its JSON, made
    a pack at a time (a file of 100 000 blobs as a document of dicts took ~30 MB, and
    ~30 MB more as one string and its bytes)."""
    head = "{"
    if supersedes:
        head += '"supersedes":[' + ",".join(f'"{s.hex()}"' for s in supersedes) + "],"
    parts = [(head + '"packs":[').encode()]
    for number, (pack_id, blobs) in enumerate(packs.items()):
        if isinstance(blobs, PackBlobs):
            entries = blobs.index_text()
        else:
            entries = ",".join([_index_blob_text(b) for b in blobs])
        comma = "," if number else ""
        parts.append(f'{comma}{{"id":"{pack_id.hex()}","blobs":[{entries}]}}'.encode())
    parts.append(b"]}")
    # Compressed a part at a time, the whole size told first (the frame records it, as
    # ``compress`` does: a reader then takes just that much room). At level 1: an index
    # file is mostly hex ids, which level 3 compresses no better (7.3 against 6.7 MB for
    # 184 000 blobs) at half the speed.
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=sum(map(len, parts)))
    out = [b"\x02"]
    for at, part in enumerate(parts):
        out.append(compressor.compress(part))
        parts[at] = b""
    out.append(compressor.flush())
    return b"".join(out)


def _index_blob_text(blob: PackedBlob) -> str:
    """``_index_blob_json`` as JSON text."""
    text = (
        f'{{"id":"{blob.id.hex()}","type":"{blob.type.value}",'
        f'"offset":{blob.offset},"length":{blob.length}'
    )
    if blob.uncompressed_length is not None:
        return f'{text},"uncompressed_length":{blob.uncompressed_length}}}'
    return text + "}"


def _index_blob_json(blob: PackedBlob) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": blob.id.hex(),
        "type": blob.type.value,
        "offset": blob.offset,
        "length": blob.length,
    }
    if blob.uncompressed_length is not None:
        doc["uncompressed_length"] = blob.uncompressed_length
    return doc


# --- trees ---------------------------------------------------------------------------

# Go's os.FileMode bits, which restic stores as "mode".
GO_MODE_DIR = 1 << 31
GO_MODE_SYMLINK = 1 << 27
GO_MODE_DEVICE = 1 << 26
GO_MODE_NAMED_PIPE = 1 << 25
GO_MODE_SOCKET = 1 << 24
GO_MODE_SETUID = 1 << 23
GO_MODE_SETGID = 1 << 22
GO_MODE_CHAR_DEVICE = 1 << 21
GO_MODE_STICKY = 1 << 20


def go_mode_from_unix(st_mode: int) -> int:
    mode = st_mode & 0o777
    if st_mode & stat.S_ISUID:
        mode |= GO_MODE_SETUID
    if st_mode & stat.S_ISGID:
        mode |= GO_MODE_SETGID
    if st_mode & stat.S_ISVTX:
        mode |= GO_MODE_STICKY
    kind = stat.S_IFMT(st_mode)
    mode |= {
        stat.S_IFDIR: GO_MODE_DIR,
        stat.S_IFLNK: GO_MODE_SYMLINK,
        stat.S_IFIFO: GO_MODE_NAMED_PIPE,
        stat.S_IFSOCK: GO_MODE_SOCKET,
        stat.S_IFBLK: GO_MODE_DEVICE,
        stat.S_IFCHR: GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE,
    }.get(kind, 0)
    return mode


def unix_permissions_from_go(go_mode: int) -> int:
    """The chmod() bits of a restic mode: permissions plus setuid, setgid and sticky."""
    mode = go_mode & 0o777
    if go_mode & GO_MODE_SETUID:
        mode |= stat.S_ISUID
    if go_mode & GO_MODE_SETGID:
        mode |= stat.S_ISGID
    if go_mode & GO_MODE_STICKY:
        mode |= stat.S_ISVTX
    return mode


# The node types restic writes; a tree with any other is refused.
NODE_TYPES = ("file", "dir", "symlink", "dev", "chardev", "fifo", "socket", "irregular")


def name_bytes(name: str) -> bytes:
    """A node's name as the file system sees it (names that are not UTF-8 are kept as
    surrogate escapes, as Python reads them)."""
    return name.encode("utf-8", "surrogateescape")


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one entry of a folder, or None: anything that is not a
    single path component would let a restore reach outside the folder."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it names a folder, not an entry in one"
    if "/" in name:
        return "it contains /"
    return _path_problem(name)


def _path_problem(text: str) -> str | None:
    """Why ``text`` cannot be passed to the file system, or None."""
    if "\x00" in text:
        return "it contains NUL"
    if text.isascii():
        return None  # the usual case: encodes as it is (asked of every node a backup reads)
    try:
        name_bytes(text)
    except UnicodeEncodeError:
        return "it is not a file name (unpaired surrogate)"
    return None


@dataclass
class Node:
    """One entry of a tree, with the fields restic 0.14 writes (``omitempty`` honoured)."""

    name: str
    type: str
    mode: int = 0
    mtime: str = ""
    atime: str = ""
    ctime: str = ""
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    inode: int = 0
    device_id: int = 0
    size: int = 0
    links: int = 0
    linktarget: str = ""
    device: int = 0
    content: Sequence[bytes] | None = None  # ``ContentIds`` as read or stored
    subtree: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields we keep but do not use

    _OPTIONAL = (
        "mode",
        "mtime",
        "atime",
        "ctime",
        "user",
        "group",
        "inode",
        "device_id",
        "size",
        "links",
        "linktarget",
    )

    def to_json(self, *, content: bool = True) -> dict[str, Any]:
        """The node's JSON object; without ``content`` it ends before the content (and
        subtree) fields, for ``encode_tree`` to write a long content list itself."""
        doc: dict[str, Any] = {"name": self.name, "type": self.type}
        for key in ("mode", "mtime", "atime", "ctime"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        doc["uid"] = self.uid
        doc["gid"] = self.gid
        for key in ("user", "group", "inode", "device_id", "size", "links", "linktarget"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        doc.update(self.extra)
        if self.device:
            doc["device"] = self.device
        if not content:
            return doc
        doc["content"] = None if self.content is None else [c.hex() for c in self.content]
        if self.subtree is not None:
            doc["subtree"] = self.subtree.hex()
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Node:
        return cls._from_json(doc, consume=False)

    @classmethod
    def _from_json(cls, doc: Any, consume: bool) -> Node:
        """``consume``: ``doc`` is not used again; its content list is emptied as it is
        decoded (200 000 ids of a big database are ~22 MB as text)."""
        # A backup reads the parent's node of every file (12 000 in a 5 GB chat store):
        # the usual values are checked inline, anything else goes the slow way, which
        # says what is wrong.
        if not isinstance(doc, dict):
            raise FormatError("tree node is not an object")
        try:
            name, node_type = doc["name"], doc["type"]
            if not isinstance(name, str) or not isinstance(node_type, str):
                raise FormatError("tree node name/type must be strings")
            problem = _name_problem(name)
            if problem is not None:
                raise FormatError(f"tree node has an unsafe name: {name!r} ({problem})")
            if node_type not in NODE_TYPES:
                raise FormatError(f"tree node {name!r} has an unknown type {node_type!r}")
            get = doc.get
            linktarget = get("linktarget", "")
            if not isinstance(linktarget, str):
                raise FormatError(f"tree node {name!r} has a link target that is not text")
            problem = _path_problem(linktarget)
            if problem is not None:
                raise FormatError(f"tree node {name!r} has an unusable link target ({problem})")
            numbers: dict[str, Any] = {}
            for key, limit in _NODE_INT_LIMITS:
                value = get(key, 0)
                if type(value) is not int or not 0 <= value < limit:
                    value = _node_int(doc, key, name)  # a bool, a float, out of range: refused
                numbers[key] = value
            content = get("content")
            subtree = get("subtree")
            node = cls(
                name=name,
                type=node_type,
                mtime=str(get("mtime", "")),
                atime=str(get("atime", "")),
                ctime=str(get("ctime", "")),
                user=str(get("user", "")),
                group=str(get("group", "")),
                linktarget=linktarget,
                content=None if content is None else _node_content(content, name, consume),
                subtree=None if subtree is None else parse_id(subtree, f"subtree of {name!r}"),
                **numbers,
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"tree node malformed: {exc}") from exc
        if doc.keys() - _KNOWN_NODE_KEYS:
            node.extra = {k: v for k, v in doc.items() if k not in _KNOWN_NODE_KEYS}
        if node.type == "dir" and node.subtree is None:
            raise FormatError(f"directory {name!r} has no subtree")
        return node


# Every key a node's JSON may have that ``Node`` has a field for; others go to ``extra``.
_KNOWN_NODE_KEYS = frozenset(
    {"name", "type", "content", "subtree", "device", "uid", "gid", *Node._OPTIONAL}
)


# A restore makes one entry per node of every folder it walks, counting a tree once for
# each folder that holds it. Folders may share a tree (every empty folder is the same
# tree), so a few kilobytes of trees can stand for 2^40 entries: restore refuses, and
# check reports, a snapshot that expands to more than this.
MAX_RESTORE_ENTRIES = 50_000_000


@dataclass(frozen=True)
class TreeShape:
    """What of a tree counts for its expansion: its nodes, the sizes of its files, and
    the subtree of each of its folders (a repeated one once per folder)."""

    entries: int
    file_bytes: int
    subtrees: tuple[bytes, ...]

    @classmethod
    def of(cls, nodes: list[Node]) -> TreeShape:
        # A repeated subtree is one bytes object (a tree naming one subtree a million
        # times costs a pointer each).
        ids: dict[bytes, bytes] = {}
        return cls(
            len(nodes),
            sum(restorable_size(node) for node in nodes if node.type == "file"),
            tuple(
                ids.setdefault(node.subtree, node.subtree)
                for node in nodes
                if node.type == "dir" and node.subtree
            ),
        )


def restorable_size(node: Node) -> int:
    """The most bytes a restore can write for file ``node``: its size, but no more than
    its blobs can hold (a file claiming more is damaged and written not at all)."""
    return min(node.size, len(node.content or []) * MAX_BLOB_PLAINTEXT["data"])


def expanded_totals(
    root: bytes,
    shape: Callable[[bytes], TreeShape | None],
    memo: dict[bytes, tuple[int, int]],
) -> tuple[int, int]:
    """Entries and file bytes of tree ``root`` with every folder below it expanded, each
    shared subtree counted as often as folders hold it. ``shape`` gives a tree's shape, or
    None for a tree that cannot be read (it counts as empty). Each tree is added up once
    (``memo``, by tree id), so 2^40 entries take as many steps as there are trees; no
    recursion (nesting may be thousands deep). Tree ids are hashes of their content, so a
    tree cannot hold itself. Each tree is read once: only the shapes of the trees being
    added up are kept (``shape`` need not keep any tree: a snapshot's trees may not fit
    in memory)."""
    todo: list[tuple[bytes, TreeShape | None]] = [(root, None)]
    while todo:
        tree, found = todo[-1]
        if tree in memo:
            todo.pop()
            continue
        if found is None:
            found = shape(tree)
            if found is None:
                memo[tree] = (0, 0)
                todo.pop()
                continue
            todo[-1] = (tree, found)
        missing = {sub: None for sub in found.subtrees if sub not in memo}
        if missing:
            todo.extend((sub, None) for sub in missing)
            continue
        memo[tree] = (
            found.entries + sum(memo[sub][0] for sub in found.subtrees),
            found.file_bytes + sum(memo[sub][1] for sub in found.subtrees),
        )
        todo.pop()
    return memo[root]


def tree_order(node: Node) -> bytes:
    """The order of nodes in a tree: by the bytes of their names, as restic sorts them."""
    return name_bytes(node.name)


def encode_tree(nodes: Iterable[Node]) -> bytes:
    """A tree blob: ``{"nodes":[...]}\\n`` with nodes sorted by name, as restic writes it."""
    return b"".join(tree_parts(nodes)())


def tree_parts(nodes: Iterable[Node]) -> Callable[[], Iterator[bytes]]:
    """``encode_tree``'s bytes in parts, made again each time the function returned is
    called (its caller reads them once for the blob's id and size, and again to seal
    them): a database's node lists 190,000 content ids, 13 MB of JSON never held whole.
    FormatError now if two nodes have one name."""
    ordered = sorted(nodes, key=tree_order)
    for a, b in itertools.pairwise(ordered):
        if tree_order(a) == tree_order(b):
            raise FormatError(f"duplicate name {a.name!r} in one folder")
    if not any(_long_content(n) for n in ordered):
        doc = {"nodes": [n.to_json() for n in ordered]}
        whole = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        return lambda: iter((whole,))
    # The same bytes, node by node; a long content list written straight from the ids,
    # a slice at a time (a database's node lists 190,000: as hex strings for json.dumps,
    # 20 MB for a moment and twice the time; as one hex text, three copies of 12 MB).

    def parts() -> Iterator[bytes]:
        yield b'{"nodes":['
        for position, node in enumerate(ordered):
            comma = b"," if position else b""
            if _long_content(node):
                assert node.content is not None
                head = json.dumps(node.to_json(content=False), separators=(",", ":")).encode()
                yield comma + head[:-1] + b',"content":'
                yield from _hex_array_parts(node.content)
                yield b"}"
            else:
                yield comma + json.dumps(node.to_json(), separators=(",", ":")).encode()
        yield b"]}\n"

    return parts


_LONG_CONTENT = 1024  # blobs
_HEX_SLICE = 4096  # ids hexed at a time


def _long_content(node: Node) -> bool:
    return node.content is not None and len(node.content) >= _LONG_CONTENT and not node.subtree


def _hex_array_parts(ids: Sequence[bytes]) -> Iterator[bytes]:
    """``json.dumps([i.hex() for i in ids])`` (compact) for 32-byte ids, in parts of
    _HEX_SLICE ids, without a string per id: ``["<64 hex>","<64 hex>",...]``."""
    yield b"["
    for start in range(0, len(ids), _HEX_SLICE):
        part = ids[start : start + _HEX_SLICE]
        joined = joined_ids(part)
        if len(joined) != 32 * len(part):
            raise FormatError("a content id is not 32 bytes")
        comma = b"," if start else b""
        yield comma + b'"' + binascii.hexlify(joined, b"|", 32).replace(b"|", b'","') + b'"'
    yield b"]"


def decode_tree(data: bytes) -> list[Node]:
    """A tree blob's nodes. A node's long content list (a database's: ~190 000 ids, 13 MB
    of the blob's JSON) is read straight from the bytes, not made into a string per id
    first (~22 MB of small objects for a moment, which the memory allocator kept)."""
    if len(data) >= _LONG_CONTENT * _HEX_ID_ITEM:
        nodes = _decode_tree_with_long_contents(data)
        if nodes is not None:
            return nodes
    return tree_nodes(decode_tree_json(tree_text(data)))


_CONTENT_KEY = b'"content":["'
_HEX_ID_ITEM = 2 * ID_SIZE + 3  # "<64 hex digits>", (the last has no comma)


def _long_content_arrays(data: bytes) -> Iterator[tuple[int, int]]:
    """Where compact content lists of at least _LONG_CONTENT ids may be, as restic (and
    this code) writes them right after the key "content" of an object: the span of
    ``"<64>","<64>",...,"<64>"`` between the brackets, with its quotes and commas where
    they belong (``_hex_ids`` checks that all between them are hex digits). Its
    quotes are all unescaped (none follows a backslash), so they delimit strings and the
    key is a key (or the JSON is invalid, which ``json`` then finds). Checked with
    searches, slices and counts of the bytes, not a pattern run a character at a time
    (which took longer than ``json`` itself), and without copying the list."""
    view = memoryview(data)
    at = data.find(_CONTENT_KEY)
    while at >= 0:
        start = at + len(_CONTENT_KEY) - 1  # the first id's opening quote
        stop = data.find(b"]", start)  # no "]" in a list of ids: its end, if it is one
        length = stop - start
        count = (length + 1) // _HEX_ID_ITEM
        if (
            at > 0
            and data[at - 1] in b"{,"
            and count >= _LONG_CONTENT
            and length == count * _HEX_ID_ITEM - 1
            and view[start:stop:_HEX_ID_ITEM] == b'"' * count
            and view[start + _HEX_ID_ITEM - 2 : stop : _HEX_ID_ITEM] == b'"' * count
            and view[start + _HEX_ID_ITEM - 1 : stop : _HEX_ID_ITEM] == b"," * (count - 1)
        ):
            yield start, stop
            at = data.find(_CONTENT_KEY, stop)
        else:
            at = data.find(_CONTENT_KEY, at + 1)


def _decode_tree_with_long_contents(data: bytes) -> list[Node] | None:
    """``decode_tree`` with each long content list taken out of the JSON and replaced by
    a string no tree can hold (a fresh random token and its number); the JSON left is
    parsed as usual and every token put back as the ids it stands for. None (decode the
    usual way) if there is no long list, or if a token ends up anywhere but as the
    content of a node: the usual way then decides what the tree is."""
    token = secrets.token_hex(16)
    contents: list[ContentIds] = []
    pieces: list[bytes] = []
    end = 0
    for start, stop in _long_content_arrays(data):
        ids = _hex_ids(data, start, stop)
        if ids is None:
            return None  # not all hex digits: ``json`` and the ids' own checks decide
        pieces.append(data[end : start - 1])  # up to the "["
        pieces.append(f'"{token}:{len(contents)}"'.encode())
        contents.append(ids)
        end = stop + 1  # after the "]"
    if not contents:
        return None
    pieces.append(data[end:])
    try:
        doc = decode_tree_json(tree_text(b"".join(pieces)))
    except FormatError:
        return None
    del pieces
    nodes_docs = doc.get("nodes") if isinstance(doc, dict) else None
    placed = 0
    for node_doc in nodes_docs if isinstance(nodes_docs, list) else ():
        content = node_doc.get("content") if isinstance(node_doc, dict) else None
        if isinstance(content, str) and content.startswith(f"{token}:"):
            number = int(content[len(token) + 1 :])
            node_doc["content"] = contents[number]
            placed += 1
    if placed != len(contents):
        return None  # a list that was not a node's content (or one of two "content" keys)
    return tree_nodes(doc)


def _hex_ids(data: bytes, start: int, stop: int) -> ContentIds | None:
    """The ids of ``"<64>","<64>",...`` in ``data[start:stop]`` (quotes and commas checked
    by ``_long_content_arrays``), a slice at a time; None if a character between the
    quotes is not a hex digit (any case: ``bytes.fromhex``, which decodes them the plain
    way, takes both)."""
    parts = []
    step = _PARSE_IDS * _HEX_ID_ITEM
    for at in range(start, stop, step):
        hexed = data[at + 1 : min(at + step, stop + 1) - 2].replace(b'","', b"")
        try:
            parts.append(binascii.unhexlify(hexed))
        except binascii.Error:
            return None
    return ContentIds(b"".join(parts))


def tree_text(data: bytes) -> str:
    """A tree's JSON as text, decoded as ``json.loads`` decodes bytes (then ``data`` may
    go before the text is parsed: a big database's tree is ~13 MB)."""
    try:
        return data.decode(json.detect_encoding(data), "surrogatepass")
    except ValueError as exc:
        raise FormatError(f"tree is not JSON: {exc}") from exc


def decode_tree_json(data: bytes | str) -> Any:
    """The first half of ``decode_tree``: the JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise FormatError(f"tree is not JSON: {json_problem(exc)}") from exc


def tree_nodes(doc: Any) -> list[Node]:
    """The second half of ``decode_tree``: the nodes of a tree's JSON, which this
    empties as it goes (what is decoded of a big node is freed before the rest)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes", []), list | None):
        raise FormatError("tree is not an object with nodes")
    docs = doc.get("nodes") or []
    nodes = []
    for at, node_doc in enumerate(docs):
        nodes.append(Node._from_json(node_doc, consume=True))
        docs[at] = None
    # Two entries of one name would make a restore put one where the other was (a folder
    # replaced by a symlink while files are written into it). Names are compared as the
    # file system sees them: "é" and its UTF-8 bytes as surrogate escapes are one name.
    seen: set[bytes] = set()
    for node in nodes:
        key = tree_order(node)
        if key in seen:
            raise FormatError(f"duplicate name {node.name!r} in one folder")
        seen.add(key)
    return nodes


# --- snapshots -----------------------------------------------------------------------


@dataclass
class Snapshot:
    time: str
    tree: bytes
    paths: list[str]
    hostname: str = ""
    username: str = ""
    uid: int = 0
    gid: int = 0
    parent: bytes | None = None
    tags: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    original: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"time": self.time}
        if self.parent is not None:
            doc["parent"] = self.parent.hex()
        doc["tree"] = self.tree.hex()
        doc["paths"] = self.paths
        for key in ("hostname", "username", "uid", "gid", "excludes", "tags"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        if self.original is not None:
            doc["original"] = self.original.hex()
        doc.update(self.extra)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Snapshot:
        if not isinstance(doc, dict):
            raise FormatError("snapshot is not an object")
        try:
            snap = cls(
                time=str(doc["time"]),
                tree=parse_id(doc["tree"], "snapshot tree"),
                paths=[str(p) for p in doc.get("paths") or []],
                hostname=str(doc.get("hostname", "")),
                username=str(doc.get("username", "")),
                uid=_nonneg_int(doc.get("uid", 0)),
                gid=_nonneg_int(doc.get("gid", 0)),
                parent=None if doc.get("parent") is None else parse_id(doc["parent"]),
                tags=[str(t) for t in doc.get("tags") or []],
                excludes=[str(e) for e in doc.get("excludes") or []],
                original=None if doc.get("original") is None else parse_id(doc["original"]),
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"snapshot malformed: {exc}") from exc
        known = {"time", "tree", "paths", "hostname", "username", "uid", "gid", "parent"}
        known |= {"tags", "excludes", "original"}
        snap.extra = {k: v for k, v in doc.items() if k not in known}
        return snap


# --- locks ---------------------------------------------------------------------------


@dataclass
class Lock:
    time: str
    exclusive: bool
    hostname: str
    username: str
    pid: int
    uid: int = 0
    gid: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "exclusive": self.exclusive,
            "hostname": self.hostname,
            "username": self.username,
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Lock:
        if not isinstance(doc, dict):
            raise FormatError("lock is not an object")
        try:
            return cls(
                time=str(doc["time"]),
                exclusive=bool(doc.get("exclusive", False)),
                hostname=str(doc.get("hostname", "")),
                username=str(doc.get("username", "")),
                pid=int(doc.get("pid", 0)),
                uid=int(doc.get("uid", 0)),
                gid=int(doc.get("gid", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"lock malformed: {exc}") from exc
