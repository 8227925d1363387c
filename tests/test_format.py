"""restic format pieces: encoders round-trip, parsers reject garbage with FormatError."""

from __future__ import annotations

import json
import random
import re
import stat
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backvault.repo import format as fmt
from backvault.repo import timefmt
from backvault.repo.format import (
    BlobType,
    ContentIds,
    FormatError,
    IndexFile,
    Lock,
    Node,
    PackedBlob,
    Snapshot,
)
from backvault.repo.polynomial import is_irreducible, random_irreducible
from backvault.repo.timefmt import format_ns, parse_ns

ids = st.binary(min_size=32, max_size=32)
u32 = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def packed_blobs(draw: st.DrawFn) -> list[PackedBlob]:
    blobs = []
    offset = 0
    for _ in range(draw(st.integers(0, 20))):
        length = draw(st.integers(32, 10_000))
        compressed = draw(st.booleans())
        blobs.append(
            PackedBlob(
                draw(ids),
                draw(st.sampled_from(list(BlobType))),
                offset,
                length,
                draw(u32) if compressed else None,
            )
        )
        offset += length
    return blobs


@given(packed_blobs())
def test_pack_header_round_trip(blobs: list[PackedBlob]) -> None:
    assert fmt.decode_pack_header(fmt.encode_pack_header(blobs)) == blobs


@given(packed_blobs())
def test_a_pack_s_blobs_kept_as_its_header_read_back_the_same(blobs: list[PackedBlob]) -> None:
    kept = fmt.compact_pack_blobs(blobs)
    assert isinstance(kept, fmt.PackBlobs)
    assert len(kept) == len(blobs) and list(kept) == blobs and all(b in kept for b in blobs)
    absent = PackedBlob(b"\xee" * 32, BlobType.DATA, 0, 32)
    assert (absent in kept) == (absent in blobs)


def test_blobs_not_back_to_back_from_the_start_are_kept_as_they_are() -> None:
    """Their header would not say where they are: the list is kept."""
    gap = [
        PackedBlob(b"\x01" * 32, BlobType.DATA, 0, 100),
        PackedBlob(b"\x02" * 32, BlobType.DATA, 150, 100),
    ]
    late = [PackedBlob(b"\x01" * 32, BlobType.DATA, 10, 100)]
    assert fmt.compact_pack_blobs(gap) is gap and fmt.compact_pack_blobs(late) is late


@given(st.binary(max_size=200))
def test_pack_header_parser_only_raises_format_error(data: bytes) -> None:
    try:
        fmt.decode_pack_header(data)
    except fmt.FormatError:
        pass


def test_pack_header_layout_matches_design_doc() -> None:
    blob = PackedBlob(b"\x11" * 32, BlobType.TREE, 0, 100, 250)
    raw = fmt.encode_pack_header([blob])
    assert raw == b"\x03" + (100).to_bytes(4, "little") + (250).to_bytes(4, "little") + b"\x11" * 32
    plain = PackedBlob(b"\x22" * 32, BlobType.DATA, 0, 64)
    assert fmt.encode_pack_header([plain]) == b"\x00" + (64).to_bytes(4, "little") + b"\x22" * 32


@given(st.lists(packed_blobs(), max_size=4), st.lists(ids, max_size=2))
def test_index_round_trip(packs: list[list[PackedBlob]], supersedes: list[bytes]) -> None:
    index = IndexFile({bytes([i]) * 32: blobs for i, blobs in enumerate(packs)}, supersedes)
    doc = json.loads(json.dumps(index.to_json()))
    again = IndexFile.from_json(doc)
    assert again.packs == {k: v for k, v in index.packs.items()}
    assert again.supersedes == supersedes


def test_index_omits_uncompressed_length_for_plain_blobs() -> None:
    index = IndexFile({b"\x01" * 32: [PackedBlob(b"\x02" * 32, BlobType.DATA, 0, 40)]})
    blob = index.to_json()["packs"][0]["blobs"][0]
    assert "uncompressed_length" not in blob and blob["type"] == "data"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(json_values)
def test_structured_parsers_only_raise_format_error(doc: object) -> None:
    for parser in (
        IndexFile.from_json,
        Snapshot.from_json,
        Lock.from_json,
        Node.from_json,
        fmt.Config.from_json,
    ):
        try:
            parser(doc)
        except fmt.FormatError:
            pass


@settings(max_examples=200)
@given(st.binary(max_size=100))
def test_unpacked_and_tree_decoders_only_raise_format_error(data: bytes) -> None:
    for decoder in (fmt.decode_unpacked, fmt.decode_tree):
        try:
            decoder(data)
        except fmt.FormatError:
            pass


@given(json_values, st.booleans())
def test_unpacked_round_trip(doc: object, compress: bool) -> None:
    if not isinstance(doc, dict | list):
        doc = {"value": doc}
    encoded = fmt.encode_unpacked(doc, compress=compress)
    assert encoded[0] == (2 if compress else ord(json.dumps(doc)[0]))
    assert fmt.decode_unpacked(encoded) == doc


names = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
).filter(lambda n: n not in (".", ".."))


link_targets = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=10,
)


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    kind = draw(st.sampled_from(["file", "dir", "symlink"]))
    return Node(
        name=draw(names),
        type=kind,
        mode=draw(u32),
        mtime=format_ns(draw(st.integers(0, 2**62))),
        uid=draw(u32),
        gid=draw(u32),
        user=draw(st.text(max_size=5)),
        inode=draw(st.integers(0, 2**63)),
        size=draw(st.integers(0, 2**40)) if kind == "file" else 0,
        linktarget=draw(link_targets) if kind == "symlink" else "",
        content=draw(st.lists(ids, max_size=3)) if kind == "file" else None,
        subtree=draw(ids) if kind == "dir" else None,
    )


@given(st.lists(nodes(), max_size=6, unique_by=lambda n: n.name))
def test_tree_round_trip_sorted(tree: list[Node]) -> None:
    encoded = fmt.encode_tree(tree)
    assert encoded.endswith(b"\n")
    decoded = fmt.decode_tree(encoded)
    assert [n.name for n in decoded] == sorted((n.name for n in tree), key=lambda s: s.encode())
    assert sorted(decoded, key=lambda n: n.name) == sorted(tree, key=lambda n: n.name)


def test_tree_rejects_duplicates_and_unsafe_names() -> None:
    with pytest.raises(fmt.FormatError):
        fmt.encode_tree([Node("a", "file", content=[]), Node("a", "file", content=[])])
    for bad in ("..", ".", "a/b", "", "a\x00b", "\ud800"):
        with pytest.raises(fmt.FormatError, match="unsafe name"):
            fmt.decode_tree(json.dumps({"nodes": [{"name": bad, "type": "file"}]}).encode())


def tree_json(*nodes: dict[str, object]) -> bytes:
    return json.dumps({"nodes": list(nodes)}).encode() + b"\n"


def test_tree_decoder_refuses_what_would_lead_a_restore_astray() -> None:
    sub = {"subtree": "00" * 32}
    cases = {
        # A folder and a symlink of one name: a restore would write into the symlink.
        "duplicate name 'd'": [
            {"name": "d", "type": "dir", **sub},
            {"name": "d", "type": "symlink", "linktarget": "/etc"},
        ],
        "duplicate name 'v'": [
            {"name": "v", "type": "symlink", "linktarget": "/etc/passwd"},
            {"name": "v", "type": "file"},
        ],
        # "é" and its UTF-8 bytes as surrogate escapes are the same name on disk.
        "duplicate name": [
            {"name": "é", "type": "dir", **sub},
            {"name": "\udcc3\udca9", "type": "symlink", "linktarget": "/"},
        ],
        "unknown type 'hardlink'": [{"name": "x", "type": "hardlink"}],
        "unknown type ''": [{"name": "x", "type": ""}],
        "unusable link target (it contains NUL)": [
            {"name": "x", "type": "symlink", "linktarget": "/etc\x00"}
        ],
        "unusable link target (it is not a file name": [
            {"name": "x", "type": "symlink", "linktarget": "\ud800"}
        ],
    }
    for message, tree in cases.items():
        with pytest.raises(fmt.FormatError, match=re.escape(message)):
            fmt.decode_tree(tree_json(*tree))


def test_tree_decoder_refuses_numbers_the_system_cannot_take() -> None:
    """restic's own types bound them (uid and gid are 32 bits, device numbers 64, a size
    is a file offset): beyond, a root restore crashed with OverflowError in chown or
    mknod, and check passed the tree."""
    limits = {"mode": 32, "uid": 32, "gid": 32, "inode": 64, "device_id": 64}
    limits |= {"size": 63, "links": 64, "device": 64}
    for key, bits in limits.items():
        largest = fmt.decode_tree(tree_json({"name": "x", "type": "file", key: 2**bits - 1}))
        assert getattr(largest[0], key) == 2**bits - 1
        with pytest.raises(fmt.FormatError, match=re.escape(f"has {key} {2**bits}, out of range")):
            fmt.decode_tree(tree_json({"name": "x", "type": "file", key: 2**bits}))


def test_expansion_counts_a_shared_tree_once_per_folder_and_adds_it_up_once() -> None:
    leaf, middle, top = b"L" * 32, b"M" * 32, b"T" * 32
    shapes = {
        leaf: fmt.TreeShape(entries=1, file_bytes=10, subtrees=()),
        middle: fmt.TreeShape(entries=2, file_bytes=0, subtrees=(leaf, leaf)),
        top: fmt.TreeShape(entries=3, file_bytes=5, subtrees=(middle, middle, b"?" * 32)),
    }
    asked: list[bytes] = []

    def shape(tree: bytes) -> fmt.TreeShape | None:
        asked.append(tree)
        return shapes.get(tree)

    memo: dict[bytes, tuple[int, int]] = {}
    # top: 3 entries + 2 x middle (2 + 2 x 1) = 11; bytes 5 + 2 x 2 x 10 = 45; "?" unreadable
    assert fmt.expanded_totals(top, shape, memo) == (11, 45)
    assert len(asked) <= 2 * len(shapes) + 1
    chain = {bytes([i]) * 32: fmt.TreeShape(2, 0, (bytes([i + 1]) * 32,) * 2) for i in range(60)}
    chain[bytes([60]) * 32] = fmt.TreeShape(1, 1, ())
    assert fmt.expanded_totals(bytes(32), chain.get, {}) == (3 * 2**60 - 2, 2**60)


def test_tree_decoder_accepts_every_type_restic_writes() -> None:
    tree = [{"name": kind, "type": kind} for kind in fmt.NODE_TYPES if kind != "dir"]
    tree.append({"name": "dir", "type": "dir", "subtree": "00" * 32})
    tree.append({"name": "\udcff", "type": "file"})  # a name that is not UTF-8, escaped
    decoded = fmt.decode_tree(tree_json(*tree))
    assert sorted(n.type for n in decoded) == sorted([*fmt.NODE_TYPES, "file"])


def test_restic_node_json_shape() -> None:
    node = Node(
        "a.txt",
        "file",
        mode=0o644,
        mtime="2020-01-01T00:00:00Z",
        uid=0,
        gid=0,
        size=6,
        links=1,
        content=[b"\x01" * 32],
    )
    doc = node.to_json()
    assert doc["content"] == ["01" * 32] and "subtree" not in doc and doc["uid"] == 0
    directory = Node("d", "dir", mode=fmt.GO_MODE_DIR | 0o755, subtree=b"\x02" * 32)
    assert directory.to_json()["content"] is None


@given(st.integers(0, 2**62))
def test_time_round_trip(ns: int) -> None:
    assert parse_ns(format_ns(ns)) == ns
    assert parse_ns(format_ns(ns, local=False)) == ns


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/St_Johns", "Asia/Kolkata"])
def test_times_format_as_through_datetime(monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """The fast path of ``format_ns`` writes what the datetime one did, in zones with
    summer time, half-hour offsets and none, for times before 1970 too."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    timefmt._whole_seconds.cache_clear()
    try:
        rng = random.Random(zone)
        times = [0, 1, -1, 10**9, -(10**9), 1_711_846_800 * 10**9, 253_402_300_799 * 10**9]
        times += [rng.randrange(-(2**61), 2**61) for _ in range(3000)]
        for ns in times:
            for local in (True, False):
                assert _formatted(format_ns, ns, local) == _formatted(
                    timefmt._format_ns_by_datetime, ns, local
                ), ns
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
        timefmt._whole_seconds.cache_clear()


def _formatted(how: Callable[[int, bool], str], ns: int, local: bool) -> str:
    try:
        return how(ns, local)
    except OverflowError:
        return "out of range"


def test_time_parses_restic_forms() -> None:
    assert parse_ns("2015-01-02T18:10:13.48307196+01:00") == 1420218613483071960
    assert parse_ns("2026-11-27T08:58:30Z") == 1795769910 * 10**9
    assert format_ns(1_000_000_000_500, local=False) == "1970-01-01T00:16:40.0000005Z"


@pytest.mark.parametrize(
    ("unix", "go"),
    [
        (stat.S_IFREG | 0o644, 0o644),
        (stat.S_IFDIR | 0o755, 2147484141),
        (stat.S_IFLNK | 0o777, 134218239),
        (stat.S_IFDIR | stat.S_ISVTX | 0o777, 2148532735),
        (stat.S_IFREG | stat.S_ISUID | 0o755, (1 << 23) | 0o755),
    ],
)
def test_go_file_modes_match_restic(unix: int, go: int) -> None:
    # The expected values are what restic 0.14 wrote for the same files.
    assert fmt.go_mode_from_unix(unix) == go
    assert fmt.unix_permissions_from_go(go) == unix & 0o7777


def test_chunker_polynomials() -> None:
    assert is_irreducible(0x25B468838DCB75)  # the example in restic's design.rst
    poly = random_irreducible()
    assert poly.bit_length() == 54 and is_irreducible(poly)
    assert not is_irreducible((1 << 53) | (1 << 1))  # divisible by x


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 1023, 1024, 3000, 4097, 9000]), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_tree_with_long_content_lists_is_encoded_as_json_dumps_would(
    sizes: list[int], seed: int
) -> None:
    """encode_tree writes long content lists itself (memory): the same bytes as the
    plain JSON encoding, and decoded back to the same ids."""
    rng = random.Random(seed)
    nodes = [
        Node(name=f"f{i}", type="file", size=n, content=[rng.randbytes(32) for _ in range(n)])
        for i, n in enumerate(sizes)
    ]
    nodes.append(Node(name="sub", type="dir", subtree=rng.randbytes(32)))
    encoded = fmt.encode_tree(nodes)
    parts = fmt.tree_parts(nodes)
    assert b"".join(parts()) == encoded and b"".join(parts()) == encoded  # again, the same
    plain = {"nodes": [n.to_json() for n in sorted(nodes, key=fmt.tree_order)]}
    assert encoded == json.dumps(plain, separators=(",", ":")).encode() + b"\n"
    decoded = {n.name: n.content for n in fmt.decode_tree(encoded)}
    assert all(decoded[n.name] == n.content for n in nodes)
    # Content as read back or as stored (``ContentIds``) encodes to the same bytes.
    for node in nodes:
        if node.content is not None:
            node.content = ContentIds.of(node.content)
    assert fmt.encode_tree(nodes) == encoded
    assert all(decoded[n.name] == n.content for n in nodes)


def test_content_ids_read_as_the_list_of_ids() -> None:
    rng = random.Random(3)
    ids = [rng.randbytes(32) for _ in range(10)]
    content = ContentIds.of(ids)
    assert len(content) == 10 and list(content) == ids and content == ids and ids == content
    assert content == tuple(ids) and content != ids[:-1] and content != [*ids[:-1], b"x" * 32]
    assert content[0] == ids[0] and content[-1] == ids[-1] and content[3] == ids[3]
    for part in (slice(2, 5), slice(None, None, 2), slice(8, 2), slice(-3, None), slice(0, 99)):
        assert content[part] == ids[part] and isinstance(content[part], ContentIds)
    with pytest.raises(IndexError):
        content[10]
    with pytest.raises(IndexError):
        content[-11]
    with pytest.raises(TypeError):
        hash(content)
    assert content == ContentIds(b"".join(ids)) and ContentIds() == [] and not ContentIds()
    with pytest.raises(FormatError):
        ContentIds(b"x" * 33)
    with pytest.raises(FormatError):
        ContentIds.of([b"x" * 31, b"y" * 33])
    assert content != [b"x" * 31 + ids[0][:1], *ids[1:]]
    node = Node("f", "file", content=ids)
    assert node == Node("f", "file", content=content)
    texts = [i.hex() for i in ids]
    assert fmt.parse_content(list(texts), "content") == fmt.parse_ids(list(texts)) == ids
    with pytest.raises(FormatError, match="content of x"):
        fmt.parse_content([*texts[:3], "zz" * 32], "content of x")


def _usual_decode(raw: bytes) -> list[Node] | str:
    try:
        return fmt.tree_nodes(fmt.decode_tree_json(fmt.tree_text(raw)))
    except FormatError as exc:
        return f"FormatError: {exc}"


def _decoded(raw: bytes) -> list[Node] | str:
    try:
        return fmt.decode_tree(raw)
    except FormatError as exc:
        return f"FormatError: {exc}"


def test_long_content_lists_read_from_the_bytes_decode_as_json_would() -> None:
    """decode_tree takes long content lists out of the JSON text (memory); whatever the
    tree holds around them — a list under "content" in another object, two "content"
    keys, the pattern inside a name, upper-case hex, invalid JSON after it — it decodes
    to what the plain JSON decoding gives, or refuses it alike."""
    rng = random.Random(5)
    ids = [rng.randbytes(32) for _ in range(1500)]
    hexed = ",".join(f'"{i.hex()}"' for i in ids)
    upper = ",".join(f'"{i.hex().upper()}"' for i in ids)
    short = ",".join(f'"{i.hex()}"' for i in ids[:3])
    file_head = '{"name":"%s","type":"file","mode":420,"size":0'
    trees = {
        "plain": f'{{"nodes":[{file_head % "a"},"content":[{hexed}]}}]}}\n',
        "two files, a short list between": (
            f'{{"nodes":[{file_head % "a"},"content":[{hexed}]}},'
            f'{file_head % "b"},"content":[{short}]}},{file_head % "c"},"content":[{hexed}]}}]}}'
        ),
        "content first in its object": f'{{"nodes":[{{"content":[{hexed}],"name":"a","type":"file"}}]}}',
        "a list under content in an attribute object": (
            f'{{"nodes":[{file_head % "a"},"generic_attributes":{{"content":[{hexed}]}},'
            f'"content":[{short}]}}]}}'
        ),
        "two content keys (the last counts)": (
            f'{{"nodes":[{file_head % "a"},"content":[{hexed}],"content":[{short}]}}]}}'
        ),
        "the pattern inside a name": (
            '{"nodes":[{"name":"x\\",\\"content\\":[' + hexed.replace('"', '\\"') + ']",'
            '"type":"file","content":[' + short + "]}]}"
        ),
        "upper-case hex": f'{{"nodes":[{file_head % "a"},"content":[{upper}]}}]}}',
        "a name that ends before the pattern (invalid)": (
            f'{{"nodes":[{{"name":"a,"content":[{hexed}]}}]}}'
        ),
        "invalid after the list": f'{{"nodes":[{file_head % "a"},"content":[{hexed}]}}]',
        "not an object of nodes": f'[{{"content":[{hexed}]}}]',
        "nodes not objects": f'{{"nodes":[1,{file_head % "a"},"content":[{hexed}]}}]}}',
        "a node whose content is the token's form": (
            f'{{"nodes":[{file_head % "a"},"content":"abc:0"}},'
            f'{file_head % "b"},"content":[{hexed}]}}]}}'
        ),
    }
    for label, text in trees.items():
        raw = text.encode()
        assert _decoded(raw) == _usual_decode(raw), label
    plain = fmt.decode_tree(trees["plain"].encode())
    assert plain[0].content == ids and isinstance(plain[0].content, ContentIds)
    assert isinstance(
        _decoded(trees["a name that ends before the pattern (invalid)"].encode()), str
    )
