"""restic's AES-256-CTR + Poly1305-AES, key files and the 64-digit key."""

from __future__ import annotations

import itertools
import json
import os
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backvault.crypto import recovery_key
from backvault.crypto.aead import AuthenticationFailed, Key
from backvault.crypto.keyfile import KeyFile, KeyFileError, WrongSecret
from backvault.crypto.slotlabel import SlotLabel


def test_poly1305_aes_matches_bernstein_paper_example() -> None:
    # "The Poly1305-AES message-authentication code", Appendix B, first example.
    key = Key(
        bytes(32),
        bytes.fromhex("ec074c835580741701425b623235add6"),
        bytes.fromhex("851fc40c3467ac0be05cc20404f3f700"),
    )
    nonce = bytes.fromhex("fb447350c4e868c52ac3275cf9d4327e")
    assert key._mac(nonce, bytes.fromhex("f3f6")).hex() == "f4c633c3044fc145f84f335cb81953de"


@settings(max_examples=50)
@given(st.binary(max_size=5000))
def test_seal_open_round_trip(data: bytes) -> None:
    key = Key.generate()
    sealed = key.seal(data)
    assert len(sealed) == len(data) + 32
    assert key.open(sealed) == data


def test_one_decryptor_per_thread_opens_every_message_as_a_fresh_cipher_would() -> None:
    """Opening reuses one AES-CTR context per thread, moved to each message's IV
    (reset_nonce): messages of odd lengths, one after another, through ``open`` and
    ``open_into``, each decrypt as a new AES-CTR context of their IV does (and as restic
    does), whatever was decrypted before."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = Key.generate()
    messages = [bytes([n % 251]) * n for n in (0, 1, 15, 17, 33, 4095, 4097, 16, 7, 100_003)]
    out = bytearray(200_000)
    for data in messages + messages[::-1]:
        sealed = key.seal(data)
        fresh = Cipher(algorithms.AES(key.encrypt), modes.CTR(sealed[:16])).decryptor()
        assert fresh.update(sealed[16:-16]) + fresh.finalize() == data
        assert key.open(sealed) == data
        assert key.open_into(sealed, out) == data
        assert key.open_into(sealed, memoryview(out)[5:]) == data
        with pytest.raises(AuthenticationFailed):
            key.open_into(sealed[:-1] + bytes([sealed[-1] ^ 1]), out)


@pytest.mark.parametrize("room", [17, 32, 1000, 4096 + 16, 300_000])
def test_opening_in_slices_gives_the_plaintext_only_after_the_mac(room: int) -> None:
    """``open_in_slices`` (check's way with large blobs): slices of any size join to what
    ``open`` gives, whatever was opened before on the thread; a damaged message yields
    nothing before its MAC fails; a buffer with no room past an AES block is refused."""
    key = Key.generate()
    out = bytearray(room)
    for data in [b"", b"x", bytes(range(256)) * 41, random.Random(room).randbytes(100_003)]:
        sealed = key.seal(data)
        key.open(key.seal(b"another message first"))
        slices = [bytes(s) for s in key.open_in_slices(sealed, out)]
        assert b"".join(slices) == data
        assert all(len(s) <= room - 16 for s in slices)
        damaged = (
            sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]
            if len(sealed) > 40
            else sealed[:-1] + bytes([sealed[-1] ^ 1])
        )
        seen: list[bytes] = []
        with pytest.raises(AuthenticationFailed):
            for piece in key.open_in_slices(damaged, out):
                seen.append(bytes(piece))
        assert seen == []
    with pytest.raises(ValueError, match="too small"):
        list(key.open_in_slices(key.seal(b"abc"), bytearray(16)))


def test_slices_are_right_whatever_the_thread_opens_between_them() -> None:
    """(From a red-team session.) ``open_in_slices`` decrypts with a context of its own:
    opening, sealing or slicing another message on the same thread between two of its
    slices changes none of them."""
    key = Key.generate()
    rng = random.Random(2)
    for room in (17, 33, 4096 + 16):
        a, b = rng.randbytes(3 * room + 5), rng.randbytes(2 * room + 1)
        first, second = (
            key.open_in_slices(key.seal(a), bytearray(room)),
            key.open_in_slices(key.seal(b), bytearray(room)),
        )
        got_a, got_b = [bytes(next(first))], []
        key.open(key.seal(b"between"))
        for piece_b in second:
            got_b.append(bytes(piece_b))
            got_a.extend(bytes(piece) for piece in itertools.islice(first, 1))
        got_a.extend(bytes(piece) for piece in first)
        assert b"".join(got_a) == a and b"".join(got_b) == b


def test_every_bit_flip_is_detected() -> None:
    key = Key.generate()
    sealed = key.seal(b"hello restic")
    for i in range(len(sealed) * 8):
        damaged = bytearray(sealed)
        damaged[i // 8] ^= 1 << (i % 8)
        with pytest.raises(AuthenticationFailed):
            key.open(bytes(damaged))


def test_wrong_key_and_truncation_are_detected() -> None:
    sealed = Key.generate().seal(b"data")
    with pytest.raises(AuthenticationFailed):
        Key.generate().open(sealed)
    with pytest.raises(AuthenticationFailed):
        Key.generate().open(sealed[:20])


def test_same_plaintext_gives_different_ciphertexts() -> None:
    key = Key.generate()
    assert key.seal(b"x") != key.seal(b"x")


def test_key_file_round_trip_and_wrong_secret() -> None:
    master = Key.generate()
    label = SlotLabel.password("https://vault.example", "ana")
    key_file = KeyFile.create(
        master, b"secret", created="2020-01-01T00:00:00Z", label=label, n=1024
    )
    parsed = KeyFile.from_bytes(key_file.to_bytes())
    assert parsed.open(b"secret") == master
    assert parsed.read_label(master) == label and parsed.read_label(Key.generate()) is None
    with pytest.raises(WrongSecret):
        parsed.open(b"other")
    doc = json.loads(key_file.to_bytes())
    assert doc["kdf"] == "scrypt" and doc["N"] == 1024 and len(doc["salt"]) > 40


@pytest.mark.parametrize(
    "raw",
    [b"", b"{}", b"[]", b'{"kdf":"argon"}', b'{"kdf":"scrypt","N":3,"r":8,"p":1}', b"\xff"],
)
def test_bad_key_files_are_rejected(raw: bytes) -> None:
    with pytest.raises(KeyFileError):
        KeyFile.from_bytes(raw)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_key_file_parser_only_raises_key_file_error(raw: bytes) -> None:
    try:
        KeyFile.from_bytes(raw)
    except KeyFileError:
        pass


# --- the 64-digit key ------------------------------------------------------------------

SECRET = bytes(range(32))


def test_display_is_16_groups_of_4() -> None:
    shown = recovery_key.display(SECRET)
    groups = shown.split(" ")
    assert len(groups) == 16 and all(len(g) == 4 for g in groups)
    assert "".join(groups) == recovery_key.canonical(SECRET) == SECRET.hex()


@pytest.mark.parametrize(
    "typed",
    [
        SECRET.hex(),
        SECRET.hex().upper(),
        recovery_key.display(SECRET),
        recovery_key.display(SECRET).replace(" ", "-"),
        "\n".join(recovery_key.display(SECRET).split(" ")),
        "  " + recovery_key.display(SECRET).upper().replace(" ", " - ") + "\n",
    ],
    ids=["canonical", "upper", "groups", "dashes", "lines", "mixed"],
)
def test_parse_tolerates_spaces_dashes_lines_and_case(typed: str) -> None:
    assert recovery_key.parse(typed) == SECRET


def test_non_hex_character_names_its_group() -> None:
    groups = recovery_key.display(SECRET).split(" ")
    groups[6] = "00g0"
    with pytest.raises(recovery_key.MalformedKey, match=r"group 7 contains 'g'"):
        recovery_key.parse(" ".join(groups))


def test_lookalike_character_gets_a_hint() -> None:
    text = SECRET.hex()[:10] + "o" + SECRET.hex()[11:]
    with pytest.raises(recovery_key.MalformedKey, match=r"group 3 .*did you mean '0'"):
        recovery_key.parse(text)


def test_short_group_is_named() -> None:
    groups = recovery_key.display(SECRET).split(" ")
    groups[4] = groups[4][:3]
    with pytest.raises(recovery_key.MalformedKey, match=r"group 5 \('[0-9a-f]{3}'\) has 3 digits"):
        recovery_key.parse(" ".join(groups))


def test_missing_group_is_named() -> None:
    groups = recovery_key.display(SECRET).split(" ")[:15]
    with pytest.raises(recovery_key.MalformedKey, match=r"60 digits, it needs 64: group 16"):
        recovery_key.parse(" ".join(groups))


def test_extra_digits_are_reported() -> None:
    with pytest.raises(recovery_key.MalformedKey, match=r"68 digits"):
        recovery_key.parse(SECRET.hex() + "abcd")


@given(st.binary(min_size=32, max_size=32))
def test_display_parse_round_trip(secret: bytes) -> None:
    assert recovery_key.parse(recovery_key.display(secret)) == secret


@settings(max_examples=300)
@given(st.text(max_size=100))
def test_parse_only_raises_malformed_key(text: str) -> None:
    try:
        assert len(recovery_key.parse(text)) == 32
    except recovery_key.MalformedKey:
        pass


def test_ivs_are_fresh_across_seals_threads_and_forks() -> None:
    """IVs come from a per-thread draw of ``secrets``: never repeated within a process,
    between threads, or by a forked child continuing its parent's draw."""
    key = Key.generate()
    ivs = [key.seal(b"x")[:16] for _ in range(1000)]
    found: list[bytes] = []
    thread = threading.Thread(target=lambda: found.extend(key.seal(b"y")[:16] for _ in range(300)))
    thread.start()
    thread.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next IV must not be the parent's next one
        os.write(write, key.seal(b"z")[:16])
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 16)
    os.close(read)
    os.close(write)
    parent_next = key.seal(b"z")[:16]
    everything = [*ivs, *found, child, parent_next]
    assert len(set(everything)) == len(everything)


def test_the_reused_encryptor_gives_the_keystream_of_a_fresh_one() -> None:
    """Sealing moves one AES-CTR context per thread to each blob's IV: after blobs of odd
    lengths (a partial block left over), the next must still be exactly AES-CTR from its
    own IV."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = Key.generate()
    for length in (1, 15, 16, 17, 8191, 8192, 100_003, 0, 33):
        iv, data = os.urandom(16), os.urandom(length)
        fresh = Cipher(algorithms.AES(key.encrypt), modes.CTR(iv)).encryptor().update(data)
        assert key._ctr(iv).update(data) == fresh
        sealed = key.seal(data)
        assert key.open(sealed) == data


def test_sealing_in_parts_is_sealing_the_parts_joined() -> None:
    """``seal_parts`` gives what ``seal`` of the joined parts would (same IV draw aside):
    ``open`` of the parts joined returns the joined plaintext, and a flipped byte in any
    part fails."""
    key = Key.generate()
    parts = [b"", b"a" * 17, memoryview(b"b" * 4096), bytes(range(256)) * 9, b"z"]
    sealed = b"".join(key.seal_parts(parts))
    joined = b"".join(bytes(p) for p in parts)
    assert key.open(sealed) == joined
    assert len(sealed) == len(joined) + 32
    for at in (0, 16, len(sealed) // 2, len(sealed) - 1):
        damaged = sealed[:at] + bytes([sealed[at] ^ 1]) + sealed[at + 1 :]
        with pytest.raises(AuthenticationFailed):
            key.open(damaged)
    assert key.seal_parts([]) != key.seal_parts([])  # a fresh IV each time


def test_sealing_in_parts_with_one_iv_is_byte_for_byte_seal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = Key.generate()
    iv = bytes(range(16))
    monkeypatch.setattr(Key, "_fresh_iv", lambda self: iv)
    parts = [b"x" * 1000, memoryview(b"y" * 70_000), b"", b"end"]
    assert b"".join(key.seal_parts(parts)) == key.seal(b"".join(bytes(p) for p in parts))
