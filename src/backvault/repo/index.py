"""The in-memory index: where each blob is stored (pack, offset, length), by id.

Filled from the repository's index files and, for packs no index lists, from the packs'
own headers. The first location of an id wins; the same bytes stored as a blob of the
other type (a file holding a tree's JSON) are kept apart, as restic indexes by type and
id.

A repository of a big database holds hundreds of thousands of blobs, and every backup,
restore and prune loads all of them: the index keeps no Python object per blob (one cost
~330 bytes and ~3 µs to build). Each listing of a blob is a row, numbered in the order the
index files list them; its fields sit in ``array`` columns, and its id in one ``bytes``
of 32-byte ids grouped by their first two bytes (a bucket), in row order within a bucket.
A lookup searches its bucket with ``bytes.find``, so the earliest row wins, as the first
listing did in a dict. Rows added after a load go to a small dict until there are enough
of them to regroup everything. ``packs`` (check and prune want every pack with all its
blobs) is made from the rows when asked for.
"""

from __future__ import annotations

import io
import json
import operator
import re
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import Any

from backvault.repo.blobs import BlobLocation
from backvault.repo.format import (
    ID_SIZE,
    BlobType,
    FormatError,
    IndexFile,
    PackBlobs,
    PackedBlob,
    json_problem,
    parse_id,
)

_TYPES = (BlobType.DATA, BlobType.TREE)  # a row's type is its position here
_TYPE_CODES = {"data": 0, "tree": 1}
_KIND_CODES = {kind: code for code, kind in enumerate(_TYPES)}
_NOT_COMPRESSED = (1 << 64) - 1  # the uncompressed-length column's "None"
BUCKETS = 1 << 16  # buckets by an id's first two bytes: a few ids each at 10^5 blobs
# Rows added after a load are regrouped into the bucketed ids once there are this many
# (or a quarter of the loaded ones, if more): a first backup adds every blob it stores.
_REGROUP_MIN = 4096
_COPY_IDS = 16384
# What a saved index starts with: its version, and the byte order of its numbers.
_STATE_MAGIC = f"backvault index state 1 {sys.byteorder}\n".encode()


# A pack of an index file: its id, its blobs' ids (32 bytes each, back to back), type
# codes, offsets, lengths and uncompressed lengths.
IndexColumns = tuple[bytes, bytes, bytes, "array[int]", "array[int]", "array[int]"]


class _Lookup:
    """What a lookup reads, swapped whole when rows are regrouped (lookups run on other
    threads while a backup adds packs): the grouped ids, the row of each, where each
    bucket starts (a byte offset); and, for the rows after those, the first row of each
    id and the first of the other type than that one's."""

    __slots__ = ("ids", "recent", "recent_other_type", "rows", "starts")

    def __init__(self, ids: bytes, rows: array[int], starts: array[int]) -> None:
        self.ids = ids
        self.rows = rows
        self.starts = starts
        self.recent: dict[bytes, int] = {}
        self.recent_other_type: dict[bytes, int] = {}


EMPTY_STARTS = array("Q", bytes(8 * (BUCKETS + 1)))  # no ids: every bucket empty


class Index:
    """Blob locations by id, and every indexed pack with all its blobs."""

    def __init__(self) -> None:
        self._pack_ids: list[bytes] = []  # by pack number
        self._pack_numbers: dict[bytes, int] = {}
        # The columns, one entry per row (appended to only).
        self._pack_of = array("I")
        self._types = bytearray()
        self._offsets = array("Q")
        self._lengths = array("Q")
        self._plain_lengths = array("Q")  # _NOT_COMPRESSED for a blob stored as it is
        self._lookup = _Lookup(b"", array("I"), EMPTY_STARTS)
        self._ungrouped_ids = bytearray()  # the ids of the rows after the grouped ones
        # Packs added whole (``add_pack``): the rows of their last addition, which
        # ``packs`` lists as given (the listings of index files are merged and sorted).
        self._added_packs: dict[int, range] = {}
        self._packs: dict[bytes, list[PackedBlob]] | None = None
        self._lock = threading.Lock()  # for changes, and for making ``packs``

    # --- building ------------------------------------------------------------------------

    @classmethod
    def of_files(cls, files: Iterable[IndexFile]) -> Index:
        """The index the index files make together (a pack listed twice counts once, and
        a blob listed twice at one offset of it once)."""
        index = cls()
        for file in files:
            for pack_id, blobs in file.packs.items():
                index._append_rows(pack_id, blobs)
        index._regroup()
        return index

    @classmethod
    def of_documents(cls, documents: Iterable[Any]) -> Index:
        """The index of decoded index files (their JSON): ``of_files`` of
        ``IndexFile.from_json`` of each, without an object per blob."""
        builder = IndexBuilder()
        for document in documents:
            builder.add_document(document)
        return builder.finish()

    def _number_of(self, pack_id: bytes) -> int:
        number = self._pack_numbers.get(pack_id)
        if number is None:
            number = self._pack_numbers[pack_id] = len(self._pack_ids)
            self._pack_ids.append(pack_id)
        return number

    def _append_rows(self, pack_id: bytes, blobs: list[PackedBlob]) -> range:
        """Rows for ``blobs``, not grouped yet."""
        first = len(self._types)
        self._pack_of.extend(array("I", [self._number_of(pack_id)]) * len(blobs))
        self._types.extend(_TYPES.index(b.type) for b in blobs)
        self._offsets.extend(b.offset for b in blobs)
        self._lengths.extend(b.length for b in blobs)
        self._plain_lengths.extend(
            _NOT_COMPRESSED if b.uncompressed_length is None else b.uncompressed_length
            for b in blobs
        )
        self._ungrouped_ids += b"".join(b.id for b in blobs)
        return range(first, len(self._types))

    def _append_columns(self, columns: IndexColumns) -> None:
        pack_id, ids, types, offsets, lengths, plain_lengths = columns
        self._pack_of.extend(array("I", [self._number_of(pack_id)]) * len(types))
        self._types += types
        self._offsets += offsets
        self._lengths += lengths
        self._plain_lengths += plain_lengths
        self._ungrouped_ids += ids

    def _regroup(self) -> None:
        """Group every row's id by bucket. The rows not grouped yet come after the grouped
        ones, and a stable sort keeps row order within a bucket."""
        grouped = self._lookup
        grouped_ids, order, starts = group_ids(grouped.ids, self._ungrouped_ids)
        # Each position's row (at the first grouping, rows are 0, 1, 2, …: ``order``).
        rows = order
        if len(grouped.rows):
            before = grouped.rows + array("I", range(len(grouped.rows), len(self._types)))
            rows = array("I", map(before.__getitem__, order))
        self._lookup = _Lookup(grouped_ids, rows, starts)
        self._ungrouped_ids = bytearray()

    def add_pack(self, pack_id: bytes, blobs: Iterable[PackedBlob]) -> None:
        """A pack to index (written by this process, or found without an index)."""
        if isinstance(blobs, PackBlobs):  # a pack a backup wrote: its columns, no objects
            columns = _columns_of_pack(pack_id, blobs)
            with self._lock:
                first = len(self._types)
                self._append_columns(columns)
                added = range(first, len(self._types))
                self._added_packs[self._pack_numbers[pack_id]] = added
                if self._packs is not None:
                    self._packs[pack_id] = list(blobs)
                self._look_up_added(added)
            return
        blobs = list(blobs)
        with self._lock:
            added = self._append_rows(pack_id, blobs)
            self._added_packs[self._pack_numbers[pack_id]] = added
            if self._packs is not None:
                self._packs[pack_id] = blobs
            self._look_up_added(added)

    def add_files(self, packs: Iterable[IndexColumns]) -> None:
        """Packs of index files read after this index was made (from a saved state)."""
        with self._lock:
            first = len(self._types)
            for columns in packs:
                self._append_columns(columns)
            self._packs = None  # made again when asked for
            self._look_up_added(range(first, len(self._types)))

    def _look_up_added(self, added: range) -> None:
        """Make rows just appended findable: regrouped with the others if there are enough
        of them, else through the dicts of recent rows."""
        lookup = self._lookup
        if len(self._types) - len(lookup.rows) >= max(_REGROUP_MIN, len(lookup.rows) // 4):
            self._regroup()
            return
        self._note_recent(lookup, added)

    def _note_recent(self, lookup: _Lookup, added: range) -> None:
        ungrouped, base, types = self._ungrouped_ids, len(lookup.rows), self._types
        for row in added:
            at = ID_SIZE * (row - base)
            blob_id = bytes(ungrouped[at : at + ID_SIZE])
            first = lookup.recent.setdefault(blob_id, row)
            if first != row and types[first] != types[row]:
                lookup.recent_other_type.setdefault(blob_id, row)

    def row_count(self) -> int:
        """How many listings of blobs the index holds (a blob listed twice counts twice)."""
        return len(self._types)

    # --- a saved state -------------------------------------------------------------------

    def to_state(self) -> bytes:
        """The index as bytes ``from_state`` makes it again from, without decoding or
        grouping anything (the local index cache: a database's 200 000 blobs are ~13 MB,
        read back in ~0.03 s where their index files take ~0.5 s)."""
        return b"".join(self.state_parts())

    def state_parts(self) -> list[bytes | memoryview]:
        """``to_state`` in parts, most of them views of the index's own arrays (no copy of
        ~13 MB): valid while the index does not change (an array with a view cannot grow:
        a change meanwhile raises BufferError)."""
        with self._lock:
            lookup = self._lookup
            counts = (len(self._pack_ids), len(self._types), len(lookup.rows))
            return [
                _STATE_MAGIC + struct.pack("<3Q", *counts),
                b"".join(self._pack_ids),
                memoryview(self._pack_of).cast("B"),
                bytes(self._types),
                memoryview(self._offsets).cast("B"),
                memoryview(self._lengths).cast("B"),
                memoryview(self._plain_lengths).cast("B"),
                lookup.ids,
                memoryview(lookup.rows).cast("B"),
                memoryview(lookup.starts).cast("B"),
                bytes(self._ungrouped_ids),
            ]

    @classmethod
    def from_state(cls, state: bytes | memoryview) -> Index:
        """The index ``to_state`` saved (of a machine of the same byte order);
        FormatError if ``state`` is not one whole."""
        view = memoryview(state)
        if bytes(view[: len(_STATE_MAGIC)]) != _STATE_MAGIC:
            raise FormatError("not a saved index of this version and byte order")
        at = len(_STATE_MAGIC) + 24
        if len(view) < at:
            raise FormatError("saved index truncated")
        packs, rows, grouped = struct.unpack("<3Q", view[len(_STATE_MAGIC) : at])
        # The byte size of each part, in the order ``to_state`` joins them.
        sizes = [ID_SIZE * packs, 4 * rows, rows, 8 * rows, 8 * rows, 8 * rows]
        sizes += [ID_SIZE * grouped, 4 * grouped, 8 * (BUCKETS + 1), ID_SIZE * (rows - grouped)]
        if grouped > rows or len(view) != at + sum(sizes):
            raise FormatError("saved index has the wrong length")
        parts = []
        for size in sizes:
            parts.append(view[at : at + size])
            at += size
        pack_ids, pack_of, types, offsets, lengths, plain, ids, grouped_rows, starts, rest = parts
        index = cls()
        index._pack_ids = [
            bytes(pack_ids[i : i + ID_SIZE]) for i in range(0, len(pack_ids), ID_SIZE)
        ]
        index._pack_numbers = {pack_id: n for n, pack_id in enumerate(index._pack_ids)}
        index._pack_of.frombytes(pack_of)
        index._types = bytearray(types)
        index._offsets.frombytes(offsets)
        index._lengths.frombytes(lengths)
        index._plain_lengths.frombytes(plain)
        lookup = _Lookup(bytes(ids), array("I", bytes(grouped_rows)), array("Q", bytes(starts)))
        # Cheap checks that every lookup stays in bounds (the state is authenticated by
        # its reader; these catch a writer's mistake, not an attacker).
        if lookup.starts[-1] != len(lookup.ids) or (rows and max(index._pack_of) >= packs):
            raise FormatError("saved index is inconsistent")
        # The grouped rows are the first ``grouped`` rows (regrouping takes them all);
        # each bucket starts at an id's boundary, after the one before.
        if (grouped and max(lookup.rows) >= grouped) or set(index._types) - {0, 1}:
            raise FormatError("saved index is inconsistent")
        if any(start % ID_SIZE for start in lookup.starts) or any(
            map(operator.gt, lookup.starts, lookup.starts[1:])
        ):
            raise FormatError("saved index is inconsistent")
        index._lookup = lookup
        index._ungrouped_ids = bytearray(rest)
        index._note_recent(lookup, range(grouped, rows))
        return index

    # --- looking up ----------------------------------------------------------------------

    def _grouped_row(self, lookup: _Lookup, blob_id: bytes, kind: int | None = None) -> int:
        """The first grouped row of ``blob_id`` (of type ``kind`` if given), or -1."""
        if len(blob_id) != ID_SIZE:
            return -1
        ids = lookup.ids
        bucket = blob_id[0] | blob_id[1] << 8
        end = lookup.starts[bucket + 1]
        pos = ids.find(blob_id, lookup.starts[bucket], end)
        while pos >= 0:
            # A match straddling two ids is none (one id's tail and the next one's head).
            if pos % ID_SIZE == 0:
                row = lookup.rows[pos // ID_SIZE]
                if kind is None or self._types[row] == kind:
                    return row
            pos = ids.find(blob_id, pos + 1, end)
        return -1

    def _row(self, blob_id: bytes, kind: BlobType | None = None) -> int:
        """The first row of ``blob_id`` (as a blob of type ``kind``, if given), or -1."""
        lookup = self._lookup
        first = self._grouped_row(lookup, blob_id)
        if first < 0:
            first = lookup.recent.get(blob_id, -1)
        if kind is None or first < 0:
            return first
        code = _KIND_CODES[kind]
        if self._types[first] == code:
            return first
        other = self._grouped_row(lookup, blob_id, code)
        if other < 0:
            other = lookup.recent.get(blob_id, -1)
            if other < 0 or self._types[other] != code:
                other = lookup.recent_other_type.get(blob_id, -1)
        return other

    def has(self, blob_id: bytes) -> bool:
        # ``_grouped_row`` inlined: a backup asks this for every blob of every file.
        lookup = self._lookup
        if len(blob_id) == ID_SIZE:
            ids, starts = lookup.ids, lookup.starts
            bucket = blob_id[0] | blob_id[1] << 8
            end = starts[bucket + 1]
            pos = ids.find(blob_id, starts[bucket], end)
            while pos >= 0:
                if not pos % ID_SIZE:
                    return True
                pos = ids.find(blob_id, pos + 1, end)
        return blob_id in lookup.recent

    def has_all(self, blob_ids: Iterable[bytes]) -> bool:
        """Whether every one of ``blob_ids`` is indexed (``has`` of each, in one loop: a
        backup asks this of a database's ~200 000 blobs)."""
        lookup = self._lookup
        find, starts, recent = lookup.ids.find, lookup.starts, lookup.recent
        for blob_id in blob_ids:
            if len(blob_id) == ID_SIZE:
                bucket = blob_id[0] | blob_id[1] << 8
                end = starts[bucket + 1]
                pos = find(blob_id, starts[bucket], end)
                while pos > 0 and pos % ID_SIZE:
                    pos = find(blob_id, pos + 1, end)
                if pos >= 0:
                    continue
            if blob_id not in recent:
                return False
        return True

    def _found_row(self, blob_id: bytes, kind: BlobType | None) -> int:
        """``_row``, with its usual case inlined (a restore asks for every blob of a
        database): the id's first row is grouped and of the type asked for."""
        lookup = self._lookup
        if len(blob_id) == ID_SIZE:
            ids, starts = lookup.ids, lookup.starts
            bucket = blob_id[0] | blob_id[1] << 8
            end = starts[bucket + 1]
            pos = ids.find(blob_id, starts[bucket], end)
            while pos > 0 and pos % ID_SIZE:
                pos = ids.find(blob_id, pos + 1, end)
            if pos >= 0:
                row: int = lookup.rows[pos // ID_SIZE]
                if kind is None or _TYPES[self._types[row]] is kind:
                    return row
        return self._row(blob_id, kind)

    def lookup(self, blob_id: bytes, kind: BlobType | None = None) -> BlobLocation | None:
        """Where a blob is (as a blob of type ``kind``, if given)."""
        row = self._found_row(blob_id, kind)
        if row < 0:
            return None
        types = self._types
        plain: int | None = self._plain_lengths[row]
        location: BlobLocation = _new_object(BlobLocation)
        blob: PackedBlob = _new_object(PackedBlob)
        set_id, set_type, set_offset, set_length, set_plain = _set_blob_fields
        set_id(blob, blob_id)
        set_type(blob, _TYPES[types[row]])
        set_offset(blob, self._offsets[row])
        set_length(blob, self._lengths[row])
        set_plain(blob, None if plain == _NOT_COMPRESSED else plain)
        set_pack_id, set_blob = _set_location_fields
        set_pack_id(location, self._pack_ids[self._pack_of[row]])
        set_blob(location, blob)
        return location

    def lookup_entry(
        self, blob_id: bytes, kind: BlobType
    ) -> tuple[bytes, int, int, int | None] | None:
        """``lookup(blob_id, kind)`` as its pack id, offset, length and uncompressed
        length (None if not compressed), without an object per blob: a restore asks
        this for every blob of a database."""
        row = self._found_row(blob_id, kind)
        if row < 0:
            return None
        plain: int | None = self._plain_lengths[row]
        return (
            self._pack_ids[self._pack_of[row]],
            self._offsets[row],
            self._lengths[row],
            None if plain == _NOT_COMPRESSED else plain,
        )

    def _blob_at(self, row: int, blob_id: bytes) -> PackedBlob:
        plain: int | None = self._plain_lengths[row]
        return _packed_blob(
            blob_id,
            _TYPES[self._types[row]],
            self._offsets[row],
            self._lengths[row],
            None if plain == _NOT_COMPRESSED else plain,
        )

    def has_pack(self, pack_id: bytes) -> bool:
        return pack_id in self._pack_numbers

    def ids(self) -> list[bytes]:
        """Every indexed blob id, once."""
        with self._lock:
            lookup = self._lookup
            ids, starts = lookup.ids, lookup.starts
            unique: list[bytes] = []
            for bucket in range(BUCKETS):
                start, end = starts[bucket], starts[bucket + 1]
                if end - start == ID_SIZE:
                    unique.append(ids[start:end])
                elif start != end:
                    # An id stored twice is twice in its bucket.
                    unique.extend(
                        dict.fromkeys(ids[at : at + ID_SIZE] for at in range(start, end, ID_SIZE))
                    )
            unique.extend(
                blob_id for blob_id in lookup.recent if self._grouped_row(lookup, blob_id) < 0
            )
            return unique

    def ids_joined(self) -> bytes:
        """Every indexed blob id, 32 bytes each, back to back; an id stored twice may be
        there twice (what a set is made of: ``ids`` takes ~0.1 s for 200 000 ids, this
        a copy)."""
        with self._lock:
            lookup = self._lookup
            return lookup.ids + b"".join(lookup.recent)

    # --- whole packs ---------------------------------------------------------------------

    @property
    def packs(self) -> dict[bytes, list[PackedBlob]]:
        """Every indexed pack with all its blobs: as its index files list them together
        (a blob listed twice at one offset once, sorted by offset), or as last added."""
        with self._lock:
            if self._packs is None:
                self._packs = self._make_packs()
            return self._packs

    def _make_packs(self) -> dict[bytes, list[PackedBlob]]:
        rows_of, id_of = self._rows_by_pack(), self._id_of_row()
        return {
            pack_id: self._blobs_of(number, rows_of, id_of)
            for number, pack_id in enumerate(self._pack_ids)
        }

    def pack_ids(self) -> list[bytes]:
        """Every indexed pack's id."""
        with self._lock:
            return list(self._pack_ids)

    def pack_lister(self) -> Callable[[bytes], list[PackedBlob] | None]:
        """What ``packs.get`` answers, one pack made at a time (``check`` reads 200 000
        blobs of a database's repository: kept together they are ~40 MB of objects, the
        lister ~2 MB). The index must not change while it is used."""
        with self._lock:
            rows_of, id_of = self._rows_by_pack(), self._id_of_row()
            numbers = dict(self._pack_numbers)

        def blobs_of(pack_id: bytes) -> list[PackedBlob] | None:
            number = numbers.get(pack_id)
            return None if number is None else self._blobs_of(number, rows_of, id_of)

        return blobs_of

    def _rows_by_pack(self) -> Callable[[int], array[int]]:
        """The rows of each pack number, in row order."""
        order, starts = _counting_sort(self._pack_of, len(self._pack_ids))
        return lambda number: order[starts[number] : starts[number + 1]]

    def _id_of_row(self) -> Callable[[int], bytes]:
        lookup, ungrouped = self._lookup, self._ungrouped_ids
        grouped = len(lookup.rows)
        position = array("I", bytes(4 * grouped))
        for at, row in enumerate(lookup.rows):
            position[row] = at

        def id_of(row: int) -> bytes:
            if row < grouped:
                at = ID_SIZE * position[row]
                return lookup.ids[at : at + ID_SIZE]
            at = ID_SIZE * (row - grouped)
            return bytes(ungrouped[at : at + ID_SIZE])

        return id_of

    def _blobs_of(
        self, number: int, rows_of: Callable[[int], array[int]], id_of: Callable[[int], bytes]
    ) -> list[PackedBlob]:
        """One pack's blobs: as its last addition gave them, or as its index files list
        them together (a blob listed twice at one offset once, the later listing's fields,
        sorted by offset)."""
        added = self._added_packs.get(number)
        if added is not None:
            return [self._blob_at(row, id_of(row)) for row in added]
        listed: dict[tuple[bytes, int], tuple[int, bytes]] = {}
        for row in rows_of(number):
            blob_id = id_of(row)
            listed[(blob_id, self._offsets[row])] = (row, blob_id)
        blobs = [self._blob_at(row, blob_id) for row, blob_id in listed.values()]
        blobs.sort(key=lambda b: b.offset)
        return blobs


def group_ids(*sources: bytes | bytearray) -> tuple[bytes, array[int], array[int]]:
    """The ids of ``sources`` (32 bytes each, back to back, one source after another)
    grouped by bucket, keeping their order within a bucket: the grouped ids, where each
    came from (its position in the sources joined), and where each bucket starts (byte
    offsets, ``BUCKETS + 1`` of them), for ``grouped_has``."""
    ids = b"".join(sources)
    # An id's bucket: its first two bytes, as a little-endian number.
    buckets = array("H", memoryview(ids).cast("H")[:: ID_SIZE // 2].tobytes())
    if sys.byteorder == "big":
        buckets.byteswap()
    order, first_of = _counting_sort(buckets, BUCKETS)
    del buckets
    starts = array("Q", map(ID_SIZE.__mul__, first_of))  # byte offsets
    del first_of
    # Copied a slice of ids at a time (they are objects of ~70 bytes until written) into
    # one buffer, which becomes the result without a copy (``getvalue``): the ids are
    # held twice at most, not as parts and their join besides.
    grouped = io.BytesIO()
    for first in range(0, len(order), _COPY_IDS):
        part = order[first : first + _COPY_IDS]
        grouped.write(b"".join([ids[ID_SIZE * i : ID_SIZE * (i + 1)] for i in part]))
    del ids
    return grouped.getvalue(), order, starts


def grouped_has(ids: bytes, starts: array[int], blob_id: bytes) -> bool:
    """Whether ``blob_id`` is one of ``ids`` grouped by ``group_ids``."""
    if len(blob_id) != ID_SIZE:
        return False
    bucket = blob_id[0] | blob_id[1] << 8
    end = starts[bucket + 1]
    pos = ids.find(blob_id, starts[bucket], end)
    while pos >= 0:
        if not pos % ID_SIZE:  # a match straddling two ids is none
            return True
        pos = ids.find(blob_id, pos + 1, end)
    return False


def _counting_sort(keys: array[int], key_count: int) -> tuple[array[int], array[int]]:
    """The positions of ``keys`` (each below ``key_count``) sorted by key, stably, and
    where each key's positions start in that order (``key_count + 1`` entries). Into
    arrays: sorted(range(n), key=…) made two lists of n int objects (~14 MB at 200 000
    rows), and a Counter of the keys a dict of ~4.5 MB, freed in the middle of a backup's
    other small objects, where the heap stayed fragmented."""
    counts = array("I", bytes(4 * key_count))
    for key in keys:
        counts[key] += 1
    starts = array("Q", accumulate(counts, initial=0))
    del counts
    order = array("I", bytes(4 * len(keys)))
    free = array("Q", starts[:-1])
    for at, key in enumerate(keys):
        position = free[key]
        order[position] = at
        free[key] = position + 1
    return order, starts


# A lookup makes a BlobLocation and a PackedBlob (a restore ~200 000 of them). They are
# frozen dataclasses, whose __init__ sets each field through object.__setattr__: made
# here by setting their slots directly (the same objects as __init__ makes, which
# tests/test_index.py checks), a lookup takes ~1.4 µs, not ~2.1.
_new_object = object.__new__
_set_blob_fields = tuple(
    getattr(PackedBlob, name).__set__
    for name in ("id", "type", "offset", "length", "uncompressed_length")
)
_set_location_fields = tuple(getattr(BlobLocation, name).__set__ for name in ("pack_id", "blob"))


def _packed_blob(
    blob_id: bytes, kind: BlobType, offset: int, length: int, plain: int | None
) -> PackedBlob:
    blob: PackedBlob = _new_object(PackedBlob)
    set_id, set_type, set_offset, set_length, set_plain = _set_blob_fields
    set_id(blob, blob_id)
    set_type(blob, kind)
    set_offset(blob, offset)
    set_length(blob, length)
    set_plain(blob, plain)
    return blob


class IndexBuilder:
    """Makes an ``Index`` of decoded index files (``add_document`` a file at a time,
    ``finish`` once), with the checks of ``IndexFile.from_json``: a malformed file raises
    ``FormatError`` and adds nothing."""

    def __init__(self) -> None:
        self.index = Index()

    def add_document(self, document: Any) -> None:
        self.add_columns(index_columns(document))

    def add_columns(self, packs: list[IndexColumns]) -> None:
        """One index file's packs, from ``index_columns``."""
        for columns in packs:
            self.index._append_columns(columns)

    def finish(self) -> Index:
        self.index._regroup()
        return self.index


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def index_columns_of_json(raw: bytes | str) -> list[IndexColumns]:
    """``index_columns`` of an index file's JSON text (UTF-8 bytes, or decoded). Its
    packs are decoded one at a time: the whole file decoded holds ~500 bytes per blob (a
    file of 100 000 blobs, 50 MB), a pack a few thousand blobs. Text that is not plainly
    an object with its packs in a list (or a bare list of packs) is decoded whole."""
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text = ""
    try:
        streamed = _stream_columns(text)
    except (ValueError, IndexError, RecursionError):
        streamed = None
    if streamed is not None:
        return streamed
    try:
        # As bytes, as json.loads took it before (it reads a byte order mark).
        document = json.loads(raw.encode() if isinstance(raw, str) else raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise FormatError(f"bad JSON: {json_problem(exc)}") from exc
    return index_columns(document)


def _stream_columns(text: str) -> list[IndexColumns] | None:
    """``index_columns`` of ``text``, a pack at a time; None if that cannot be done here
    (not an object or a list, a key twice, packs that are not a list, trailing text).
    Raises ValueError or IndexError for text that is not JSON."""
    at = _skip_space(text, 0)
    document: dict[str, Any] = {}
    packs: list[IndexColumns] | None = None
    if text[at] == "[":
        packs, at = _stream_packs(text, at)
    elif text[at] == "{":
        at = _skip_space(text, at + 1)
        more = text[at] != "}"
        if not more:
            at += 1
        while more:
            key, at = _DECODER.raw_decode(text, at)
            at = _skip_space(text, at)
            if not isinstance(key, str) or key in document or text[at] != ":":
                return None
            at = _skip_space(text, at + 1)
            if key == "packs":
                if text[at] != "[":
                    return None
                packs, at = _stream_packs(text, at)
                document[key] = []
            else:
                document[key], at = _DECODER.raw_decode(text, at)
            at = _skip_space(text, at)
            if text[at] not in ",}":
                return None
            more = text[at] == ","
            at = _skip_space(text, at + 1)
    else:
        return None
    if _skip_space(text, at) != len(text):
        return None
    return (packs or []) + index_columns(document)  # checks the rest (supersedes)


def _skip_space(text: str, at: int) -> int:
    """Where the JSON white space at ``text[at]`` ends."""
    space = _SPACE.match(text, at)
    return at if space is None else space.end()


def _stream_packs(text: str, at: int) -> tuple[list[IndexColumns], int]:
    """The columns of the list of packs at ``text[at]`` (a "["), and where it ends."""
    columns: list[IndexColumns] = []
    at = _skip_space(text, at + 1)
    if text[at] == "]":
        return columns, at + 1
    while True:
        pack, at = _DECODER.raw_decode(text, at)
        columns.extend(index_columns({"packs": [pack]}))
        at = _skip_space(text, at)
        if text[at] == "]":
            return columns, at + 1
        if text[at] != ",":
            raise ValueError("expected , or ] after a pack")
        at = _skip_space(text, at + 1)


def index_columns(document: Any) -> list[IndexColumns]:
    """The packs of a decoded index file as columns: (pack id, ids, type codes, offsets,
    lengths, uncompressed lengths)."""
    if isinstance(document, list):  # restic's first index format: a bare list of packs
        document = {"packs": document}
    if not isinstance(document, dict) or not isinstance(document.get("packs", []), list):
        raise FormatError("index is not a JSON object with packs")
    for superseded in document.get("supersedes") or []:
        parse_id(superseded, "supersedes")
    columns = []
    for pack in document.get("packs") or []:
        try:
            pack_id = parse_id(pack["id"], "pack id")
            blobs = pack["blobs"] or []
            hex_ids = [b["id"] for b in blobs]
            try:
                ids = bytes.fromhex("".join(hex_ids))  # TypeError if one is no string
            except ValueError as exc:
                raise FormatError("blob id: not hex") from exc
            # fromhex skips whitespace: every id must be 64 characters, all hex digits.
            if len(ids) != ID_SIZE * len(hex_ids) or set(map(len, hex_ids)) - {2 * ID_SIZE}:
                raise FormatError("blob id: expected 64 hex digits")
            del hex_ids
            try:
                types = bytes(map(_TYPE_CODES.__getitem__, [b["type"] for b in blobs]))
            except KeyError as exc:
                raise FormatError(f"index entry malformed: unknown blob type {exc}") from exc
            offsets = _column([b["offset"] for b in blobs])
            lengths = _column([b["length"] for b in blobs])
            plain = [b.get("uncompressed_length") for b in blobs]
            if _NOT_COMPRESSED in plain:
                raise FormatError(f"uncompressed length {_NOT_COMPRESSED} is out of range")
            plain_lengths = _column([_NOT_COMPRESSED if p is None else p for p in plain])
        except FormatError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise FormatError(f"index entry malformed: {exc}") from exc
        columns.append((pack_id, ids, types, offsets, lengths, plain_lengths))
    return columns


def _columns_of_pack(pack_id: bytes, blobs: PackBlobs) -> IndexColumns:
    ids, tree, lengths, uncompressed = blobs.columns()
    return (
        pack_id,
        ids,
        tree,  # a row's type code: 0 data, 1 tree (``_TYPES``)
        array("Q", accumulate(lengths[:-1], initial=0)) if lengths else array("Q"),
        array("Q", lengths),
        array("Q", [_NOT_COMPRESSED if u is None else u for u in uncompressed]),
    )


def _column(values: list[Any]) -> array[int]:
    """``values`` as a column: each must be a non-negative integer (not a bool) below
    2^64."""
    if values and set(map(type, values)) != {int}:
        wrong = next(v for v in values if type(v) is not int)
        raise FormatError(f"expected a non-negative integer, got {wrong!r}")
    try:
        return array("Q", values)
    except OverflowError:
        wrong = min(values) if min(values) < 0 else max(values)
        raise FormatError(f"expected a non-negative integer below 2^64, got {wrong}") from None
