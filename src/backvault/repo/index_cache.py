"""The local index cache: the in-memory index as it was after the last run, so the next
run reads one file instead of decoding every index file again.

A big database's repository lists ~200 000 blobs; decoding their index files (JSON) and
grouping them takes ~0.5 s of every backup and restore, the most of a backup where
nothing changed. The cache holds the index's own arrays (``Index.to_state``) and the
names of the index files they came from. It is sealed with a key derived from the
repository's master key (so only that key opens it, and nothing the repository holds can
pass for it), and it is used only for index files that are still listed: an index file's
name is the SHA-256 of its content, so a listed name is the same content as when it was
cached. A listing without one of the cached names (a prune rewrote the index) or a cache
that does not open means the index files are read again, and the cache written anew.

Where the cache lives is the caller's business (``IndexCacheStore``: the CLI keeps it in
the user's cache folder); this module does no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Iterable, Sequence
from typing import Protocol

from backvault.crypto.aead import AuthenticationFailed, Key
from backvault.repo.format import ID_SIZE, FormatError, in_slices
from backvault.repo.index import Index

_PURPOSE = b"the local index cache"
_HEADER = b"backvault index cache 1\n"


class IndexCacheStore(Protocol):
    """Where a repository's sealed index cache is kept."""

    def load(self) -> bytes | None:
        """The saved bytes, or None if there are none (or they cannot be read)."""

    def save(self, sealed: Iterable[bytes]) -> None:
        """Keep ``sealed`` (parts, written one after another as they come) instead of what
        was saved, or, if it cannot, keep what was saved and raise OSError (or what
        ``sealed`` raises)."""


# The index's arrays are sealed in slices of this size: no ciphertext of a whole array.
_SLICE_BYTES = 1024 * 1024


def seal_index_cache(key: Key, names: Sequence[str], index: Index) -> Generator[bytes, None, None]:
    """The cache of ``index``, made of exactly the index files ``names``, in parts sealed
    as they are asked for (the index's arrays where they are, a slice at a time: not
    copied into one plaintext first, nor sealed whole; the end of a backup is when its
    process holds the most). The index cannot grow until the last part is taken or the
    generator closed (``close``: its views of the index's arrays go)."""
    listed = b"".join(bytes.fromhex(name) for name in names)
    parts = [_HEADER, struct.pack("<Q", len(names)), listed, *index.state_parts()]
    try:
        yield from key.derive(_PURPOSE).seal_stream(in_slices(parts, _SLICE_BYTES))
    finally:
        for part in parts:
            if isinstance(part, memoryview):
                part.release()  # the index's arrays may grow again


def open_index_cache(key: Key, store: IndexCacheStore) -> tuple[list[str], Index] | None:
    """The index file names and the index the cache in ``store`` holds; None if there is
    none, or it does not open with this repository's key or is not a whole cache of this
    version."""
    sealed = store.load()
    if sealed is None:
        return None
    try:
        plain = memoryview(key.derive(_PURPOSE).open(sealed))
    except (AuthenticationFailed, ValueError):
        return None
    del sealed  # ~13 MB, before the index's arrays are made
    at = len(_HEADER) + 8
    if len(plain) < at or bytes(plain[: len(_HEADER)]) != _HEADER:
        return None
    (count,) = struct.unpack("<Q", plain[len(_HEADER) : at])
    end = at + ID_SIZE * count
    if len(plain) < end:
        return None
    names = [bytes(plain[i : i + ID_SIZE]).hex() for i in range(at, end, ID_SIZE)]
    try:
        return names, Index.from_state(plain[end:])
    except FormatError:
        return None
