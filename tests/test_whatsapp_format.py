"""The crypt15 format module on its own: keys, header, the key derivation against the sample,
streaming in small chunks, and the refusals of other formats."""

from __future__ import annotations

import io
import random

import pytest

from backvault.source.whatsapp import crypt15, protowire
from tests.test_whatsapp import SAMPLE, SAMPLE_DB, SAMPLE_KEY_FILE, SAMPLE_KEY_GROUPED, needs_sample

KEY = random.Random(1).randbytes(32)


def test_the_key_is_read_with_spaces_or_not_in_any_case() -> None:
    text = KEY.hex()
    grouped = " ".join(text[i : i + 4] for i in range(0, 64, 4))
    for typed in (text, text.upper(), grouped, grouped.upper(), f"  {grouped}\n"):
        assert crypt15.parse_key_text(typed) == KEY
    for bad in (text[:-1], text + "0", text[:-1] + "g", "", "correct horse battery staple"):
        with pytest.raises(crypt15.MalformedKey) as caught:
            crypt15.parse_key_text(bad)
        assert "64 hex digits" in str(caught.value)
        assert text[:8] not in str(caught.value)  # the key is never echoed


def test_key_files() -> None:
    assert crypt15.parse_key_file(crypt15.key_file_bytes(KEY)) == KEY
    assert crypt15.parse_key_file(KEY.hex().encode() + b"\n") == KEY
    with pytest.raises(crypt15.MalformedKey, match="crypt12/crypt14"):
        crypt15.parse_key_file(crypt15.key_file_bytes(bytes(131)))
    with pytest.raises(crypt15.MalformedKey, match="wrong length"):
        crypt15.parse_key_file(crypt15.key_file_bytes(KEY)[:-1])
    with pytest.raises(crypt15.MalformedKey, match="not a WhatsApp key file"):
        crypt15.parse_key_file(KEY)  # 32 raw bytes: refused, not guessed
    with pytest.raises(crypt15.MalformedKey, match="not of a byte array"):
        crypt15.parse_key_file(bytes.fromhex("aced0005") + bytes(40))


@needs_sample
def test_the_sample_key_file_and_the_grouped_digits_agree() -> None:
    assert crypt15.parse_key_file(SAMPLE_KEY_FILE.read_bytes()) == crypt15.parse_key_text(
        SAMPLE_KEY_GROUPED
    )


@needs_sample
def test_the_sample_decrypts_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt15, "CHUNK", 1000)
    root = crypt15.parse_key_text(SAMPLE_KEY_GROUPED)
    out = io.BytesIO()
    with open(SAMPLE, "rb") as src:
        done = crypt15.decrypt(src, out, root)
    assert out.getvalue() == SAMPLE_DB.read_bytes()
    assert (done.payload, done.trailer, done.header.length) == ("zlib", True, 131)
    assert done.header.app_version == "2.22.5.13" and done.header.key_type == 1


@needs_sample
def test_the_header_length_is_a_varint_and_reads_like_a_size_byte_and_a_flag() -> None:
    """Other readers see "size byte, then 0x01 when the feature table is there"; as a
    protobuf varint the same two bytes give the same length for every header of 128-255
    bytes, and a short header (no feature table) has a one-byte length."""
    data = SAMPLE.read_bytes()
    assert data[:2] == b"\x81\x01" and protowire.read_varint(data, 0) == (129, 2)
    short = crypt15.serialize_header(bytes(16), crypt15.default_info("2.24.1.1"))
    assert short[0] == len(short) - 1 < 128 and short[1] == 0x08


def test_header_round_trip_keeps_unknown_fields() -> None:
    info = crypt15.default_info("2.24.1.1", "42") + protowire.varint_field(5, 1)
    info += protowire.varint_field(38, 123456) + protowire.varint_field(77, 1)
    header_bytes = crypt15.serialize_header(bytes(range(16)), info)
    header = crypt15.read_header(io.BytesIO(header_bytes + b"body"))
    assert header.info == info and header.iv == bytes(range(16))
    assert (header.app_version, header.jid_suffix) == ("2.24.1.1", "42")
    assert header.features == {5: 1, 38: 123456, 77: 1}
    assert header.length == len(header_bytes)


def test_encrypt_then_decrypt_streams_both_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypt15, "CHUNK", 777)
    plain = random.Random(2).randbytes(50_000) * 3
    for compress, trailer in ((True, True), (False, False), (True, False)):
        src = io.BytesIO((b"PK\x03\x04" if not compress else b"") + plain)
        enc = io.BytesIO()
        crypt15.encrypt(src, enc, KEY, info=b"", compress=compress, trailer=trailer)
        out = io.BytesIO()
        done = crypt15.decrypt(io.BytesIO(enc.getvalue()), out, KEY)
        assert out.getvalue() == src.getvalue()
        assert done.trailer is trailer
        assert done.payload == ("zlib" if compress else "zip")


def test_older_formats_say_which_they_are() -> None:
    crypt14 = protowire.varint_field(1, 0) + protowire.bytes_field(
        2, protowire.bytes_field(5, bytes(16))
    )
    with pytest.raises(crypt15.UnsupportedFormat, match="crypt14"):
        crypt15.read_header(io.BytesIO(protowire.varint(len(crypt14)) + crypt14 + bytes(64)))
    with pytest.raises(crypt15.UnsupportedFormat, match="crypt12"):
        crypt15.read_header(io.BytesIO(b"\x00\x01\x02" + bytes(100)))
    assert crypt15.sniff_format(b"", "msgstore.db.crypt14") == "crypt14"
    assert crypt15.sniff_format(b"", "msgstore.db.crypt15") is None


def test_damaged_headers_are_named() -> None:
    for data, words in (
        (b"", "is empty"),
        (b"\x05", "truncated"),
        (b"\x7f\x08\x01", "truncated"),
        (b"\x04\x08\x01\x22\x09", "damaged header"),
        (b"\x02\x08\x01", "no IV"),
        (b"\xff\xff\xff\x01", "damaged header"),
    ):
        with pytest.raises(crypt15.Damaged, match=words):
            crypt15.read_header(io.BytesIO(data))
