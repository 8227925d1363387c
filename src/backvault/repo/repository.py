"""An open restic repository: its config and master key, blobs and trees read and
verified through the index, unpacked files (index files, snapshots), pack headers.

Key slots live in ``keys``, the in-memory index in ``index``, snapshots in
``snapshots``; ``Repository`` keeps their methods as its own, so callers need one object.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cachetools import LRUCache

from backvault.crypto.aead import AuthenticationFailed, Key
from backvault.crypto.slotlabel import SlotLabel
from backvault.repo import format as fmt
from backvault.repo import keys, snapshots
from backvault.repo.blobs import (
    BlobEntry,
    BlobLocation,
    BlobReader,
    blob_lengths_fit,
    check_blob_size,
    decode_pack_header_blob,
)
from backvault.repo.errors import DamagedObject, NotARepository, RepositoryError, WrongKey
from backvault.repo.format import BlobType, Config, IndexFile, Node, PackedBlob, Snapshot
from backvault.repo.index import Index, IndexBuilder, IndexColumns, index_columns_of_json
from backvault.repo.index_cache import IndexCacheStore, open_index_cache, seal_index_cache
from backvault.repo.keys import KeySlot
from backvault.repo.polynomial import random_irreducible
from backvault.storage import Backend, FileType, ObjectNotFound, StorageError

__all__ = ["KeySlot", "Repository"]

# The decoded trees kept in memory, bounded by their nodes (each a few hundred bytes in
# Python), not by their number: a count of 4096 trees let 5 million fifo nodes of a 2.4 MB
# repository (whose trees compress to nothing) hold 2.4 GB. A tree with more than a
# quarter of this is never kept; a tree with no node counts as one.
TREE_CACHE_NODES = 200_000


class Repository:
    """Opened with a master key; every read is verified (hash and MAC) before use."""

    def __init__(self, backend: Backend, key: Key, config: Config, key_id: str | None) -> None:
        self.backend = backend
        self.key = key
        self.config = config
        self.key_id = key_id
        self._index = Index()
        self._scanned_unindexed = False
        self._scan_lock = threading.Lock()
        self._index_loaded = False
        # The local index cache, if the caller keeps one (the CLI does): read by
        # ``ensure_index``, written by ``store_index_cache``.
        self.index_cache: IndexCacheStore | None = None
        # The index files whose blobs are what the index holds, and how many listings
        # they have: the cache is written only while the index is exactly them.
        self._indexed_names: list[str] = []
        self._indexed_rows = 0
        # Packs indexed in memory that no index file written since lists yet.
        self._packs_in_no_index_file: set[bytes] = set()
        self._cache_bookkeeping = threading.Lock()  # for the three above
        self._cache_current = False
        self._tree_cache: LRUCache[bytes, list[Node]] = LRUCache(
            TREE_CACHE_NODES, getsizeof=_tree_cost
        )
        self._tree_cache_lock = threading.Lock()
        self.reader = BlobReader(backend, key)
        # Locks this process holds on the repository now (``lock.RepositoryLock``).
        self.locks_held = 0

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        backend: Backend,
        secret: bytes,
        label: SlotLabel | None = None,
        sqlite_chunk_kib: int | None = None,
    ) -> Repository:
        """Create a repository with a new master key and one key file for ``secret``.
        ``sqlite_chunk_kib``: the SQLite chunk size every backup to it uses (None: the
        default, not written into the config)."""
        if backend.exists():
            raise RepositoryError(f"a repository already exists at {backend.location}")
        master = Key.generate()
        config = Config(
            version=fmt.REPOSITORY_VERSION,
            id=secrets.token_hex(32),
            chunker_polynomial=_random_polynomial_hex(),
            sqlite_chunk_kib=sqlite_chunk_kib,
        )
        backend.create()
        repo = cls(backend, master, config, None)
        repo.key_id = repo.add_key(secret, label)
        # The config goes last: until it exists, the location is not a repository.
        plain = fmt.encode_unpacked(config.to_json(), compress=False)
        backend.save(FileType.CONFIG, "config", master.seal(plain))
        return repo

    @classmethod
    def _load_config(cls, backend: Backend, key: Key) -> Config:
        try:
            raw = backend.load(FileType.CONFIG, "config")
        except ObjectNotFound as exc:
            raise NotARepository(
                f"there is no repository at {backend.location} (no config file); "
                "check the path or create one with `backvault init`"
            ) from exc
        try:
            return Config.from_json(fmt.decode_unpacked(key.open(raw)))
        except AuthenticationFailed as exc:
            raise WrongKey("this key does not open this repository") from exc
        except fmt.FormatError as exc:
            raise DamagedObject("config", str(exc)) from exc

    @classmethod
    def open(cls, backend: Backend, secret_candidates: Iterable[bytes]) -> Repository:
        """Open with the first key file that one of the candidate secrets opens."""
        if not backend.exists():
            raise NotARepository(
                f"there is no repository at {backend.location} (no config file); "
                "check the path or create one with `backvault init`"
            )
        master, name = keys.open_master_key(backend, secret_candidates)
        return cls(backend, master, cls._load_config(backend, master), name)

    @classmethod
    def open_with_master_key(cls, backend: Backend, key: Key) -> Repository:
        return cls(backend, key, cls._load_config(backend, key), None)

    # --- key slots ---------------------------------------------------------------------

    def add_key(self, secret: bytes, label: SlotLabel | None = None) -> str:
        """A new key file for ``secret`` (see ``keys.add_key``)."""
        return keys.add_key(self.backend, self.key, secret, label)

    def list_keys(self) -> list[KeySlot]:
        return keys.list_slots(self.backend, self.key, self.key_id)

    def relabel_legacy_keys(self) -> list[tuple[str, str]]:
        """See ``keys.relabel_legacy``; the session's own slot keeps its new id."""
        moved = keys.relabel_legacy(self.backend, self.key)
        for old, new in moved:
            if self.key_id == old:
                self.key_id = new
        return moved

    def remove_key(self, key_id: str) -> None:
        self.backend.remove(FileType.KEY, key_id)

    # --- listing -----------------------------------------------------------------------

    def list_objects(
        self, kind: FileType, unexpected: list[str] | None = None
    ) -> list[tuple[str, int]]:
        """``(name, size)`` of the objects in folder ``kind`` (data, index, snapshots,
        locks): the files named by a 64-hex-digit id. Any other file there
        (``data/ab/not-hex``) is not the repository's: it is left out, as restic leaves
        it out (so nothing parses its name, reads it or deletes it), and its name is
        added to ``unexpected`` (``check`` reports it)."""
        found = []
        for name, size in self.backend.list(kind):
            if fmt.is_object_name(name):
                found.append((name, size))
            elif unexpected is not None:
                unexpected.append(name)
        return found

    # --- unpacked files ----------------------------------------------------------------

    def load_unpacked(self, kind: FileType, name: str) -> Any:
        label = f"{kind.value}/{name}"
        raw = self._load_unpacked_json(kind, name)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise DamagedObject(label, f"bad JSON: {fmt.json_problem(exc)}") from exc

    def _load_unpacked_json(self, kind: FileType, name: str) -> bytes:
        """An unpacked file's JSON text, verified and decompressed (not decoded yet)."""
        label = f"{kind.value}/{name}"
        try:
            raw = self.backend.load(kind, name)
        except ObjectNotFound as exc:
            raise DamagedObject(label, "it is missing") from exc
        if fmt.sha256(raw).hex() != name:
            raise DamagedObject(label, "its content does not match its name (altered or truncated)")
        try:
            plain = self.key.open(raw)
            del raw  # an index file of 100 000 blobs: 5 MB sealed, 15 MB of JSON
            return fmt.unpacked_json(plain)
        except AuthenticationFailed as exc:
            raise DamagedObject(label, "it does not decrypt (MAC mismatch)") from exc
        except fmt.FormatError as exc:
            raise DamagedObject(label, str(exc)) from exc

    def save_unpacked(self, kind: FileType, document: Any) -> str:
        return self._save_plaintext(kind, fmt.encode_unpacked(document))

    def save_index_file(self, index: IndexFile) -> str:
        """``save_unpacked`` of ``index.to_json()``, without that document."""
        return self.save_index(index.packs, index.supersedes)

    def save_index(
        self, packs: Mapping[bytes, Collection[PackedBlob]], supersedes: Sequence[bytes] = ()
    ) -> str:
        """An index file of ``packs`` (``fmt.encode_index``); its name."""
        name = self._save_plaintext(FileType.INDEX, fmt.encode_index(packs, supersedes))
        with self._cache_bookkeeping:
            self._indexed_names.append(name)
            self._indexed_rows += sum(map(len, packs.values()))
            self._packs_in_no_index_file.difference_update(packs)
            self._cache_current = False
        return name

    def _save_plaintext(self, kind: FileType, plaintext: bytes) -> str:
        raw = self.key.seal(plaintext)
        name = fmt.sha256(raw).hex()
        self.backend.save(kind, name, raw)
        return name

    # --- index -------------------------------------------------------------------------

    def load_index(self, errors: list[DamagedObject] | None = None) -> None:
        """Read every index file. Damaged ones are collected in ``errors`` if given."""
        self._load_index(errors, use_cache=False)

    def _load_index(self, errors: list[DamagedObject] | None, use_cache: bool) -> None:
        names = [name for name, _ in self.list_objects(FileType.INDEX)]
        cached = self._cached_index(names) if use_cache else None
        covered: set[str] = set()
        if cached is not None:
            covered = set(cached[0])
        to_read = [name for name in names if name not in covered]
        # Files are read and decrypted 2 at a time, and decoded one at a time (decoding
        # holds the GIL anyway): each is held whole until decoded, and a file of 100 000
        # blobs is 15 MB of JSON.
        decoding = threading.Lock()
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(
                pool.map(lambda name: self._try_load_index_file(name, decoding), to_read)
            )
        builder = IndexBuilder()
        read: list[str] = []
        new_packs: list[IndexColumns] = []
        for name, result in zip(to_read, results, strict=True):
            if isinstance(result, DamagedObject):
                if errors is None:
                    raise result
                errors.append(result)
                continue
            read.append(name)
            if cached is None:
                builder.add_columns(result)
            else:
                new_packs.extend(result)
        del results
        if cached is None:
            self._index = builder.finish()
            self._indexed_names = read
        else:
            self._index = cached[1]
            self._index.add_files(new_packs)
            self._indexed_names = cached[0] + read
        del new_packs
        self._indexed_rows = self._index.row_count()
        # A cache that had every file listed now (and no more) need not be written again.
        self._cache_current = cached is not None and not read and len(covered) == len(names)
        self._index_loaded = True

    def _cached_index(self, names: list[str]) -> tuple[list[str], Index] | None:
        """The cached index, if there is one and every file it was made of is listed."""
        if self.index_cache is None:
            return None
        cached = open_index_cache(self.key, self.index_cache)
        if cached is None or not set(cached[0]) <= set(names):
            return None  # made for another repository, damaged, or the index was rewritten
        return cached

    def store_index_cache(self) -> bool:
        """Write the local index cache, if there is a store for it and the index is
        exactly the index files it was read from and this run wrote: every pack indexed in
        memory is in one of them, and they list as many blobs as the index holds (not after
        packs were indexed from their headers, nor by a writer that leaves its index to its
        caller). OSError if the store cannot keep it. Whether it was written."""
        if (
            self.index_cache is None
            or not self._index_loaded
            or self._cache_current
            or self._scanned_unindexed
            or self._packs_in_no_index_file
            or self._index.row_count() != self._indexed_rows
        ):
            return False
        parts = seal_index_cache(self.key, self._indexed_names, self._index)
        try:
            self.index_cache.save(parts)
        finally:
            parts.close()  # its views of the index's arrays go, whatever the store did
        self._cache_current = True
        return True

    def _try_load_index_file(
        self, name: str, decoding: threading.Lock
    ) -> list[IndexColumns] | DamagedObject:
        try:
            text: bytes | str = self._load_unpacked_json(FileType.INDEX, name)
            with decoding:
                # As text from now on (the bytes go: 15 MB for 100 000 blobs).
                with contextlib.suppress(UnicodeDecodeError):
                    text = text.decode() if isinstance(text, bytes) else text
                return index_columns_of_json(text)
        except DamagedObject as exc:
            return exc
        except fmt.FormatError as exc:
            return DamagedObject(f"index/{name}", str(exc))

    def ensure_index(self) -> None:
        """Load the index. If index files are damaged, the packs they covered are indexed
        from their own headers instead, so reads and restores go on (`check` reports the
        damage)."""
        if not self._index_loaded:
            errors: list[DamagedObject] = []
            self._load_index(errors, use_cache=True)
            if errors:
                self._scanned_unindexed = True
                self.index_unindexed_packs()

    def index_unindexed_packs(self) -> int:
        """Add every pack no index lists to the in-memory index, from its header."""
        added = 0
        for name, size in self.list_objects(FileType.DATA):
            pack_id = bytes.fromhex(name)
            if self._index.has_pack(pack_id):
                continue
            try:
                blobs = self.read_pack_header(name, size)
            except DamagedObject:
                continue
            self.add_to_index(pack_id, blobs)
            added += 1
        return added

    def indexed_pack_ids(self) -> list[bytes]:
        return self._index.pack_ids()

    def indexed_pack_lister(self) -> Callable[[bytes], list[PackedBlob] | None]:
        """``indexed_packs().get``, without all of them at once (``Index.pack_lister``)."""
        return self._index.pack_lister()

    def indexed_packs(self) -> dict[bytes, list[PackedBlob]]:
        """Every pack the index files list, with all its blobs (duplicates included)."""
        return self._index.packs

    def lookup(self, blob_id: bytes, kind: BlobType | None = None) -> BlobLocation | None:
        """Where the index has a blob (as a blob of type ``kind``, if given)."""
        return self._index.lookup(blob_id, kind)

    def has_blob(self, blob_id: bytes) -> bool:
        return self._index.has(blob_id)

    def has_blobs(self, blob_ids: Iterable[bytes]) -> bool:
        """Whether the index has every one of ``blob_ids``."""
        return self._index.has_all(blob_ids)

    def assume_empty_index(self) -> None:
        """Start with an empty index instead of reading the index files (a worker process
        that only writes packs, and dedupes against what it is told)."""
        self._index_loaded = True

    def blob_ids(self) -> list[bytes]:
        """Every indexed blob id (once)."""
        return self._index.ids()

    def blob_ids_joined(self) -> bytes:
        """Every indexed blob id, 32 bytes each, back to back (one stored twice may be
        there twice): for a set of them, without a list of ids first."""
        return self._index.ids_joined()

    def add_to_index(self, pack_id: bytes, blobs: Iterable[PackedBlob]) -> None:
        with self._cache_bookkeeping:
            self._packs_in_no_index_file.add(pack_id)
        self._index.add_pack(pack_id, blobs)

    # --- blobs and trees ---------------------------------------------------------------

    def decrypt_blob(self, blob: PackedBlob, sealed: bytes, label: str) -> bytes:
        """Decrypt, decompress and verify one blob's bytes as read from its pack."""
        return self.reader.open_blob(blob, sealed, label)

    def locate(self, blob_id: bytes, kind: BlobType | None = None) -> BlobLocation:
        """Where a blob is stored, as a blob of type ``kind`` if given; DamagedObject if no
        index (nor pack header) lists it so, or if it claims more bytes than a blob of its
        type may hold."""
        location = self._locate(blob_id)
        if kind is not None and location.blob.type is not kind:
            as_kind = self.lookup(blob_id, kind)
            if as_kind is None:
                raise DamagedObject(
                    f"blob {blob_id.hex()[:12]}",
                    f"it is a {location.blob.type.value} blob, used as a {kind.value} blob",
                )
            location = as_kind
        check_blob_size(location.blob, f"data/{location.pack_id.hex()}")
        return location

    def locate_entry(self, blob_id: bytes, kind: BlobType) -> tuple[bytes, BlobEntry]:
        """``locate(blob_id, kind)`` as its pack id and blob entry (id, offset, length,
        uncompressed length), without an object per blob: a restore asks this for every
        blob of a database. The same checks and errors as ``locate``."""
        self.ensure_index()
        found = self._index.lookup_entry(blob_id, kind)
        if found is not None:
            pack_id, offset, length, uncompressed = found
            if blob_lengths_fit(kind, length, uncompressed):
                return pack_id, (blob_id, offset, length, uncompressed)
        # Not indexed (so a scan of unindexed packs, once), of another type, or too big
        # or too small: ``locate`` finds it or says what is wrong.
        location = self.locate(blob_id, kind)
        blob = location.blob
        return location.pack_id, (blob_id, blob.offset, blob.length, blob.uncompressed_length)

    def _locate(self, blob_id: bytes) -> BlobLocation:
        self.ensure_index()
        location = self._index.lookup(blob_id)
        if location is None:
            # Index files lost or damaged: index the packs no index lists from their own
            # headers, once, and look again.
            with self._scan_lock:
                if not self._scanned_unindexed:
                    self._scanned_unindexed = True
                    self.index_unindexed_packs()
            location = self._index.lookup(blob_id)
        if location is None:
            raise DamagedObject(f"blob {blob_id.hex()[:12]}", "it is not in any index")
        return location

    def load_blob(self, blob_id: bytes, kind: BlobType | None = None) -> bytes:
        location = self.locate(blob_id, kind)
        pack = location.pack_id.hex()
        label = f"data/{pack}"
        try:
            sealed = self.backend.load(
                FileType.DATA, pack, location.blob.offset, location.blob.length
            )
        except ObjectNotFound as exc:
            raise DamagedObject(label, "the pack is missing") from exc
        except StorageError as exc:
            raise DamagedObject(label, str(exc)) from exc
        if len(sealed) != location.blob.length:
            raise DamagedObject(label, "the pack is truncated")
        return self.decrypt_blob(location.blob, sealed, label)

    def load_tree(self, tree_id: bytes, keep: bool = True) -> list[Node]:
        """A tree's nodes, from the tree cache or read; ``keep`` False: not added to the
        cache (a walk that reads each tree once: ``check``, whose trees of big databases
        held ~26 MB each there for nothing)."""
        with self._tree_cache_lock:
            cached = self._tree_cache.get(tree_id)
            if cached is not None:
                return cached
        try:
            nodes = fmt.decode_tree(self.load_blob(tree_id, BlobType.TREE))
        except fmt.FormatError as exc:
            raise DamagedObject(f"tree {tree_id.hex()[:12]}", str(exc)) from exc
        if not keep or _tree_cost(nodes) > TREE_CACHE_NODES // 4:
            return nodes  # a huge folder would push out everything else: not kept
        with self._tree_cache_lock:
            self._tree_cache.setdefault(tree_id, nodes)
        return nodes

    # --- pack headers ------------------------------------------------------------------

    def read_pack_header(self, pack_id: str, size: int | None = None) -> list[PackedBlob]:
        label = f"data/{pack_id}"
        try:
            if size is None:
                size = self.backend.stat(FileType.DATA, pack_id)
            tail = self.backend.load(FileType.DATA, pack_id, max(0, size - 4), 4)
        except ObjectNotFound as exc:
            raise DamagedObject(label, "the pack is missing") from exc
        if len(tail) != 4:
            raise DamagedObject(label, "the pack is truncated")
        try:
            offset, length = fmt.pack_header_span(size, int.from_bytes(tail, "little"))
        except fmt.FormatError as exc:
            raise DamagedObject(label, str(exc)) from exc
        sealed = self.backend.load(FileType.DATA, pack_id, offset, length)
        return decode_pack_header_blob(self.key, sealed, offset, label)

    # --- snapshots ---------------------------------------------------------------------

    def list_snapshots(
        self, errors: list[DamagedObject] | None = None
    ) -> list[tuple[str, Snapshot]]:
        """All snapshots, oldest first. Damaged ones go to ``errors`` or raise."""
        return snapshots.list_snapshots(self, errors)

    def find_snapshot(self, ref: str, paths: list[str] | None = None) -> tuple[str, Snapshot]:
        """``latest`` or an id prefix (at least 4 hex digits, as restic allows)."""
        return snapshots.find_snapshot(self, ref, paths)

    def save_snapshot(self, snapshot: Snapshot) -> str:
        return self.save_unpacked(FileType.SNAPSHOT, snapshot.to_json())

    def remove_snapshot(self, name: str) -> None:
        """Remove one snapshot file (``forget``; the caller holds the exclusive lock). The
        data it alone referenced stays until ``prune``."""
        self.backend.remove(FileType.SNAPSHOT, name)


def _tree_cost(nodes: list[Node]) -> int:
    """What a decoded tree costs in the tree cache: its nodes (one for an empty tree)."""
    return len(nodes) + 1


def _random_polynomial_hex() -> str:
    """The config's chunker polynomial (restic's chunker uses it; ours is keyed instead)."""
    return f"{random_irreducible():x}"
