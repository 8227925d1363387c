"""A restore writes each run's verified plaintexts together (``BlobReader.write_run``
gathers them into one ``pwritev`` per ~256 KiB): every byte lands at its offset, whatever
mix of small and large, compressed and uncompressed blobs a run holds, and a damaged blob
in the middle of a run is reported as before while the rest of the restore goes on.
``check --read-data`` (``BlobReader.read_pack``, which decrypts every blob into one reused
buffer) still counts every good blob and names the damaged one."""

from __future__ import annotations

import errno
import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backvault.engine import parallel
from backvault.engine.check import Checker
from backvault.engine.restorer import Restorer
from backvault.engine.restorer.selection import group_runs
from backvault.repo import blobs as blobs_module
from backvault.repo import format as fmt
from backvault.repo.blobs import BlobReader
from backvault.repo.errors import DamagedObject
from backvault.repo.repository import Repository
from backvault.storage import FileType, LocalBackend
from backvault.storage import local as local_module
from tests.test_hostile_snapshots import Hostile


def _pieces(seed: int) -> list[bytes]:
    """Blobs of a database-like file: many 8 KiB pages that compress (text), some that do
    not (random), a few uncompressed blobs larger than one gathered write, one large
    compressible blob, and a few tiny ones."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(1400):
        kind = i % 7
        if kind in (0, 1, 2, 3):
            words = [f"message {seed}-{i}-{rng.randrange(10**6)} hello" for _ in range(200)]
            out.append(" ".join(words).encode()[:8192])
        elif kind == 4:
            out.append(rng.randbytes(rng.randrange(1, 8192)))
        elif kind == 5:
            out.append(rng.randbytes(4096))
        else:
            out.append(bytes([i % 256]) * rng.randrange(1, 64) + rng.randbytes(3))
        if i in (100, 700):
            out.append(rng.randbytes(600_000))  # more than one gathered write on its own
        if i == 900:
            out.append(b"z" * 3_000_000)  # compresses to a few hundred bytes
    return out


def short_pwritev(span: int) -> tuple[Callable[[int, list[Any], int], int], list[int]]:
    """``os.pwritev`` that writes less than asked: the first 1 to ``span`` bytes, a
    different cut each call (it ends inside a piece, or on a piece's edge); and the
    count of its calls."""
    real = os.pwritev
    calls = [0]

    def short(fd: int, buffers: list[Any], offset: int) -> int:
        calls[0] += 1
        limit = 1 + calls[0] * 7919 % span
        taken: list[memoryview] = []
        for buffer in buffers:
            view = memoryview(buffer)[:limit]
            taken.append(view)
            limit -= len(view)
            if not limit:
                break
        return real(fd, taken, offset)

    return short, calls


def _file(h: Hostile, name: str, pieces: list[bytes]) -> dict[str, Any]:
    node = h.file(name, b"")
    # compress=True for all: the writer stores a blob compressed only when that saves.
    node["content"] = [h.writer.add(fmt.BlobType.DATA, piece).hex() for piece in pieces]
    node["size"] = sum(len(piece) for piece in pieces)
    return node


def _damage(repo: Repository, blob_id: bytes, *, rename: bool = False) -> str:
    """Flip one byte in the middle of a stored blob (its ciphertext); with ``rename``, the
    pack is stored under the name of its new content, which ``check`` then reads. The
    pack's name."""
    location = repo.locate(blob_id, fmt.BlobType.DATA)
    pack = location.pack_id.hex()
    data = bytearray(repo.backend.load(FileType.DATA, pack))
    data[location.blob.offset + location.blob.length // 2] ^= 0x40
    backend = repo.backend
    assert isinstance(backend, LocalBackend)
    path = backend.root / "data" / pack[:2] / pack
    if rename:
        path.unlink()
        pack = fmt.sha256(data).hex()
        path = backend.root / "data" / pack[:2] / pack
    else:
        os.chmod(path, 0o600)
    path.write_bytes(bytes(data))
    return pack


def _victim(repo: Repository, pieces: list[bytes]) -> bytes:
    """A compressed page in the middle of the file (and of a long run)."""
    for piece in pieces[500:]:
        blob_id = fmt.sha256(piece)
        if len(piece) > 4096 and repo.locate(blob_id, fmt.BlobType.DATA).blob.compressed:
            return blob_id
    raise AssertionError("no compressed page")


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Hostile, list[bytes], list[bytes], str]:
    h = Hostile(tmp_path / "repo")
    good = _pieces(1)
    bad = _pieces(2)
    snapshot = h.snapshot([_file(h, "good.db", good), _file(h, "bad.db", bad)])
    return h, good, bad, snapshot


def _open(h: Hostile) -> Repository:
    return Repository.open(LocalBackend(h.path), [h.key.encode()])


def test_write_run_puts_every_byte_at_its_offset(
    stored: tuple[Hostile, list[bytes], list[bytes], str], tmp_path: Path
) -> None:
    h, good, _, _ = stored
    repo = _open(h)
    ids = [fmt.sha256(piece) for piece in good]
    runs = group_runs(repo, ids)
    assert any(len(run.entries) > 600 for run in runs)  # long runs: many gathered writes each
    assert any(entry[3] is not None for run in runs for entry in run.entries)
    assert any(entry[3] is None for run in runs for entry in run.entries)
    expected = b"".join(good)
    start = 12_345
    path = tmp_path / "out"
    path.write_bytes(b"\xaa" * (start + len(expected) + 100))
    reader = BlobReader(repo.backend, repo.key)
    fd = os.open(path, os.O_WRONLY)
    try:
        offset = start
        for run in reversed(runs):  # out of order, as workers may write them
            offset = start + sum(len(p) for p in good[: ids.index(run.entries[0][0])])
            written = reader.write_run(run.pack_id, run.entries, fd, offset)
            assert written == run.plaintext
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:start] == b"\xaa" * start
    assert data[start : start + len(expected)] == expected
    assert data[start + len(expected) :] == b"\xaa" * 100


def test_short_writes_are_continued(
    stored: tuple[Hostile, list[bytes], list[bytes], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pwritev may write less than asked: the rest follows at the right offset."""
    h, good, _, _ = stored
    short, calls = short_pwritev(20_000)
    monkeypatch.setattr(blobs_module.os, "pwritev", short)
    repo = _open(h)
    ids = [fmt.sha256(piece) for piece in good[:300]]
    path = tmp_path / "out"
    path.write_bytes(b"")
    reader = BlobReader(repo.backend, repo.key)
    fd = os.open(path, os.O_WRONLY)
    try:
        offset = 0
        for run in group_runs(repo, ids):
            offset += reader.write_run(run.pack_id, run.entries, fd, offset)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(good[:300])
    assert calls[0] > 100  # most gathered writes were cut short


def test_without_pwritev_each_piece_is_written_on_its_own(
    stored: tuple[Hostile, list[bytes], list[bytes], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, good, _, _ = stored
    monkeypatch.delattr(blobs_module.os, "pwritev")
    repo = _open(h)
    ids = [fmt.sha256(piece) for piece in good[:400]]
    path = tmp_path / "out"
    path.write_bytes(b"")
    reader = BlobReader(repo.backend, repo.key)
    fd = os.open(path, os.O_WRONLY)
    try:
        offset = 0
        for run in group_runs(repo, ids):
            offset += reader.write_run(run.pack_id, run.entries, fd, offset)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(good[:400])


def test_a_damaged_blob_in_the_middle_of_a_run_is_named(
    stored: tuple[Hostile, list[bytes], list[bytes], str], tmp_path: Path
) -> None:
    h, _, bad, _ = stored
    repo = _open(h)
    ids = [fmt.sha256(piece) for piece in bad]
    victim = _victim(repo, bad)
    _damage(repo, victim)
    repo = _open(h)
    runs = group_runs(repo, ids)
    run = next(run for run in runs if any(entry[0] == victim for entry in run.entries))
    assert run.entries[0][0] != victim and run.entries[-1][0] != victim
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(DamagedObject, match=f"blob {victim.hex()[:12]} does not decrypt"):
            BlobReader(repo.backend, repo.key).write_run(run.pack_id, run.entries, fd, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("processes", [2, 0], ids=["processes", "threads"])
def test_restore_writes_good_files_exactly_and_names_the_damaged_one(
    stored: tuple[Hostile, list[bytes], list[bytes], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    processes: int,
) -> None:
    h, good, bad, snapshot_id = stored
    victim = _victim(_open(h), bad)
    _damage(_open(h), victim)
    monkeypatch.setattr(parallel, "_requested_processes", processes)
    repo = _open(h)
    target = tmp_path / "target"
    outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1], snapshot_id)
    assert (target / "good.db").read_bytes() == b"".join(good)
    assert not (target / "bad.db").exists()
    assert [path for path, _ in outcome.damaged] == ["/bad.db"], outcome.damaged
    assert f"blob {victim.hex()[:12]} does not decrypt" in outcome.damaged[0][1]
    assert outcome.files == 1
    assert [p.name for p in target.iterdir()] == ["good.db"]


def test_check_counts_every_good_blob_and_names_the_damaged_one(
    stored: tuple[Hostile, list[bytes], list[bytes], str],
) -> None:
    h, _, bad, _ = stored
    repo = _open(h)
    clean = Checker(repo).run(read_data=True)
    assert clean.ok, clean.errors
    assert clean.blobs == sum(len(blobs) for blobs in repo.indexed_packs().values())
    victim = _victim(repo, bad)
    old = repo.locate(victim, fmt.BlobType.DATA).pack_id
    indexed = repo.indexed_packs()[old]
    pack = _damage(repo, victim, rename=True)
    report = BlobReader(repo.backend, repo.key).read_pack(pack)
    assert report.blobs_ok == len(indexed) - 1
    assert report.errors == [f"data/{pack} is damaged: blob {victim.hex()[:12]} does not decrypt"]
    assert report.header == [(b.id, b.offset, b.length, b.uncompressed_length) for b in indexed]
    result = Checker(_open(h)).run(read_data=True)
    assert result.blobs == clean.blobs - 1
    assert [e for e in result.errors if "does not decrypt" in e] == report.errors


def test_check_names_a_damaged_large_blob(
    stored: tuple[Hostile, list[bytes], list[bytes], str],
) -> None:
    """Blobs over 256 KiB are decrypted into objects of their own, not the reused
    buffer: damage is named all the same."""
    h, _, bad, _ = stored
    repo = _open(h)
    victim = next(fmt.sha256(piece) for piece in bad if len(piece) == 600_000)
    old = repo.locate(victim, fmt.BlobType.DATA).pack_id
    indexed = repo.indexed_packs()[old]
    pack = _damage(repo, victim, rename=True)
    report = BlobReader(repo.backend, repo.key).read_pack(pack)
    assert report.blobs_ok == len(indexed) - 1
    assert report.errors == [f"data/{pack} is damaged: blob {victim.hex()[:12]} does not decrypt"]


def _alternating(h: Hostile, name: str, count: int, seed: int) -> tuple[dict[str, Any], bytes]:
    """A file of ``count`` 8 KiB pages whose even pages are in one pack and odd ones in
    another: every run is one blob, as a database restored after days of scattered
    changes is (each change a run of its own, between runs of the first backup's packs)."""
    rng = random.Random(seed)
    pages = [
        (f"page {seed}-{i} " * 1000).encode()[:8192]
        if i % 3
        else rng.randbytes(8192)  # stored uncompressed: stays in the plaintext buffer
        for i in range(count)
    ]
    ids: list[str] = [""] * count
    for parity in (0, 1):
        for i in range(parity, count, 2):
            ids[i] = h.writer.add(fmt.BlobType.DATA, pages[i]).hex()
        h.writer.flush()
    node = {**h.file(name, b""), "content": ids, "size": 8192 * count}
    return node, b"".join(pages)


def test_short_runs_of_a_file_are_written_together_from_packs_kept_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """400 runs of one blob each: their plaintexts are gathered across runs (a handful
    of writes, not one or more per run), each pack is opened about once per batch of
    runs, and every byte is where it belongs."""
    h = Hostile(tmp_path / "repo")
    node, data = _alternating(h, "chat.db", 400, 1)
    snapshot_id = h.snapshot([node])
    writes: list[int] = []
    write = blobs_module._pwritev_all

    def counted(fd: int, pieces: list[bytes | memoryview], offset: int) -> None:
        writes.append(sum(len(piece) for piece in pieces))
        write(fd, pieces, offset)

    opened: list[str] = []
    real_open = os.open

    def watched_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if "/data/" in str(path):
            opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(blobs_module, "_pwritev_all", counted)
    monkeypatch.setattr(local_module.os, "open", watched_open)
    monkeypatch.setattr(parallel, "_requested_processes", 0)  # threads: calls seen here
    repo = _open(h)
    assert len(group_runs(repo, [bytes.fromhex(i) for i in node["content"]])) == 400
    target = tmp_path / "target"
    outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1])
    assert outcome.damaged == [] and outcome.files == 1
    assert (target / "chat.db").read_bytes() == data
    assert sum(writes) == len(data)
    assert len(writes) <= 40, writes  # was one per run: 400
    assert len(opened) <= 40, len(opened)  # was one per run


def test_write_run_gathers_across_runs_and_files_in_any_order(
    stored: tuple[Hostile, list[bytes], list[bytes], str], tmp_path: Path
) -> None:
    """One ``GatheredWrites`` for runs of two files, interleaved and out of order: bytes
    wait only while the next run continues the same file, and all land at their
    offsets."""
    h, good, bad, _ = stored
    repo = _open(h)
    reader = BlobReader(repo.backend, repo.key)
    work = []
    for name, pieces in (("a", good), ("b", bad)):
        ids = [fmt.sha256(piece) for piece in pieces]
        offsets = itertools.accumulate((len(p) for p in pieces), initial=0)
        at = dict(zip(ids, offsets, strict=False))
        for run in group_runs(repo, ids):
            work.append((name, run, at[run.entries[0][0]]))
    random.Random(5).shuffle(work)
    work.sort(key=lambda item: item[0] == "b" and item[2] % 3 == 0)  # some stretches in order
    fds = {name: os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT, 0o600) for name in ("a", "b")}
    gathered = blobs_module.GatheredWrites()
    try:
        with repo.backend.range_reader(FileType.DATA) as packs:
            for number, (name, run, offset) in enumerate(work):
                gathered.run = number
                written = reader.write_run(
                    run.pack_id, run.entries, fds[name], offset, gathered, packs
                )
                assert written == run.plaintext
                assert gathered.runs in ([], [number])
                assert gathered.pending <= 256 * 1024 + 3_000_000
            gathered.flush()
            assert gathered.runs == [] and gathered.pieces == []
    finally:
        for fd in fds.values():
            os.close(fd)
    assert (tmp_path / "a").read_bytes() == b"".join(good)
    assert (tmp_path / "b").read_bytes() == b"".join(bad)


def test_a_failed_write_makes_the_file_whose_bytes_it_held_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (EIO, not a full disk) held the bytes of several runs: the file
    they belong to is damaged and removed, never placed with a hole; the file beside it
    is restored."""
    h = Hostile(tmp_path / "repo")
    node, _ = _alternating(h, "chat.db", 300, 2)
    small = h.file("note.txt", b"fine\n")
    snapshot_id = h.snapshot([small, node])
    write = blobs_module._pwritev_all

    def failing(fd: int, pieces: list[bytes | memoryview], offset: int) -> None:
        if offset > 1_000_000:  # inside chat.db only
            raise OSError(errno.EIO, "Input/output error (test)")
        write(fd, pieces, offset)

    monkeypatch.setattr(blobs_module, "_pwritev_all", failing)
    monkeypatch.setattr(parallel, "_requested_processes", 0)  # threads: the hook applies
    repo = _open(h)
    target = tmp_path / "target"
    outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1])
    assert (target / "note.txt").read_bytes() == b"fine\n"
    assert [path for path, _ in outcome.damaged] == ["/chat.db"], outcome.damaged
    assert "cannot be written" in outcome.damaged[0][1]
    assert not (target / "chat.db").exists()
    assert sorted(p.name for p in target.iterdir()) == ["note.txt"]


def test_locate_entry_answers_and_refuses_as_locate_does(
    stored: tuple[Hostile, list[bytes], list[bytes], str],
) -> None:
    """The restore's runs are made with ``locate_entry``: the same location as
    ``locate`` for every blob, and the same refusal for a tree used as data and an id
    no index lists."""
    h, good, bad, snapshot_id = stored
    repo = _open(h)
    for piece in [*good, *bad]:
        blob_id = fmt.sha256(piece)
        location = repo.locate(blob_id, fmt.BlobType.DATA)
        blob = location.blob
        assert repo.locate_entry(blob_id, fmt.BlobType.DATA) == (
            location.pack_id,
            (blob_id, blob.offset, blob.length, blob.uncompressed_length),
        )
    tree = repo.find_snapshot(snapshot_id)[1].tree
    for blob_id in (tree, bytes(32)):
        with pytest.raises(DamagedObject) as expected:
            repo.locate(blob_id, fmt.BlobType.DATA)
        with pytest.raises(DamagedObject) as got:
            repo.locate_entry(blob_id, fmt.BlobType.DATA)
        assert str(got.value) == str(expected.value)
