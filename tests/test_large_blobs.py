"""Large blobs and the index written without big copies (issue 15's memory work), checked
from the bytes stored, by restic and through crashes: blobs over 1 MiB sealed a slice at
a time, those over a pack's target in a pack of their own, ``add_parts`` (a tree read
twice), packs waiting for their index file kept as headers (``PackBlobs``), and the index
cache sealed as it is written. (From a red-team session's probes.)"""

from __future__ import annotations

import hashlib
import itertools
import random
import struct
import threading
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from backvault.repo import format as fmt
from backvault.repo.format import BlobType, PackedBlob
from backvault.repo.repository import Repository
from backvault.repo.writer import LARGE_BLOB_BYTES, PACK_TARGET_SIZE, RepositoryWriter
from backvault.storage import FileType, LocalBackend
from tests.conftest import InitRepo
from tests.test_restic_interop import restic
from tests.test_spool import NoSpool, _hidden

MIB = LARGE_BLOB_BYTES


def _writer(repo: InitRepo, spooled: bool) -> RepositoryWriter:
    backend = LocalBackend(repo.path)
    return RepositoryWriter(
        Repository.open(backend if spooled else NoSpool(backend), [repo.key.encode()])
    )


def verify_packs(repo: InitRepo | Path, secret: str | None = None) -> dict[bytes, list[PackedBlob]]:
    """Every pack checked independently of the writer: its name is its hash, its header
    lists blobs back to back that fill it, each opens to bytes of its id and length, and
    the index lists exactly what the header does."""
    if isinstance(repo, Path):
        assert secret is not None
        opened = Repository.open(LocalBackend(repo), [secret.encode()])
    else:
        opened = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    opened.ensure_index()
    key = opened.key
    packs: dict[bytes, list[PackedBlob]] = {}
    for name, size in opened.backend.list(FileType.DATA):
        raw = opened.backend.load(FileType.DATA, name)
        assert len(raw) == size
        assert hashlib.sha256(raw).hexdigest() == name
        header_length = int.from_bytes(raw[-4:], "little")
        header = key.open(raw[-4 - header_length : -4])
        blobs = fmt.decode_pack_header(header)
        offset = 0
        for blob in blobs:
            assert blob.offset == offset
            plain = key.open(raw[blob.offset : blob.offset + blob.length])
            if blob.uncompressed_length is not None:
                plain = zstandard.ZstdDecompressor().decompress(
                    plain, max_output_size=blob.uncompressed_length
                )
                assert len(plain) == blob.uncompressed_length
            assert hashlib.sha256(plain).digest() == blob.id
            located = opened.lookup(blob.id)
            assert located is not None
            assert located.pack_id.hex() == name if hasattr(located, "pack_id") else True
            assert located.blob == blob, (located.blob, blob)
            offset += blob.length
        assert offset + header_length + 4 == size
        packs[bytes.fromhex(name)] = blobs
    return packs


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_boundary_sizes_store_blobs_matching_their_ids(repo: InitRepo, spooled: bool) -> None:
    rng = random.Random(1)
    writer = _writer(repo, spooled)
    blobs: list[bytes] = []
    target = PACK_TARGET_SIZE
    for size in (0, 1, MIB - 1, MIB, MIB + 1, 3 * MIB + 7, target, target + 1):
        blobs.append(b"x" * size)  # compresses
        blobs.append(rng.randbytes(size))  # does not
        # nearly compresses enough: 1/32 saving threshold
        half = rng.randbytes(size - size // 33) + b"\0" * (size // 33)
        blobs.append(half)
    ids = []
    for n, data in enumerate(blobs):
        if n % 2:
            ids.append(writer.add(BlobType.DATA, data))
        else:  # from parts, cut at odd places, with empty parts
            cuts = sorted({0, len(data), *(rng.randrange(len(data) + 1) for _ in range(3))})
            pieces = [b""] + [data[a:b] for a, b in itertools.pairwise(cuts)] + [b""]
            ids.append(writer.add_parts(BlobType.DATA, lambda p=pieces: iter(p)))
    writer.flush()
    assert ids == [hashlib.sha256(b).digest() for b in blobs]
    verify_packs(repo)
    again = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    for blob_id, data in zip(ids, blobs, strict=True):
        assert again.load_blob(blob_id, BlobType.DATA) == data
    assert _hidden(repo.path) == []
    check = restic(repo.path, repo.key, "check", "--read-data", check=False)
    assert "no errors were found" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize("size", [3 * MIB, PACK_TARGET_SIZE + MIB])
@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_same_large_blob_from_two_threads(repo: InitRepo, spooled: bool, size: int) -> None:
    """Added twice at once: stored once, both callers given its id."""
    data = random.Random(2).randbytes(size)
    writer = _writer(repo, spooled)
    barrier = threading.Barrier(2)
    out: list[bytes] = []

    def go() -> None:
        barrier.wait()
        out.append(writer.add_parts(BlobType.DATA, lambda: iter([data[:MIB], data[MIB:]])))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.flush()
    assert len(set(out)) == 1 and len(out) == 2
    packs = verify_packs(repo)
    assert sum(len(b) for b in packs.values()) == 1


class Boom(BaseException):
    pass


@pytest.mark.parametrize(
    "parts_count", [3, PACK_TARGET_SIZE // MIB + 1], ids=["in-the-open-pack", "alone"]
)
@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, Boom])
@pytest.mark.parametrize("compressible", [True, False])
def test_a_failure_midway_leaves_no_spool_and_a_later_run_stores_the_blob(
    repo: InitRepo, spooled: bool, error: type[BaseException], compressible: bool, parts_count: int
) -> None:
    """An exception while a large blob is read the second time (to be sealed): no spool
    left, nothing stored, this writer's flush says so, and a later one stores it."""
    rng = random.Random(3)
    parts = [b"y" * MIB if compressible else rng.randbytes(MIB) for _ in range(parts_count)]
    readings = 0

    def failing() -> object:
        nonlocal readings
        readings += 1
        yield parts[0]
        yield parts[1]
        if readings >= (2 if compressible else 3):
            raise error("midway")
        yield from parts[2:]

    writer = _writer(repo, spooled)
    with pytest.raises(error):
        writer.add_parts(BlobType.DATA, failing)  # type: ignore[arg-type]
    assert _hidden(repo.path) == []
    # This run stays failed: the id is reserved but in no pack.
    with pytest.raises(RuntimeError, match="in no pack"):
        writer.flush()
    later = _writer(repo, spooled)
    blob_id = later.add_parts(BlobType.DATA, lambda: iter(parts))
    later.flush()
    assert blob_id == hashlib.sha256(b"".join(parts)).digest()
    verify_packs(repo)


def test_after_a_failed_store_the_writer_s_flush_fails(repo: InitRepo) -> None:
    """After a failed store of a large blob, the same writer counts it as stored by this
    run (reserved) and its flush fails: the run ends without a snapshot."""
    data = random.Random(4).randbytes(2 * MIB)
    readings = 0

    def failing() -> object:
        nonlocal readings
        readings += 1
        yield data[:MIB]
        if readings == 2:
            raise OSError("disk")
        yield data[MIB:]

    writer = _writer(repo, True)
    with pytest.raises(OSError):
        writer.add_parts(BlobType.DATA, failing)  # type: ignore[arg-type]
    assert writer.add(BlobType.DATA, data) == hashlib.sha256(data).digest()
    assert writer.stats.blobs_duplicate == 1
    with pytest.raises(RuntimeError, match="in no pack"):
        writer.flush()


def test_index_json_from_pack_blobs_equals_list(repo: InitRepo) -> None:
    rng = random.Random(5)
    packs: dict[bytes, list[PackedBlob]] = {}
    for _pack in range(5):
        blobs = []
        offset = 0
        for _blob in range(rng.randrange(0, 30)):
            length = rng.randrange(1, 5000) + 32
            unc = (
                None
                if rng.random() < 0.5
                else rng.choice([0, 1, 2**32 - 1, rng.randrange(0, 2**32)])
            )
            kind = BlobType.DATA if rng.random() < 0.7 else BlobType.TREE
            blobs.append(PackedBlob(rng.randbytes(32), kind, offset, length, unc))
            offset += length
        packs[rng.randbytes(32)] = blobs
    compact = {k: fmt.compact_pack_blobs(v) for k, v in packs.items()}
    assert fmt.encode_index(compact) == fmt.encode_index(packs)
    for k, v in compact.items():
        assert list(v) == packs[k] and len(v) == len(packs[k])
    # not back to back: kept as the list
    gap = [
        PackedBlob(b"a" * 32, BlobType.DATA, 0, 40, None),
        PackedBlob(b"b" * 32, BlobType.DATA, 41, 40, None),
    ]
    assert fmt.compact_pack_blobs(gap) is gap
    late = [PackedBlob(b"a" * 32, BlobType.DATA, 5, 40, None)]
    assert fmt.compact_pack_blobs(late) is late


def _random_pack(rng: random.Random, compressed: float, trees: float) -> list[PackedBlob]:
    blobs = []
    offset = 0
    for _blob in range(rng.randrange(0, 60)):
        length = rng.randrange(1, 5000) + 32
        unc = (
            rng.choice([0, 1, 2**32 - 1, rng.randrange(0, 2**32)])
            if rng.random() < compressed
            else None
        )
        kind = BlobType.TREE if rng.random() < trees else BlobType.DATA
        blobs.append(PackedBlob(rng.randbytes(32), kind, offset, length, unc))
        offset += length
    return blobs


@pytest.mark.parametrize(
    ("compressed", "trees"), [(1.0, 0.0), (0.0, 0.0), (1.0, 0.3), (0.0, 0.5), (0.5, 0.3)]
)
def test_pack_blobs_read_from_their_header_as_from_the_list(
    compressed: float, trees: float
) -> None:
    """A pack a backup wrote is kept, sent from a worker and indexed as its header
    (``PackBlobs``), read a column at a time (in one pass where every entry is of one
    size): the same fields, index text and index as from a list of its blobs, whatever
    the mix of compressed, stored and tree blobs."""
    import pickle

    from backvault.repo.index import Index

    rng = random.Random(int(compressed * 10 + trees * 100))
    packs = {rng.randbytes(32): _random_pack(rng, compressed, trees) for _ in range(40)}
    # Headers of one entry size whose ids hold the other kind's codes at its entry size.
    packs[rng.randbytes(32)] = [
        PackedBlob(bytes([2, 3, 0, 1] * 8), BlobType.DATA, 41 * i, 41, None) for i in range(41)
    ]
    compact = {k: fmt.compact_pack_blobs(v) for k, v in packs.items()}
    assert all(isinstance(v, fmt.PackBlobs) for v in compact.values())
    as_list, as_header = Index(), Index()
    for pack_id, blobs in packs.items():
        kept = compact[pack_id]
        assert fmt.blob_columns(kept) == fmt.blob_columns(blobs)
        assert fmt.blob_columns(kept).plaintext_bytes() == sum(b.plaintext_length for b in blobs)
        again = pickle.loads(pickle.dumps(kept))  # noqa: S301 - our own bytes
        assert list(again) == blobs and len(again) == len(blobs)
        as_list.add_pack(pack_id, blobs)
        as_header.add_pack(pack_id, kept)
    assert fmt.encode_index(compact) == fmt.encode_index(packs)
    assert as_header.to_state() == as_list.to_state()
    assert as_header.packs == as_list.packs == packs
    for blobs in packs.values():
        for blob in blobs:
            assert as_header.lookup(blob.id, blob.type) == as_list.lookup(blob.id, blob.type)


def test_a_pack_header_of_an_unknown_blob_type_is_refused() -> None:
    header = bytes([7]) + bytes(40)
    with pytest.raises(fmt.FormatError, match="unknown blob type 7"):
        fmt.PackBlobs(header, 1).columns()
    with pytest.raises(fmt.FormatError, match="unknown blob type 7"):
        fmt.encode_index({bytes(32): fmt.PackBlobs(header, 1)})


def _header_as_decoded(header: bytes) -> tuple[object, str | None]:
    """What ``decode_pack_header`` makes of a header: its columns and index text."""
    try:
        blobs = fmt.decode_pack_header(header)
    except fmt.FormatError as exc:
        return str(exc), None
    return fmt.blob_columns(blobs), ",".join(fmt._index_blob_text(b) for b in blobs)


def _header_as_read(header: bytes) -> tuple[object, str | None]:
    """The same, through the header readers (one pass where entries are of one size)."""
    try:
        columns: object = fmt.pack_header_columns(header)
    except fmt.FormatError as exc:
        columns = str(exc)
    try:
        text: str | None = fmt._index_text_of_header(header)
    except fmt.FormatError:
        text = None
    return columns, text


_PLAIN_ENTRIES = st.builds(
    struct.Struct("<BI32s").pack,
    st.sampled_from([0, 1]),
    st.integers(0, 2**32 - 1),
    st.binary(min_size=32, max_size=32),
)
_COMPRESSED_ENTRIES = st.builds(
    struct.Struct("<BII32s").pack,
    st.sampled_from([2, 3]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(min_size=32, max_size=32),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(_PLAIN_ENTRIES, _COMPRESSED_ENTRIES), max_size=40),
    st.sampled_from(["whole", "cut", "junk after", "junk"]),
    st.binary(max_size=50),
    st.integers(1, 40),
)
def test_any_pack_header_reads_as_decode_pack_header_reads_it(
    entries: list[bytes], how: str, junk: bytes, cut: int
) -> None:
    """Differential (from a red-team session): whatever the header (entries of both
    sizes, in any mix, truncated, with junk after, or junk), the one-pass readers give
    exactly the columns, index text and refusals of ``decode_pack_header``."""
    header = b"".join(entries)
    header = {
        "whole": header,
        "cut": header[:-cut],
        "junk after": header + junk,
        "junk": junk,
    }[how]
    assert _header_as_read(header) == _header_as_decoded(header)


def test_headers_whose_length_both_entry_sizes_divide_read_as_decoded() -> None:
    """41 plain entries are as long as 37 compressed ones: mixes of both, with ids made of
    type codes, are never taken for entries of one size."""
    rng = random.Random(1)
    for _trial in range(500):
        entries = [
            struct.pack("<BI32s", rng.choice([0, 1]), rng.randrange(2**32), rng.randbytes(32))
            for _ in range(rng.randrange(0, 41))
        ] + [
            struct.pack(
                "<BII32s",
                rng.choice([2, 3]),
                rng.randrange(2**32),
                rng.randrange(2**32),
                bytes(rng.choice([0, 1, 2, 3]) for _ in range(32)),
            )
            for _ in range(rng.randrange(0, 37))
        ]
        rng.shuffle(entries)
        header = b"".join(entries)
        assert _header_as_read(header) == _header_as_decoded(header)


def test_a_pack_whose_header_cannot_be_made_leaves_no_spool(
    repo: InitRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Found by a red-team session.) Making the header is part of saving the pack: if
    it fails, the pack's spool file is removed, as when writing it fails."""

    def unencodable(blobs: object) -> bytes:
        raise struct.error("'I' format requires 0 <= number <= 4294967295")

    writer = _writer(repo, True)
    writer.add(BlobType.DATA, random.Random(3).randbytes(3 * MIB))  # spooled
    assert _hidden(repo.path)
    monkeypatch.setattr(fmt, "encode_pack_header", unencodable)
    with pytest.raises(struct.error):
        writer.flush()
    assert not _hidden(repo.path)
    assert not [p for p in (repo.path / "data").rglob("*") if p.is_file()]


# --- the index cache --------------------------------------------------------------------

import os  # noqa: E402
from unittest import mock  # noqa: E402

from backvault.device.index_cache import IndexCacheFile  # noqa: E402
from backvault.repo import index_cache as index_cache_module  # noqa: E402
from tests.test_index_cache import opened, repo_path, store_blobs  # noqa: E402,F401


def _cached_repo(repo_path: Path, cache: Path) -> Repository:  # noqa: F811
    repo, _ = opened(repo_path, cache)
    store_blobs(repo, 3000, seed=7)
    return repo


def test_truncated_or_garbled_cache_is_refused(repo_path: Path, tmp_path: Path) -> None:  # noqa: F811
    cache = tmp_path / "cache" / "index"
    repo = _cached_repo(repo_path, cache)
    assert repo.store_index_cache()
    good = cache.read_bytes()
    opened_cache = index_cache_module.open_index_cache(repo.key, IndexCacheFile(cache))
    assert opened_cache is not None
    assert opened_cache[1].to_state() == repo._index.to_state()
    for cut in (0, 1, 15, 16, 17, 31, 32, 33, 48, len(good) // 2, len(good) - 1):
        cache.write_bytes(good[:cut])
        assert index_cache_module.open_index_cache(repo.key, IndexCacheFile(cache)) is None, cut
    for at in (0, 16, 40, len(good) // 2, len(good) - 17, len(good) - 1):
        garbled = bytearray(good)
        garbled[at] ^= 1
        cache.write_bytes(garbled)
        assert index_cache_module.open_index_cache(repo.key, IndexCacheFile(cache)) is None, at
    cache.write_bytes(good + b"\0")
    assert index_cache_module.open_index_cache(repo.key, IndexCacheFile(cache)) is None


class _DiskFull:
    """A file object whose third write fails as a full disk does."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.writes = 0

    def __enter__(self) -> _DiskFull:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()  # type: ignore[attr-defined]

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == 3:
            raise OSError(28, "No space left on device")
        return self.inner.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


_real_fdopen = os.fdopen


def _disk_full(fd: int, mode: str) -> _DiskFull:
    return _DiskFull(_real_fdopen(fd, mode))


def test_a_cache_write_failing_midway_keeps_the_old_cache(repo_path: Path, tmp_path: Path) -> None:  # noqa: F811
    cache = tmp_path / "cache" / "index"
    repo = _cached_repo(repo_path, cache)
    assert repo.store_index_cache()
    old = cache.read_bytes()
    store_blobs(repo, 3000, seed=8)  # the index changed: a new cache is due
    with (
        mock.patch("backvault.hardening.private_files.os.fdopen", _disk_full),
        pytest.raises(OSError),
    ):
        repo.store_index_cache()
    assert cache.read_bytes() == old
    assert [p.name for p in cache.parent.iterdir()] == ["index"]  # no temporary left
    # The exception was dropped: the generator is closed, the index may grow again.
    store_blobs(repo, 10, seed=9)


def test_a_kept_cache_write_error_does_not_pin_the_index(repo_path: Path, tmp_path: Path) -> None:  # noqa: F811
    """A failed cache write whose error the caller keeps (its traceback holds the
    half-taken generator) leaves no view of the index's arrays alive: it grows."""
    cache = tmp_path / "cache" / "index"
    repo = _cached_repo(repo_path, cache)
    kept: list[BaseException] = []
    with mock.patch("backvault.hardening.private_files.os.fdopen", _disk_full):
        try:
            repo.store_index_cache()
        except OSError as exc:
            kept.append(exc)
    assert kept
    store_blobs(repo, 10, seed=10)
    assert repo.store_index_cache()


# --- end to end: big trees through backup, restic, check, prune -------------------------

import sqlite3  # noqa: E402

from tests.conftest import Cli, tree_digest  # noqa: E402


def _big_database(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA page_size=8192")
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body BLOB)")
    db.executemany(
        "INSERT INTO m(body) VALUES (?)",
        ((((b"message %d " % n) * 700)[:7000],) for n in range(rows)),
    )
    db.commit()
    db.close()


def _folder_of_many_files(tmp_path: Path, count: int, suffix: str = "") -> tuple[Path, Path]:
    """``tmp_path/src`` with a folder ``many`` of ``count`` small files (its tree over
    1 MiB of JSON at a few thousand): the source and that folder."""
    source = tmp_path / "src"
    many = source / "many"
    many.mkdir(parents=True)
    for n in range(count):
        (many / f"file-{n:05d}{suffix}.txt").write_text(f"{n}\n")
    return source, many


def test_big_trees_through_backup_restic_check_and_prune(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source, many = _folder_of_many_files(tmp_path, 6000)
    (source / "db").mkdir()
    _big_database(source / "db" / "msgstore.db", 42_000)
    run = ["-r", str(repo.path)]
    cli.ok(*run, "backup", str(source), key=repo.key)
    opened_repo = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    opened_repo.ensure_index()
    packs = verify_packs(repo)
    big_trees = [
        blob
        for blobs in packs.values()
        for blob in blobs
        if blob.type is BlobType.TREE and blob.plaintext_length > MIB
    ]
    assert len(big_trees) >= 2, [(len(b), b[0].type) for b in packs.values()]
    # A second backup after changes, with the first as parent.
    db = sqlite3.connect(source / "db" / "msgstore.db")
    db.execute("UPDATE m SET body = ? WHERE id % 997 = 0", (b"changed" * 1000,))
    db.commit()
    db.close()
    (many / "file-00001.txt").write_text("changed\n")
    (many / "new.txt").write_text("new\n")
    cli.ok(*run, "backup", str(source), key=repo.key)
    expected = tree_digest(source)
    check = restic(repo.path, repo.key, "check", "--read-data", check=False)
    assert "no errors were found" in check.stdout, check.stdout + check.stderr
    target = tmp_path / "restored"
    restic(repo.path, repo.key, "restore", "latest", "--target", str(target))
    assert tree_digest(target / source.relative_to("/")) == expected
    cli.ok(*run, "check", "--read-data", key=repo.key)
    cli.ok(*run, "forget", "--keep-last", "1", key=repo.key)
    cli.ok(*run, "prune", "--max-unused", "0%", key=repo.key)
    verify_packs(repo)
    cli.ok(*run, "check", "--read-data", key=repo.key)
    check = restic(repo.path, repo.key, "check", "--read-data", check=False)
    assert "no errors were found" in check.stdout, check.stdout + check.stderr
    target2 = tmp_path / "restored2"
    cli.ok(*run, "restore", "latest", "--target", str(target2), key=repo.key)
    assert tree_digest(target2 / source.relative_to("/")) == expected


def test_prune_repacks_restic_s_big_data_chunks_without_small_packs(
    cli: Cli, tmp_path: Path
) -> None:
    """restic cuts chunks of up to 8 MiB: prune's repack puts those over a pack's target
    in packs of their own, and the others in packs as usual (a pack of its own for each
    chunk over 1 MiB made many small packs)."""
    rng = random.Random(21)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(rng.randbytes(12_000_000))
    (source / "b.bin").write_bytes(rng.randbytes(12_000_000))
    (source / "c.txt").write_bytes(b"compressible line\n" * 700_000)
    repo = tmp_path / "restic-repo"
    password = "a restic password"
    restic(repo, password, "init")
    restic(repo, password, "backup", str(source))
    (source / "b.bin").unlink()
    restic(repo, password, "backup", str(source))
    restic(repo, password, "forget", "--keep-last", "1")
    before = verify_packs(repo, password)
    big = sum(1 for blobs in before.values() for b in blobs if b.plaintext_length > MIB)
    cli.ok("-r", str(repo), "prune", "--max-unused", "0%", key=password)
    after = verify_packs(repo, password)
    assert big > 0
    small_alone = [
        b for b in after.values() if len(b) == 1 and b[0].plaintext_length <= PACK_TARGET_SIZE
    ]
    assert len(small_alone) <= 1, small_alone  # at most the writer's last pack
    check = restic(repo, password, "check", "--read-data", check=False)
    assert "no errors were found" in check.stdout, check.stdout + check.stderr
    cli.ok("-r", str(repo), "check", "--read-data", key=password)
    target = tmp_path / "restored"
    restic(repo, password, "restore", "latest", "--target", str(target))
    restored = target / source.relative_to("/")
    assert (restored / "a.bin").read_bytes() == (source / "a.bin").read_bytes()
    assert (restored / "c.txt").read_bytes() == (source / "c.txt").read_bytes()


KILL = "BACKVAULT_FAULT_KILL_AFTER_WRITES"


@pytest.mark.parametrize("point", range(0, 6))
def test_a_backup_with_a_big_tree_killed_at_each_write(
    cli: Cli, repo: InitRepo, tmp_path: Path, point: int
) -> None:
    source, many = _folder_of_many_files(tmp_path, 5000, suffix="-" + "x" * 40)
    run = ["-r", str(repo.path)]
    result = cli.run(*run, "backup", str(source), env={KILL: str(point)})
    assert result.code in (0, -9), result.err
    check = cli.run(*run, "check")
    assert check.code == 0, check.err
    for line in check.err.splitlines():
        assert line.startswith("warning: data/"), line
    (many / "file-00001.txt").write_text("changed\n")
    cli.ok(*run, "backup", str(source))
    cli.ok(*run, "check", "--read-data")
    cli.ok(*run, "prune")
    restic(repo.path, repo.key, "unlock")  # the killed run's lock (restic keeps it)
    restic_check = restic(repo.path, repo.key, "check", "--read-data", check=False)
    assert "no errors were found" in restic_check.stdout, restic_check.stdout + restic_check.stderr
    target = tmp_path / "restored"
    cli.ok(*run, "restore", "latest", "--target", str(target))
    assert tree_digest(target / source.relative_to("/")) == tree_digest(source)


# --- memory: a folder of many files (no long content list) -----------------------------

import tracemalloc  # noqa: E402

from backvault.repo.format import Node  # noqa: E402


def test_a_many_file_folder_s_tree_is_sealed_in_slices_as_add_does(repo: InitRepo) -> None:
    """``tree_parts`` gives a tree without long content lists (a folder of 60 000 photos)
    as one part, its whole JSON: ``add_parts`` seals it a MiB at a time, as ``add`` does
    (sealed whole, it took ~0.9x its JSON above the JSON itself; sliced, ~0.2x)."""
    rng = random.Random(31)
    nodes = [
        Node(
            name=f"IMG-{n:06d}-{rng.getrandbits(64):016x}.jpg",
            type="file",
            size=n,
            mode=0o644,
            content=[rng.randbytes(32)],
        )
        for n in range(60_000)
    ]
    peaks = {}
    for how in ("add", "add_parts"):
        writer = _writer(repo, True)
        nodes[0].size += 1  # another tree each time: nothing deduplicated
        parts = fmt.tree_parts(nodes)
        data = b"".join(parts())
        tracemalloc.start()
        try:
            if how == "add":
                writer.add(BlobType.TREE, data)
            else:
                writer.add_parts(BlobType.TREE, parts)
            peaks[how] = tracemalloc.get_traced_memory()[1]
            assert writer.stats.blobs_new == 1
        finally:
            tracemalloc.stop()
        writer.flush()
        del data
    size = len(fmt.encode_tree(nodes))
    assert peaks["add_parts"] < size * 2 // 5, (peaks, size)
