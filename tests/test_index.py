"""The compact in-memory index answers exactly as the dict of objects it replaced."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable

import pytest
import zstandard

from backvault.repo import format as fmt
from backvault.repo import index as index_module
from backvault.repo.blobs import BlobLocation
from backvault.repo.format import BlobType, FormatError, IndexFile, PackedBlob
from backvault.repo.index import Index, IndexBuilder, index_columns, index_columns_of_json


class DictIndex:
    """The index as it was (a dict of objects by id): what the compact one must answer."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, BlobLocation] = {}
        self.other_type: dict[bytes, BlobLocation] = {}
        self.packs: dict[bytes, list[PackedBlob]] = {}

    @classmethod
    def of_files(cls, files: Iterable[IndexFile]) -> DictIndex:
        index = cls()
        packs: dict[bytes, dict[tuple[bytes, int], PackedBlob]] = {}
        for file in files:
            for pack_id, blobs in file.packs.items():
                entries = packs.setdefault(pack_id, {})
                for blob in blobs:
                    index.add_location(pack_id, blob)
                    entries[(blob.id, blob.offset)] = blob
        index.packs = {
            pack_id: sorted(entries.values(), key=lambda b: b.offset)
            for pack_id, entries in packs.items()
        }
        return index

    def add_location(self, pack_id: bytes, blob: PackedBlob) -> None:
        found = self.blobs.setdefault(blob.id, BlobLocation(pack_id, blob))
        if found.blob.type is not blob.type:
            self.other_type.setdefault(blob.id, BlobLocation(pack_id, blob))

    def add_pack(self, pack_id: bytes, blobs: list[PackedBlob]) -> None:
        for blob in blobs:
            self.add_location(pack_id, blob)
        self.packs[pack_id] = blobs

    def lookup(self, blob_id: bytes, kind: BlobType | None = None) -> BlobLocation | None:
        location = self.blobs.get(blob_id)
        if kind is None or location is None or location.blob.type is kind:
            return location
        other = self.other_type.get(blob_id)
        return other if other is not None and other.blob.type is kind else None


def _random_files(rng: random.Random, files: int = 4, packs: int = 6) -> list[IndexFile]:
    """Index files with what real ones hold, and what they may: an id in several packs,
    as both types, twice in one pack; a pack in two files; a blob twice at one offset."""
    shared = [rng.randbytes(32) for _ in range(20)]
    made: list[IndexFile] = []
    pack_ids = [rng.randbytes(32) for _ in range(files * packs)]
    for f in range(files):
        file = IndexFile()
        for p in range(packs):
            # Now and then a pack another file lists too.
            pack_id = (
                pack_ids[rng.randrange(len(pack_ids))]
                if rng.random() < 0.2
                else (pack_ids[f * packs + p])
            )
            blobs = []
            offset = 0
            for _ in range(rng.randrange(0, 40)):
                blob_id = rng.choice(shared) if rng.random() < 0.3 else rng.randbytes(32)
                length = rng.randrange(33, 5000)
                compressed = rng.random() < 0.5
                blobs.append(
                    PackedBlob(
                        blob_id,
                        rng.choice([BlobType.DATA, BlobType.TREE]),
                        offset if rng.random() < 0.95 else 0,  # some at one offset
                        length,
                        rng.randrange(0, 10**6) if compressed else None,
                    )
                )
                offset += length
            rng.shuffle(blobs)  # index files need not list a pack in order
            file.packs[pack_id] = blobs
        made.append(file)
    return made


def _random_added_blobs(
    rng: random.Random, loaded: list[bytes], uncompressed: list[int | None]
) -> list[PackedBlob]:
    """A pack's blobs added after loading: some ids already loaded, of either type."""
    return [
        PackedBlob(
            rng.choice(loaded) if rng.random() < 0.3 else rng.randbytes(32),
            rng.choice([BlobType.DATA, BlobType.TREE]),
            i * 100,
            100,
            rng.choice(uncompressed),
        )
        for i in range(rng.randrange(1, 8))
    ]


def _assert_same(compact: Index, reference: DictIndex, probes: Iterable[bytes]) -> None:
    for blob_id in probes:
        for kind in (None, BlobType.DATA, BlobType.TREE):
            assert compact.lookup(blob_id, kind) == reference.lookup(blob_id, kind)
            if kind is not None:  # the restore's form of the same answer
                found = reference.lookup(blob_id, kind)
                assert compact.lookup_entry(blob_id, kind) == (
                    None
                    if found is None
                    else (
                        found.pack_id,
                        found.blob.offset,
                        found.blob.length,
                        found.blob.uncompressed_length,
                    )
                )
        assert compact.has(blob_id) == (blob_id in reference.blobs)
    assert sorted(compact.ids()) == sorted(reference.blobs)
    assert compact.has_all(reference.blobs)
    for blob_id in probes:
        assert compact.has_all([*reference.blobs, blob_id]) == (blob_id in reference.blobs)
    assert compact.packs == reference.packs
    listed = compact.pack_lister()
    assert {pack_id: listed(pack_id) for pack_id in compact.pack_ids()} == reference.packs
    assert listed(bytes(32)) is None or bytes(32) in reference.packs


@pytest.mark.parametrize("seed", range(8))
def test_compact_index_answers_as_the_dict_did(seed: int) -> None:
    rng = random.Random(seed)
    files = _random_files(rng)
    reference = DictIndex.of_files(files)
    from_documents = Index.of_documents(json.loads(json.dumps(f.to_json())) for f in files)
    from_files = Index.of_files(files)
    absent = [rng.randbytes(32) for _ in range(50)]
    probes = [*reference.blobs, *absent]
    _assert_same(from_documents, reference, probes)
    _assert_same(from_files, reference, probes)


@pytest.mark.parametrize("regroup_min", [1, 3, 10_000])
def test_packs_added_after_loading(monkeypatch: pytest.MonkeyPatch, regroup_min: int) -> None:
    """Added packs are found, behind what was loaded (the first location wins), whether
    they wait in the recent dict or were regrouped with the rest."""
    monkeypatch.setattr(index_module, "_REGROUP_MIN", regroup_min)
    rng = random.Random(regroup_min)
    files = _random_files(rng, files=2)
    reference = DictIndex.of_files(files)
    compact = Index.of_documents(f.to_json() for f in files)
    compact.packs  # noqa: B018 - made before the additions, kept up to date by them
    loaded = list(reference.blobs)
    for _ in range(12):
        pack_id = rng.randbytes(32) if rng.random() < 0.8 else rng.choice(list(reference.packs))
        blobs = _random_added_blobs(rng, loaded, [None])
        reference.add_pack(pack_id, blobs)
        compact.add_pack(pack_id, blobs)
        _assert_same(compact, reference, [*reference.blobs, rng.randbytes(32)])


def test_an_empty_index_and_ids_of_other_lengths() -> None:
    empty = Index()
    assert not empty.has(bytes(32))
    assert empty.lookup(bytes(32)) is None
    assert empty.ids() == [] and empty.packs == {}
    blob_id = bytes(range(32))
    index = Index.of_files([IndexFile({b"p" * 32: [PackedBlob(blob_id, BlobType.DATA, 0, 40)]})])
    # Parts of a stored id are no id (bytes.find would find them).
    for part in (blob_id[:31], blob_id[1:], blob_id[:2], b"", blob_id + b"\0"):
        assert not index.has(part)
        assert index.lookup(part) is None
        assert index.lookup_entry(part, BlobType.DATA) is None
    assert index.has_all([blob_id, blob_id]) and not index.has_all([blob_id, blob_id[1:]])


def test_an_id_straddling_two_stored_ids_is_not_found() -> None:
    # Two ids of one bucket (their first two bytes), side by side in it; the second half
    # of the first and the first half of the second make an id of that bucket too.
    bucket = b"\x07\x09"
    first = bucket + bytes(range(2, 16)) + bucket + bytes(range(18, 32))
    second = bucket + bytes(range(100, 130))
    straddling = first[16:] + second[:16]
    blobs = [PackedBlob(first, BlobType.DATA, 0, 40), PackedBlob(second, BlobType.DATA, 40, 40)]
    index = Index.of_files([IndexFile({b"p" * 32: blobs})])
    assert index._lookup.ids.find(straddling) == 16  # there, across the two
    assert not index.has(straddling)
    assert not index.has_all([first, straddling]) and index.has_all([second, first])
    assert index.lookup(straddling) is None
    assert index.has(first) and index.has(second)


_PACK = {
    "id": "ab" * 32,
    "blobs": [{"id": "cd" * 32, "type": "data", "offset": 0, "length": 40}],
}


@pytest.mark.parametrize(
    "wrong",
    [
        {"offset": True},
        {"offset": -1},
        {"length": 2**64},
        {"length": 1.5},
        {"uncompressed_length": "7"},
        {"uncompressed_length": 2**64 - 1},
        {"type": "file"},
        {"type": ["data"]},
        {"id": "cd" * 31},
        {"id": "cd" * 31 + " c"},
        {"id": "zz" * 32},
        {"id": 7},
    ],
)
def test_malformed_index_entries_are_refused(wrong: dict[str, object]) -> None:
    blob = {**_PACK["blobs"][0], **wrong}  # type: ignore[dict-item]
    document = {"packs": [{"id": _PACK["id"], "blobs": [blob]}]}
    with pytest.raises(FormatError):
        index_columns(document)
    with pytest.raises(FormatError):
        index_columns_of_json(json.dumps(document).encode())


@pytest.mark.parametrize(
    "text",
    [
        '{"packs":[P]}',
        ' {\n "packs" : [ P ,\tP ] } \n',
        "[P]",
        "[]",
        "{}",
        '{"supersedes":["' + "ef" * 32 + '"],"packs":[P],"extra":{"packs":1}}',
        '{"packs":[P],"packs":[]}',  # the last one counts, as in json.loads
        '\ufeff{"packs":[P]}',
        '{"packs":null}',
        '{"packs":{"id":1}}',
        '{"packs":[P]} x',
        '{"packs":[P]',
        '{"packs":[P],}',
        '{"a":1 "packs":[]}',
        '{"supersedes":["zz"],"packs":[]}',
        '{"packs":[1]}',
        '"packs"',
        "",
    ],
)
def test_an_index_file_decoded_a_pack_at_a_time_is_the_whole_file_decoded(text: str) -> None:
    raw = text.replace("P", json.dumps(_PACK)).encode()
    try:
        expected: object = index_columns(json.loads(raw))
    except (ValueError, FormatError):
        expected = FormatError
    try:
        got: object = index_columns_of_json(raw)
    except FormatError:
        got = FormatError
    assert got == expected


def test_the_builder_takes_files_in_order() -> None:
    blob_id = bytes(32)
    first = {"packs": [{"id": "01" * 32, "blobs": [_blob(blob_id, "tree", 0)]}]}
    second = {"packs": [{"id": "02" * 32, "blobs": [_blob(blob_id, "data", 8)]}]}
    builder = IndexBuilder()
    builder.add_document(first)
    builder.add_columns(index_columns_of_json(json.dumps(second).encode()))
    index = builder.finish()
    found = index.lookup(blob_id)
    assert found is not None and found.pack_id == bytes.fromhex("01" * 32)
    as_data = index.lookup(blob_id, BlobType.DATA)
    assert as_data is not None and as_data.pack_id == bytes.fromhex("02" * 32)
    assert as_data.blob == PackedBlob(blob_id, BlobType.DATA, 8, 40, None)


def _blob(blob_id: bytes, kind: str, offset: int) -> dict[str, object]:
    return {"id": blob_id.hex(), "type": kind, "offset": offset, "length": 40}


@pytest.mark.parametrize("seed", range(4))
def test_an_index_file_is_encoded_as_its_json_document(seed: int) -> None:
    """``IndexFile.encode`` writes, a pack at a time, what ``encode_unpacked`` of its
    document wrote: the same JSON text, compressed, read back the same."""
    files = _random_files(random.Random(seed), files=2)
    files.append(IndexFile())
    files.append(IndexFile(supersedes=[bytes(32), bytes(range(32))]))
    for file in files:
        plaintext = file.encode()
        assert plaintext[0] == 2
        text = zstandard.ZstdDecompressor().decompress(plaintext[1:])  # size in the frame
        assert text == json.dumps(file.to_json(), separators=(",", ":")).encode()
        assert fmt.decode_unpacked(plaintext) == file.to_json()
        again = IndexFile.from_json(fmt.decode_unpacked(plaintext))
        assert again.packs == file.packs and again.supersedes == file.supersedes


def test_ids_joined_holds_every_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_REGROUP_MIN", 10_000)
    files = _random_files(random.Random(5))
    compact = Index.of_files(files)
    added = [PackedBlob(bytes([7]) * 32, BlobType.DATA, 0, 40)]
    compact.add_pack(bytes(32), added)  # waits in the recent dict
    joined = compact.ids_joined()
    as_set = {joined[at : at + 32] for at in range(0, len(joined), 32)}
    assert len(joined) % 32 == 0
    assert as_set == set(compact.ids()) == {*DictIndex.of_files(files).blobs, added[0].id}


def test_locations_are_made_as_their_classes_make_them() -> None:
    """``lookup`` sets the slots of its frozen dataclasses itself: they are the same."""
    blob = PackedBlob(bytes(range(32)), BlobType.TREE, 7, 40, 99)
    index = Index.of_files([IndexFile({b"p" * 32: [blob]})])
    found = index.lookup(blob.id)
    made = BlobLocation(b"p" * 32, blob)
    assert found == made and hash(found) == hash(made) and repr(found) == repr(made)
    assert found is not None and found.blob.compressed and found.blob.plaintext_length == 99
    with pytest.raises(AttributeError):
        found.blob.offset = 8  # type: ignore[misc]


def _assert_same_answers(restored: Index, original: Index, probes: Iterable[bytes]) -> None:
    for blob_id in probes:
        for kind in (None, BlobType.DATA, BlobType.TREE):
            assert restored.lookup(blob_id, kind) == original.lookup(blob_id, kind)
        assert restored.has(blob_id) == original.has(blob_id)
    assert sorted(restored.ids()) == sorted(original.ids())
    assert restored.row_count() == original.row_count()
    # A saved state lists every pack as index files do (sorted by offset, a blob at one
    # offset once): what ``packs`` of packs added whole may list otherwise is not kept.
    assert {pack: sorted(map(repr, blobs)) for pack, blobs in restored.packs.items()} == {
        pack: sorted({repr(b) for b in blobs}) for pack, blobs in original.packs.items()
    }


@pytest.mark.parametrize(("seed", "regroup_min"), [(s, m) for s in range(4) for m in (1, 10_000)])
def test_a_saved_state_answers_as_the_index_did(
    monkeypatch: pytest.MonkeyPatch, seed: int, regroup_min: int
) -> None:
    """``from_state(to_state())`` of an index, with packs added after loading that wait in
    the recent dict or were regrouped, answers every lookup as the index did; and the two
    keep answering alike as packs and index files are added to both."""
    monkeypatch.setattr(index_module, "_REGROUP_MIN", regroup_min)
    rng = random.Random(seed)
    original = Index.of_files(_random_files(rng, files=3))
    loaded = original.ids()
    for _ in range(5):
        original.add_pack(rng.randbytes(32), _random_added_blobs(rng, loaded, [None, 300]))
    restored = Index.from_state(original.to_state())
    probes = [*original.ids(), *(rng.randbytes(32) for _ in range(30))]
    _assert_same_answers(restored, original, probes)
    # Index files read after the state was saved.
    later = _random_files(rng, files=2)
    for index in (original, restored):
        index.add_files(c for f in later for c in index_columns(f.to_json()))
    probes += [b.id for f in later for blobs in f.packs.values() for b in blobs]
    _assert_same_answers(restored, original, probes)
    assert Index.from_state(Index().to_state()).ids() == []


def test_a_saved_state_cut_short_or_of_another_version_is_refused() -> None:
    state = Index.of_files(_random_files(random.Random(7), files=2)).to_state()
    for bad in (
        state[:-1],
        state + b"\0",
        state[:40],
        b"",
        state.replace(b"state 1", b"state 2", 1),
        state.replace(sys.byteorder.encode(), b"middle", 1),
    ):
        with pytest.raises(FormatError):
            Index.from_state(bad)


def test_grouping_ids_holds_them_twice_at_most() -> None:
    """Regrouping (old grouped ids, then new ones) gives every id in its bucket, the old
    before the new within one, each with where it came from; made through one buffer that
    becomes the result: ~2 copies of the ids at once, not the joined sources, their parts
    and the parts joined (3, plus the grouped ids the index still holds)."""
    import tracemalloc

    rng = random.Random(21)
    old_ids, _, _ = index_module.group_ids(rng.randbytes(32 * 60_000))
    new = bytearray(rng.randbytes(32 * 20_000))
    new[:32] = old_ids[:32]  # an id stored twice: both kept, the old first
    tracemalloc.start()
    try:
        grouped, order, starts = index_module.group_ids(old_ids, new)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    total = len(old_ids) + len(new)
    # (Besides the ids: the buckets' arrays, ~2 MB, and one slice's objects, ~1 MB.)
    assert peak < total * 9 // 4 + 4 * 2**20, (peak, total)
    joined = old_ids + bytes(new)
    assert len(grouped) == total and len(order) == total // 32
    for position, source in enumerate(order):
        assert grouped[32 * position : 32 * position + 32] == joined[32 * source : 32 * source + 32]
    for bucket in (0, 1, 0x1234, index_module.BUCKETS - 1):
        part = grouped[starts[bucket] : starts[bucket + 1]]
        assert all(
            int.from_bytes(part[i : i + 2], "little") == bucket for i in range(0, len(part), 32)
        )
    first = old_ids[:32]
    places = [p for p in range(total // 32) if grouped[32 * p : 32 * p + 32] == first]
    assert [order[p] for p in places] == [0, len(old_ids) // 32]
    assert index_module.grouped_has(grouped, starts, bytes(new[40 * 32 : 41 * 32]))
