"""The protobuf wire format, just as far as a crypt15 header needs it: varints and
length-delimited fields, read strictly and written canonically.

Why not the ``protobuf`` package: the header is four fields and one nested message, read
once per file; a full protobuf runtime (a C extension with its own version churn) for that
is more code to trust than these sixty lines. Unknown fields are kept as raw bytes, so a
header written by a newer app survives an import → export round trip unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5

_MAX_VARINT_BYTES = 10


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    value: int | bytes  # an int for VARINT, the raw bytes otherwise
    raw: bytes  # the whole field as written (tag and value)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise WireError("a number runs past the end of the message")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise WireError("a number is longer than 10 bytes")


def fields(data: bytes) -> Iterator[Field]:
    """The fields of a message, in order; raises WireError on anything malformed."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = read_varint(data, pos)
        elif wire_type == LEN:
            length, pos = read_varint(data, pos)
            if pos + length > len(data):
                raise WireError(f"field {number} runs past the end of the message")
            value, pos = data[pos : pos + length], pos + length
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > len(data):
                raise WireError(f"field {number} runs past the end of the message")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise WireError(f"field {number} has wire type {wire_type}, which is not used here")
        yield Field(number, wire_type, value, data[start:pos])


def varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative numbers are not written here")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    return varint(number << 3 | VARINT) + varint(value)


def bytes_field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | LEN) + varint(len(value)) + value
