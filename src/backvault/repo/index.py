"""The in-memory index: where each blob is stored (pack, offset, length), by id.

Filled from the repository's index files and, for packs no index lists, from the packs'
own headers. The first location of an id wins; the same bytes stored as a blob of the
other type (a file holding a tree's JSON) are kept apart, as restic indexes by type and
id.
"""

from __future__ import annotations

from collections.abc import Iterable

from backvault.repo.blobs import BlobLocation
from backvault.repo.format import BlobType, IndexFile, PackedBlob


class Index:
    """Blob locations by id, and every indexed pack with all its blobs."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, BlobLocation] = {}
        # Blobs also stored as the other type than the one ``blobs`` has for their id.
        self._other_type: dict[bytes, BlobLocation] = {}
        self.packs: dict[bytes, list[PackedBlob]] = {}

    @classmethod
    def of_files(cls, files: Iterable[IndexFile]) -> Index:
        """The index the index files make together (a pack listed twice counts once, and
        a blob listed twice at one offset of it once)."""
        index = cls()
        packs: dict[bytes, dict[tuple[bytes, int], PackedBlob]] = {}
        for file in files:
            for pack_id, blobs in file.packs.items():
                entries = packs.setdefault(pack_id, {})
                for blob in blobs:
                    index._add_location(pack_id, blob)
                    entries[(blob.id, blob.offset)] = blob
        index.packs = {
            pack_id: sorted(entries.values(), key=lambda b: b.offset)
            for pack_id, entries in packs.items()
        }
        return index

    def _add_location(self, pack_id: bytes, blob: PackedBlob) -> None:
        found = self.blobs.setdefault(blob.id, BlobLocation(pack_id, blob))
        if found.blob.type is not blob.type:
            self._other_type.setdefault(blob.id, BlobLocation(pack_id, blob))

    def add_pack(self, pack_id: bytes, blobs: Iterable[PackedBlob]) -> None:
        blobs = list(blobs)
        for blob in blobs:
            self._add_location(pack_id, blob)
        self.packs[pack_id] = blobs

    def lookup(self, blob_id: bytes, kind: BlobType | None = None) -> BlobLocation | None:
        """Where a blob is (as a blob of type ``kind``, if given)."""
        location = self.blobs.get(blob_id)
        if kind is None or location is None or location.blob.type is kind:
            return location
        other = self._other_type.get(blob_id)
        return other if other is not None and other.blob.type is kind else None
