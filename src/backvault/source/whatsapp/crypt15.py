"""WhatsApp's end-to-end encrypted backup files, ``*.crypt15``: read and written in a stream.

The layout, as this module reads it (docs/whatsapp.md has the long version)::

    varint n | BackupPrefix (n bytes, protobuf) | ciphertext | GCM tag (16) | [MD5 (16)]

- ``n`` is written the way protobuf's ``writeDelimitedTo`` writes a length. For the
  128-255-byte header of a message database that is two bytes ``n, 0x01`` — which other
  readers describe as "a size byte and a 0x01 flag for the feature table"; both readings
  agree on every such file.
- ``BackupPrefix``: 1 key type (1: end-to-end, the 64-digit key), 2 the crypt14 cipher
  block (its presence means crypt14), 3 ``{1: IV}`` (16 bytes), 4 the backup's info (1 app
  version, 3 the last two digits of the phone number, 4 a backup version, 5… one flag per
  database feature).
- The body is AES-256-GCM under the key derived from the 32-byte root key (``backup_key``),
  with the header's IV and no associated data: the header is not authenticated by GCM.
- The plaintext is a zlib stream (a database, compressed) or a ZIP file (a "multi-file"
  backup such as wallpapers), stored as is.
- Single-file backups end with the MD5 of everything before it (header included), the only
  check on the header; multi-file backups end at the tag.

Nothing here opens a path: the callers pass file objects (seekable, for the source) and
decide where plaintext may go. Decryption writes plaintext to ``out`` before the tag is
checked (it is checked at the end of a stream): the caller must give a private temporary
file and use it only if ``decrypt`` returns.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backvault.source.whatsapp import protowire
from backvault.source.whatsapp.protowire import WireError

KEY_BYTES = 32
IV_BYTES = 16
TAG_BYTES = 16
MD5_BYTES = 16
MAX_HEADER_BYTES = 4096
CHUNK = 1 << 20
# The most a file may decompress to. A message database of a decade is a few GiB; a
# stream that expands beyond this is refused before it fills the disk (only a holder of the
# key can make one, but the tag is checked only at the end of the stream).
MAX_PLAIN_BYTES = 64 << 30

KEY_TYPE_NAMES = {0: "provided by WhatsApp (crypt14 style)", 1: "end-to-end (64-digit key)"}
# The feature flags' names, as the wa-crypt-tools project lists them (the database tables
# and migrations the backup's schema has).
FEATURE_NAMES = {
    5: "call_log",
    6: "labeled_jid",
    7: "message_fts",
    8: "blank_me_jid",
    9: "message_link",
    10: "message_main",
    11: "message_text",
    12: "missed_calls",
    13: "receipt_user",
    14: "message_media",
    15: "message_vcard",
    16: "message_future",
    17: "message_quoted",
    18: "message_system",
    19: "receipt_device",
    20: "message_mention",
    21: "message_revoked",
    22: "broadcast_me_jid",
    23: "message_frequent",
    24: "message_location",
    25: "participant_user",
    26: "message_thumbnail",
    27: "message_send_count",
    28: "migration_jid_store",
    29: "payment_transaction",
    30: "migration_chat_store",
    31: "quoted_order_message",
    32: "media_migration_fixer",
    33: "quoted_order_message_v2",
    34: "message_main_verification",
    35: "quoted_ui_elements_reply_message",
    36: "alter_message_ephemeral_to_message_ephemeral_remove_column",
    37: "alter_message_ephemeral_setting_to_message_ephemeral_setting_remove_column",
    39: "cleaned_db",
}

Payload = Literal["zlib", "zip", "raw"]


# --- errors ---------------------------------------------------------------------------


class Crypt15Error(Exception):
    """A file that cannot be read; the message completes "NAME …" (see ``describe``)."""

    def describe(self, name: str) -> str:
        return f"{name} {self}"


class MalformedKey(Crypt15Error):
    def describe(self, name: str) -> str:
        return f"{name}: {self}"


class KeyMismatch(Crypt15Error):
    """The tag does not verify and the file is intact (or looks so): another key."""

    def __init__(self, certain: bool) -> None:
        self.certain = certain
        super().__init__("made with another key" if certain else "made with another key?")

    def describe(self, name: str) -> str:
        if self.certain:
            return f"the 64-digit key does not open {name}; it was made with another key"
        return (
            f"the 64-digit key does not open {name}; it was made with another key, or the "
            "file is damaged (it carries no checksum to tell which)"
        )


class Damaged(Crypt15Error):
    pass


class UnsupportedFormat(Crypt15Error):
    pass


# --- keys -----------------------------------------------------------------------------

# java.io.ObjectOutputStream writing a byte[]: stream magic and version, TC_ARRAY, the class
# descriptor of "[B" (its serialVersionUID, SC_SERIALIZABLE, no fields, end of block data,
# no superclass), then the length as a big-endian int and the bytes.
_JAVA_BYTE_ARRAY = bytes.fromhex("aced0005757200025b42acf317f8060854e00200007870")
_CRYPT14_KEY_BYTES = 131  # the crypt12/14 "key" file's array: versions, salts, the AES key


def parse_key_text(text: str) -> bytes:
    """The root key from its 64 hex digits, as the app shows them (grouped by spaces or
    not, any case)."""
    digits = "".join(text.split())
    if not re.fullmatch(r"[0-9a-fA-F]*", digits):
        raise MalformedKey(
            "not a WhatsApp key: expected 64 hex digits (0-9, a-f; spaces allowed), "
            "found other characters"
        )
    if len(digits) != 2 * KEY_BYTES:
        raise MalformedKey(f"not a WhatsApp key: expected 64 hex digits, found {len(digits)}")
    return bytes.fromhex(digits)


def parse_key_file(data: bytes) -> bytes:
    """The root key from a key file: ``encrypted_backup.key`` as a rooted phone keeps it
    (a Java-serialized 32-byte array), or a text file holding the 64 hex digits."""
    if data.startswith(_JAVA_BYTE_ARRAY[:4]):
        head = len(_JAVA_BYTE_ARRAY)
        if not data.startswith(_JAVA_BYTE_ARRAY) or len(data) < head + 4:
            raise MalformedKey("a Java-serialized file, but not of a byte array")
        length = int.from_bytes(data[head : head + 4], "big")
        if len(data) != head + 4 + length:
            raise MalformedKey("a Java-serialized byte array of the wrong length (damaged?)")
        if length == _CRYPT14_KEY_BYTES:
            raise MalformedKey(
                "the 'key' file of crypt12/crypt14 backups, which are not supported: crypt15 "
                "backups open with encrypted_backup.key or the 64-digit key"
            )
        if length != KEY_BYTES:
            raise MalformedKey(f"a key file of {length} bytes, not WhatsApp's 32")
        return data[head + 4 :]
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is not None and re.fullmatch(r"[0-9a-fA-F\s]+", text):
        return parse_key_text(text)
    raise MalformedKey(
        "not a WhatsApp key file: expected encrypted_backup.key (a Java-serialized 32-byte "
        "array) or a text file of 64 hex digits"
    )


def key_file_bytes(root_key: bytes) -> bytes:
    """``encrypted_backup.key`` for ``root_key`` (tests, and putting a key back)."""
    return _JAVA_BYTE_ARRAY + len(root_key).to_bytes(4, "big") + root_key


def backup_key(root_key: bytes) -> bytes:
    """The AES-256 key of the backup files: HKDF-SHA256 of the root key with an all-zero
    salt and the info "backup encryption" (WhatsApp's HMAC loop, run once, is HKDF)."""
    if len(root_key) != KEY_BYTES:
        raise MalformedKey(f"a WhatsApp key is {KEY_BYTES} bytes, not {len(root_key)}")
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"backup encryption"
    ).derive(root_key)


# --- the header -----------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    key_type: int | None
    iv: bytes
    info: bytes  # the BackupPrefix's field 4 as written: kept verbatim for export
    length: int  # bytes before the ciphertext (length prefix and protobuf)
    app_version: str | None = None
    jid_suffix: str | None = None
    backup_version: int | None = None
    features: dict[int, int] = field(default_factory=dict)
    unknown_fields: tuple[int, ...] = ()  # numbers of fields this module does not know

    def to_json(self) -> dict[str, object]:
        return {
            "format": "crypt15",
            "key_type": self.key_type,
            "key_type_name": KEY_TYPE_NAMES.get(self.key_type or 0, "unknown"),
            "iv": self.iv.hex(),
            "header_bytes": self.length,
            "app_version": self.app_version,
            "jid_suffix": self.jid_suffix,
            "backup_version": self.backup_version,
            "features": {
                FEATURE_NAMES.get(number, f"field_{number}"): value
                for number, value in sorted(self.features.items())
            },
            "unknown_fields": list(self.unknown_fields),
        }


def read_header(src: BinaryIO) -> Header:
    """Parse the header at the start of ``src``; leaves ``src`` at the ciphertext."""
    head = src.read(2)
    if not head:
        raise Damaged("is empty")
    if head[:1] == b"\x00":
        # crypt12 starts with its cipher version, 00 01; a crypt14/15 header's length is
        # never 0.
        if head == b"\x00\x01":
            raise UnsupportedFormat(
                "is a crypt12 backup, an older format that is not supported (it "
                "opens with the 'key' file, not the 64-digit key)"
            )
        raise UnsupportedFormat("is not a WhatsApp crypt15 backup (unknown header)")
    if len(head) < 2:
        raise Damaged("is truncated: it ends inside its header")
    try:
        length, used = protowire.read_varint(head + src.read(8), 0)
    except WireError:
        raise Damaged("has a damaged header (its length)") from None
    if length > MAX_HEADER_BYTES:
        raise Damaged(f"has a damaged header (a length of {length} bytes)")
    src.seek(used)
    prefix = src.read(length)
    if len(prefix) < length:
        raise Damaged("is truncated: it ends inside its header")
    try:
        return _parse_prefix(prefix, used + length)
    except WireError as exc:
        raise Damaged(f"has a damaged header ({exc})") from None
    except UnicodeDecodeError:
        raise Damaged("has a damaged header (a text field is not UTF-8)") from None


def _parse_prefix(prefix: bytes, total: int) -> Header:
    key_type: int | None = None
    iv: bytes | None = None
    info = b""
    unknown: list[int] = []
    crypt14 = False
    for f in protowire.fields(prefix):
        if f.number == 1 and isinstance(f.value, int):
            key_type = f.value
        elif f.number == 2 and f.wire_type == protowire.LEN:
            crypt14 = True
        elif f.number == 3 and isinstance(f.value, bytes):
            for inner in protowire.fields(f.value):
                if inner.number == 1 and isinstance(inner.value, bytes):
                    iv = inner.value
        elif f.number == 4 and isinstance(f.value, bytes):
            info = f.value
        else:
            unknown.append(f.number)
    if crypt14:
        raise UnsupportedFormat(
            "is a crypt14 backup, an older format that is not supported (it opens "
            "with the 'key' file, not the 64-digit key)"
        )
    if key_type is not None and key_type not in KEY_TYPE_NAMES:
        raise Damaged(f"has a damaged header (a key type {key_type}, which is none of 0 and 1)")
    if iv is None:
        raise Damaged("has a damaged header (no IV: not a crypt15 header)")
    if len(iv) != IV_BYTES:
        raise Damaged(f"has a damaged header (an IV of {len(iv)} bytes, not {IV_BYTES})")
    header = Header(key_type, iv, info, total, unknown_fields=tuple(unknown))
    return _with_info(header, info)


def _with_info(header: Header, info: bytes) -> Header:
    app_version = jid = None
    backup_version = None
    features: dict[int, int] = {}
    unknown = list(header.unknown_fields)
    for f in protowire.fields(info):
        if f.number == 1 and isinstance(f.value, bytes):
            app_version = f.value.decode()
        elif f.number == 3 and isinstance(f.value, bytes):
            jid = f.value.decode()
        elif f.number == 4 and isinstance(f.value, int):
            backup_version = f.value
        elif f.number >= 5 and isinstance(f.value, int):
            features[f.number] = f.value
        else:
            unknown.append(400 + f.number)  # info's own unknown fields: 4xx
    return Header(
        header.key_type,
        header.iv,
        info,
        header.length,
        app_version,
        jid,
        backup_version,
        features,
        tuple(unknown),
    )


def check_info(info: bytes, key_type: int = 1) -> str | None:
    """Why ``info`` cannot be a header's info block written back (a snapshot's manifest may
    hold anything), or None: the header it makes must be one ``read_header`` accepts, with
    text fields free of control characters."""
    try:
        header = read_header(io.BytesIO(serialize_header(bytes(IV_BYTES), info, key_type)))
    except Crypt15Error as exc:
        return str(exc).removeprefix("has ")
    for text in (header.app_version, header.jid_suffix):
        if text is not None and not text.isprintable():
            return "a text field holds control characters"
    return None


def serialize_header(iv: bytes, info: bytes, key_type: int = 1) -> bytes:
    """A crypt15 header: the length-prefixed BackupPrefix."""
    if len(iv) != IV_BYTES:
        raise ValueError("an IV is 16 bytes")
    prefix = (
        protowire.varint_field(1, key_type)
        + protowire.bytes_field(3, protowire.bytes_field(1, iv))
        + (protowire.bytes_field(4, info) if info else b"")
    )
    return protowire.varint(len(prefix)) + prefix


def default_info(app_version: str, jid_suffix: str = "00") -> bytes:
    """A BackupPrefix info for a file that has no recorded header."""
    return protowire.bytes_field(1, app_version.encode()) + protowire.bytes_field(
        3, jid_suffix.encode()
    )


# --- decryption -----------------------------------------------------------------------


@dataclass(frozen=True)
class Decrypted:
    header: Header
    payload: Payload  # what the plaintext was: zlib (written decompressed), zip or raw
    trailer: bool  # the file ended with an MD5 of itself
    bytes_written: int


def _looks_like(start: bytes) -> Payload | None:
    if len(start) >= 2 and start[0] & 0x0F == 8 and (start[0] << 8 | start[1]) % 31 == 0:
        return "zlib"
    if start.startswith(b"PK\x03\x04"):
        return "zip"
    return None


def _size(src: BinaryIO) -> int:
    size = src.seek(0, 2)
    src.seek(0)
    return size


def _has_trailer(src: BinaryIO, size: int) -> bool:
    """Whether the last 16 bytes are the MD5 of everything before them."""
    if size < MD5_BYTES:
        return False
    digest = hashlib.md5(usedforsecurity=False)
    src.seek(0)
    left = size - MD5_BYTES
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise Damaged("changed while it was read")
        digest.update(chunk)
        left -= len(chunk)
    return digest.digest() == src.read(MD5_BYTES)


def decrypt(
    src: BinaryIO, out: BinaryIO, root_key: bytes, max_bytes: int | None = None
) -> Decrypted:
    """Decrypt, verify and decompress ``src`` into ``out``, in chunks, writing at most
    ``max_bytes`` (default ``MAX_PLAIN_BYTES``). Raises a Crypt15Error subclass; then
    whatever reached ``out`` must be thrown away."""
    limit = MAX_PLAIN_BYTES if max_bytes is None else max_bytes
    size = _size(src)
    if size == 0:
        raise Damaged("is empty")
    header = read_header(src)
    trailer = _has_trailer(src, size)
    body_end = size - TAG_BYTES - (MD5_BYTES if trailer else 0)
    if body_end < header.length:
        raise Damaged("is truncated: it ends before its authentication tag")
    src.seek(body_end)
    tag = src.read(TAG_BYTES)
    src.seek(header.length)
    decryptor = Cipher(algorithms.AES(backup_key(root_key)), modes.GCM(header.iv, tag)).decryptor()
    inflater = zlib.decompressobj()
    payload: Payload | None = None
    start = b""
    inflate_error: str | None = None
    written = 0
    left = body_end - header.length
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise Damaged("changed while it was read")
        left -= len(chunk)
        plain = decryptor.update(chunk)
        if payload is None:
            start += plain
            if len(start) < 4 and left:
                continue
            payload = _looks_like(start) or "raw"
            plain, start = start, b""
        if payload == "zlib":
            if inflate_error is None:
                try:
                    written += _inflate_into(inflater, plain, out, written, limit)
                except zlib.error as exc:
                    inflate_error = str(exc)
                else:
                    if inflater.unused_data:
                        inflate_error = "data follows the end of the compressed stream"
            continue
        if written + len(plain) > limit:
            raise _too_big(limit)
        out.write(plain)
        written += len(plain)
    if payload is None:  # a body of under 4 bytes: nothing the app writes
        payload = "raw"
        out.write(start)
        written += len(start)
    try:
        decryptor.finalize()
    except InvalidTag:
        # A wrong key turns the body into noise. A ZIP's signature, or a zlib stream that
        # inflates to its end (its Adler-32 included), does not come out of noise: the key
        # is right, and the file was changed after it was written — even if its MD5
        # trailer matches (recomputed by whoever changed it).
        if payload == "zip" or (payload == "zlib" and inflate_error is None and inflater.eof):
            raise Damaged(
                "opens with this key but fails authentication: it was changed after it was "
                "written" + (" (and its checksum recomputed to match)" if trailer else "")
            ) from None
        if trailer:
            raise KeyMismatch(certain=True) from None
        if payload != "raw":
            raise Damaged(
                "is damaged or cut short: its content fails authentication (it changed "
                "after it was written)"
            ) from None
        raise KeyMismatch(certain=False) from None
    if payload == "zlib":
        if inflate_error is None:
            rest = inflater.flush()
            if written + len(rest) > limit:
                raise _too_big(limit)
            out.write(rest)
            written += len(rest)
        if inflate_error is not None or not inflater.eof:
            raise Damaged(
                "decrypts, but its compressed content is damaged "
                f"({inflate_error or 'the stream ends early'})"
            )
    return Decrypted(header, payload, trailer, written)


def _too_big(limit: int) -> Damaged:
    return Damaged(
        f"decompresses to more than {limit} bytes ({limit / (1 << 30):g} GiB), more than any "
        "WhatsApp backup holds; refused"
    )


def _inflate_into(
    inflater: zlib._Decompress, data: bytes, out: BinaryIO, written: int, limit: int
) -> int:
    """Inflate ``data`` into ``out``, at most CHUNK bytes at a time (a compressed chunk
    can expand a thousandfold, and memory must not follow), refusing to take the output
    past ``limit`` bytes (``written`` already out)."""
    total = 0
    while data:
        piece = inflater.decompress(data, CHUNK)
        total += len(piece)
        if written + total > limit:
            raise _too_big(limit)
        out.write(piece)
        data = inflater.unconsumed_tail
    return total


# --- encryption -----------------------------------------------------------------------


@dataclass(frozen=True)
class Encrypted:
    iv: bytes
    bytes_written: int


def encrypt(
    src: BinaryIO,
    out: BinaryIO,
    root_key: bytes,
    *,
    info: bytes,
    key_type: int = 1,
    compress: bool = True,
    trailer: bool = True,
    iv: bytes | None = None,
) -> Encrypted:
    """Write ``src`` to ``out`` as a crypt15 file, in chunks: zlib-compressed (as the app
    writes a database) or as is (a multi-file ZIP), under a fresh random IV."""
    iv = iv or secrets.token_bytes(IV_BYTES)
    digest = hashlib.md5(usedforsecurity=False)
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        if data:
            out.write(data)
            digest.update(data)
            written += len(data)

    emit(serialize_header(iv, info, key_type))
    encryptor = Cipher(algorithms.AES(backup_key(root_key)), modes.GCM(iv)).encryptor()
    # Level 1, as the app writes (its streams start 78 01).
    deflater = zlib.compressobj(1) if compress else None
    while chunk := src.read(CHUNK):
        emit(encryptor.update(deflater.compress(chunk) if deflater else chunk))
    if deflater:
        emit(encryptor.update(deflater.flush()))
    emit(encryptor.finalize())
    emit(encryptor.tag)
    if trailer:
        final = digest.digest()
        out.write(final)
        written += len(final)
    return Encrypted(iv, written)


def sniff_format(start: bytes, name: str) -> str | None:
    """Which older format a file is, from its name or first bytes; None for crypt15 or
    anything else."""
    match = re.search(r"\.crypt(\d+)$", name)
    if match and match.group(1) != "15":
        return f"crypt{match.group(1)}"
    if start[:2] == b"\x00\x01":
        return "crypt12"
    return None
