"""A restore's worker writes the verified plaintexts of runs that follow one another in a
file together (``blobs.GatheredWrites``) and keeps the packs a batch reads open
(``Backend.range_reader``). Probes of a red team (a helper session, seventh session of
round two): bytes land exactly whatever the mix and order of runs, a failure is blamed on
the runs whose bytes it held and on no other file, a full disk stops the restore, and no
pack descriptor is left open or read around a backend's own reads."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from backvault.engine import parallel
from backvault.engine.errors import DiskFull
from backvault.engine.restorer import Restorer
from backvault.engine.restorer import files as files_module
from backvault.engine.restorer.files import RunNotWritten, restore_runs
from backvault.engine.restorer.selection import group_runs
from backvault.repo import blobs as blobs_module
from backvault.repo import format as fmt
from backvault.repo.blobs import BlobReader
from backvault.repo.repository import Repository
from backvault.storage import FileType, LocalBackend, StorageError
from backvault.storage import local as local_module
from tests.test_hostile_snapshots import Hostile
from tests.test_restore_runs import short_pwritev


def _two_files(tmp_path: Path) -> tuple[Hostile, list[bytes], list[bytes]]:
    h = Hostile(tmp_path / "repo")
    rng = random.Random(7)
    f = [rng.randbytes(3000 + i) for i in range(5)]
    g = [rng.randbytes(2000 + i) for i in range(5)]
    for piece in f + g:
        h.writer.add(fmt.BlobType.DATA, piece)
    h.writer.flush()
    return h, f, g


def _payloads(repo: Repository, pieces: list[bytes], target: str) -> list[Any]:
    out = []
    offset = 0
    for run in group_runs(repo, [fmt.sha256(p) for p in pieces]):
        out.append((run.pack_id, run.entries, target, offset))
        offset += run.plaintext
    return out


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_open: set[str] = frozenset()):
    h, f, g = _two_files(tmp_path)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    fpath, gpath = str(tmp_path / "f"), str(tmp_path / "g")
    for p in (fpath, gpath):
        Path(p).write_bytes(b"")

    def fake_open(staged: str) -> int:
        if staged in fail_open:
            raise OSError(errno.EMFILE, "Too many open files")
        return os.open(staged, os.O_WRONLY)

    monkeypatch.setattr(files_module, "open_staged", fake_open)
    runs = _payloads(repo, f, fpath) + _payloads(repo, g, gpath)
    return repo, f, g, fpath, gpath, runs


def test_open_failure_of_one_file_does_not_damage_the_file_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE opening G (a file the batch has not written yet) must fail G's run only: F's
    run, whose bytes still wait in the gathered writes, is written and counted."""
    repo, f, _g, fpath, _gpath, runs = _setup(tmp_path, monkeypatch, {str(tmp_path / "g")})
    assert len(runs) == 2
    outcomes = restore_runs(BlobReader(repo.backend, repo.key), runs)
    assert Path(fpath).read_bytes() == b"".join(f)  # F's bytes were written...
    assert outcomes[0] == len(b"".join(f)), outcomes  # ...but F is reported not written
    assert isinstance(outcomes[1], RunNotWritten)


def _fail_writes_to(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Every write to the file at ``path`` (as restore_runs opens it) fails with EIO."""
    real = os.pwritev
    real_open = files_module.open_staged
    failing: list[int] = []

    def opener(staged: str) -> int:
        fd = real_open(staged)
        if staged == path:
            failing.append(fd)
        return fd

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        if fd in failing:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(files_module, "open_staged", opener)
    monkeypatch.setattr(blobs_module.os, "pwritev", pwritev)


def test_a_write_error_of_one_file_does_not_fail_the_next_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO (or EFBIG) writing F fails F's run; G's run, in the same batch, never attempted
    before: it is written."""
    repo, _f, g, fpath, gpath, runs = _setup(tmp_path, monkeypatch)
    _fail_writes_to(monkeypatch, fpath)
    outcomes = restore_runs(BlobReader(repo.backend, repo.key), runs)
    assert isinstance(outcomes[0], RunNotWritten)
    assert outcomes[1] == len(b"".join(g)), outcomes
    assert Path(gpath).read_bytes() == b"".join(g)


def test_a_damaged_run_keeps_its_reason_when_its_waiting_bytes_fail_to_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F's run is found damaged after some of its blobs were verified (they wait to be
    written); writing those then fails: the run is still reported for the damage, the
    more useful reason, and G is written."""
    repo, _f, g, fpath, gpath, runs = _setup(tmp_path, monkeypatch)
    pack, entries, staged, offset = runs[0]
    _, at, length, plain = entries[-1]
    runs[0] = (pack, [*entries[:-1], (bytes(32), at, length, plain)], staged, offset)
    _fail_writes_to(monkeypatch, fpath)
    outcomes = restore_runs(BlobReader(repo.backend, repo.key), runs)
    assert "has the wrong content" in str(outcomes[0]), outcomes
    assert outcomes[1] == len(b"".join(g)), outcomes
    assert Path(gpath).read_bytes() == b"".join(g)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_offset_past_what_a_file_offset_can_hold_leaks_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index may give offsets up to 2^64 - 1; preadv refuses one of 2^63 or more with
    OverflowError (not OSError): the kept-open reader must close the pack all the same,
    and the hostile run must not fail F's run, which waits in the gathered writes."""
    repo, f, _g, fpath, gpath, runs = _setup(tmp_path, monkeypatch)
    pack, entries, _, _ = runs[1]
    blob_id, _, length, plain = entries[0]
    hostile = [(pack, [(blob_id, 1 << 63, length, plain)], gpath, 0)]
    reader = BlobReader(repo.backend, repo.key)
    before = _fds()
    outcomes = restore_runs(reader, runs[:1] + hostile)
    assert _fds() == before  # fails on ac30137: one descriptor of the pack leaked
    assert outcomes[0] == len(b"".join(f)), outcomes
    assert Path(fpath).read_bytes() == b"".join(f)


def _mixed(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        k = rng.randrange(10)
        if k < 4:
            out.append(rng.randbytes(rng.randrange(0, 9000)))
        elif k < 7:
            out.append((b"text %d " % rng.randrange(99)) * rng.randrange(1, 2000))
        elif k == 7:
            out.append(rng.randbytes(rng.randrange(200_000, 600_000)))
        elif k == 8:
            out.append(rng.randbytes(rng.randrange(1_000_000, 3_000_000)))
        else:
            out.append(b"")
    return out


@pytest.mark.parametrize("mode", ["plain", "short", "nopwritev"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_interleaved_runs_of_many_files_land_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, seed: int
) -> None:
    rng = random.Random(seed)
    h = Hostile(tmp_path / "repo")
    store = _mixed(rng, 120)
    for piece in store:
        h.writer.add(fmt.BlobType.DATA, piece)
    h.writer.flush()
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    files = {}
    runs: list[Any] = []
    for n in range(4):
        content = [rng.choice(store) for _ in range(60)]
        # runs in content order mostly, with stretches of storage order (long runs)
        path = str(tmp_path / f"file{n}")
        Path(path).write_bytes(b"\xee" * 10)
        files[path] = content
        runs.append(_payloads(repo, content, path))
    if mode == "short":
        monkeypatch.setattr(blobs_module.os, "pwritev", short_pwritev(300_000)[0])
    elif mode == "nopwritev":
        monkeypatch.delattr(blobs_module.os, "pwritev")
    monkeypatch.setattr(files_module, "open_staged", lambda p: os.open(p, os.O_WRONLY))
    # interleave: consecutive stretches of each file, and some runs reversed
    batch: list[Any] = []
    queues = [list(r) for r in runs]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        take = rng.randrange(1, 6)
        chunk, q[:] = q[:take], q[take:]
        if rng.random() < 0.2:
            chunk.reverse()
        batch.extend(chunk)
    reader = BlobReader(repo.backend, repo.key)
    for start in range(0, len(batch), 64):
        part = batch[start : start + 64]
        outcomes = restore_runs(reader, part)
        for (_, entries, _, _), outcome in zip(part, outcomes, strict=True):
            assert outcome == sum((e[3] if e[3] is not None else e[2] - 32) for e in entries), (
                outcome
            )
    for path, content in files.items():
        data = Path(path).read_bytes()
        expected = b"".join(content)
        assert data[: len(expected)] == expected


def _snapshot(tmp_path: Path, seed: int = 5) -> tuple[Hostile, dict[str, bytes], str]:
    rng = random.Random(seed)
    h = Hostile(tmp_path / "repo")
    store = [p for p in _mixed(rng, 80) if len(p) < 400_000]
    for piece in store:
        h.writer.add(fmt.BlobType.DATA, piece)
    nodes, expected = [], {}
    for n in range(5):
        content = [rng.choice(store) for _ in range(40)]
        node = h.file(f"f{n}", b"")
        node["content"] = [fmt.sha256(p).hex() for p in content]
        node["size"] = sum(map(len, content))
        nodes.append(node)
        expected[f"f{n}"] = b"".join(content)
    return h, expected, h.snapshot(nodes)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("err", [errno.EIO, errno.EFBIG])
def test_a_failed_write_never_leaves_a_restored_file_with_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int, err: int
) -> None:
    h, expected, snapshot_id = _snapshot(tmp_path)
    monkeypatch.setattr(parallel, "_requested_processes", 0)
    real = os.pwritev
    calls = 0

    def failing(fd: int, buffers: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise OSError(err, os.strerror(err))
        return real(fd, buffers, offset)

    monkeypatch.setattr(blobs_module.os, "pwritev", failing)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    target = tmp_path / "target"
    outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1], snapshot_id)
    damaged = {path.lstrip("/") for path, _ in outcome.damaged}
    assert damaged  # the failed write's file
    for name, data in expected.items():
        if name in damaged:
            assert not (target / name).exists()
        else:
            assert (target / name).read_bytes() == data, name
    assert outcome.files == len(expected) - len(damaged)


@pytest.mark.parametrize("fail_at", [1, 4, 9])
def test_a_full_disk_stops_the_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    h, expected, snapshot_id = _snapshot(tmp_path)
    monkeypatch.setattr(parallel, "_requested_processes", 0)  # threads: the hooks apply
    real = os.pwritev
    calls = 0

    def failing(fd: int, buffers: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    monkeypatch.setattr(blobs_module.os, "pwritev", failing)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    target = tmp_path / "target"
    with pytest.raises(DiskFull):
        Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1], snapshot_id)
    for name, data in expected.items():
        if (target / name).exists():
            assert (target / name).read_bytes() == data


def _many_packs(tmp_path: Path, n: int) -> tuple[Repository, list[bytes]]:
    h = Hostile(tmp_path / "repo")
    rng = random.Random(n)
    pieces = []
    for _ in range(n):
        piece = rng.randbytes(5000)
        h.writer.add(fmt.BlobType.DATA, piece)
        h.writer.flush()  # a pack each
        pieces.append(piece)
    return Repository.open(LocalBackend(h.path), [h.key.encode()]), pieces


def test_more_packs_than_kept_open_and_descriptors_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, pieces = _many_packs(tmp_path, 40)
    assert len({repo.locate(fmt.sha256(p), fmt.BlobType.DATA).pack_id for p in pieces}) == 40
    path = str(tmp_path / "out")
    Path(path).write_bytes(b"")
    monkeypatch.setattr(files_module, "open_staged", lambda p: os.open(p, os.O_WRONLY))
    content = pieces + pieces[::-1] + pieces[::3]
    runs = _payloads(repo, content, path)
    before = _fds()
    peak = 0
    real = local_module.read_into

    def counting(fd: int, view: memoryview, offset: int) -> int:
        nonlocal peak
        peak = max(peak, _fds() - before)
        return real(fd, view, offset)

    monkeypatch.setattr(local_module, "read_into", counting)
    outcomes = restore_runs(BlobReader(repo.backend, repo.key), runs)
    assert _fds() == before
    assert peak <= 16 + 1
    assert all(isinstance(o, int) for o in outcomes)
    assert Path(path).read_bytes() == b"".join(content)


def test_a_pack_removed_or_made_a_folder_mid_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack read once stays open; one removed after is still read (same name, same
    bytes: fine). A pack missing or a folder from the start is named damaged."""
    repo, pieces = _many_packs(tmp_path, 3)
    backend = repo.backend
    assert isinstance(backend, LocalBackend)
    locs = [repo.locate(fmt.sha256(p), fmt.BlobType.DATA).pack_id.hex() for p in pieces]
    (backend.root / "data" / locs[1][:2] / locs[1]).unlink()
    p2 = backend.root / "data" / locs[2][:2] / locs[2]
    p2.unlink()
    p2.mkdir()
    path = str(tmp_path / "out")
    Path(path).write_bytes(b"")
    monkeypatch.setattr(files_module, "open_staged", lambda p: os.open(p, os.O_WRONLY))
    runs = _payloads(repo, pieces, path)
    before = _fds()
    outcomes = restore_runs(BlobReader(repo.backend, repo.key), runs)
    assert _fds() == before
    assert outcomes[0] == 5000
    assert "missing" in str(outcomes[1])
    assert "Is a directory" in str(outcomes[2]), outcomes


def test_a_local_backend_subclass_that_fails_reads_is_still_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection by subclassing LocalBackend (as tests/test_check_reading.py does)
    overrides load_into; the kept-open reader must not read around it."""

    class FailingReads(LocalBackend):
        def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
            if kind is FileType.DATA:
                raise StorageError("injected")
            return super().load_into(kind, name, offset, into)

    repo, pieces = _many_packs(tmp_path, 2)
    backend = repo.backend
    assert isinstance(backend, LocalBackend)
    failing = FailingReads(backend.root)
    path = str(tmp_path / "out")
    Path(path).write_bytes(b"")
    monkeypatch.setattr(files_module, "open_staged", lambda p: os.open(p, os.O_WRONLY))
    outcomes = restore_runs(BlobReader(failing, repo.key), _payloads(repo, pieces, path))
    assert all("injected" in str(o) for o in outcomes), outcomes


def test_an_index_offset_of_2_to_the_63_damages_only_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Hostile(tmp_path / "repo")
    good = os.urandom(20_000)
    good_node = h.file("a-good", good)
    evil_blob = h.writer.add(fmt.BlobType.DATA, os.urandom(3000)).hex()
    h.writer.flush()
    evil = {**h.file("b-evil", b""), "content": [evil_blob], "size": 3000}
    h.rewrite_index_entry(evil_blob, offset=1 << 63)
    snapshot_id = h.snapshot([good_node, evil])
    monkeypatch.setattr(parallel, "_requested_processes", 0)  # threads: the hooks apply
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    target = tmp_path / "target"
    before = _fds()
    outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1], snapshot_id)
    repo.backend.close()
    assert [path for path, _ in outcome.damaged] == ["/b-evil"], outcome.damaged
    assert (target / "a-good").read_bytes() == good
    assert _fds() <= before, "a pack descriptor leaked"
