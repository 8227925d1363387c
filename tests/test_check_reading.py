"""`check --read-data` reads packs from a thread of its own while it walks the snapshots'
trees: what goes wrong in either still ends the check, and leaves nothing running."""

from __future__ import annotations

import errno
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backvault.engine import parallel
from backvault.engine.check import Checker
from backvault.repo.repository import Repository
from backvault.storage import FileType, LocalBackend, StorageError
from tests.conftest import Cli, make_tree, tree_digest

SECRET = b"c" * 32


@pytest.fixture(scope="module")
def repo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of one snapshot, in a few packs."""
    from backvault.engine.archiver import Backup

    base = tmp_path_factory.mktemp("check")
    source = make_tree(base / "src", seed=7, big=400_000)
    rng = random.Random(7)
    for i in range(40):
        (source / "media" / f"img{i}.jpg").write_bytes(rng.randbytes(200_000))
    repo = Repository.init(LocalBackend(base / "repo"), SECRET)
    Backup(repo).run([str(source)])
    return base / "repo"


@pytest.fixture
def on_threads() -> Iterator[None]:
    """Reading on threads of this process (worker processes reopen the backend from its
    description, without the faults the tests add)."""
    parallel.configure(worker_processes=0)
    try:
        yield
    finally:
        parallel.configure(worker_processes=None)


def reading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "backvault-check-read"]


class FailingReads(LocalBackend):
    """A disk that fails reading whole packs (what ``check --read-data`` reads; a tree is
    read as a range of its pack) after the first, with ``failure``."""

    def __init__(self, root: Path, failure: Exception) -> None:
        super().__init__(root)
        self.failure = failure
        self.loads = 0

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if kind is FileType.DATA and offset == 0 and length is None:
            self._whole_pack_read()
        return super().load(kind, name, offset, length)

    def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
        # A whole pack read into a buffer (a blob's range never spans its pack's header).
        if kind is FileType.DATA and offset == 0 and len(into) >= self.stat(kind, name):
            self._whole_pack_read()
        return super().load_into(kind, name, offset, into)

    def _whole_pack_read(self) -> None:
        self.loads += 1
        if self.loads > 1:
            raise self.failure


def test_a_clean_repository_reads_every_pack(repo_path: Path) -> None:
    repo = Repository.open(LocalBackend(repo_path), [SECRET])
    result = Checker(repo).run(read_data=True)
    assert result.errors == []
    packs = dict(repo.backend.list(FileType.DATA))
    assert result.bytes_read == sum(packs.values())
    assert result.trees >= 1 and result.snapshots == 1
    assert reading_threads() == []


def test_packs_are_read_into_a_kept_buffer_and_still_verified(
    repo_path: Path, tmp_path: Path, on_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole packs are read into one buffer a thread keeps (a pack over the kept size into
    an object of its own), and large stored blobs checked a slice at a time: every pack
    and blob of a clean repository reads, with either way of reading; a flipped byte in a
    media chunk, a cut pack and a pack grown since it was listed are still each reported."""
    from backvault.repo import blobs as blobs_module

    copy = tmp_path / "repo"
    shutil.copytree(repo_path, copy)
    repo = Repository.open(LocalBackend(copy), [SECRET])
    packs = sorted(repo.backend.list(FileType.DATA), key=lambda p: -p[1])
    expected = sum(size for _, size in packs)
    assert len(packs) >= 3 and packs[0][1] > 1_000_000  # packs of media chunks
    sliced: list[int] = []
    in_slices = blobs_module.BlobReader._check_stored_blob

    def counted(reader: blobs_module.BlobReader, blob, sealed, label):  # type: ignore[no-untyped-def]
        sliced.append(blob.length)
        in_slices(reader, blob, sealed, label)

    monkeypatch.setattr(blobs_module.BlobReader, "_check_stored_blob", counted)
    for kept in (16 * 1024 * 1024, packs[1][1] - 1):  # all kept; the two biggest not
        monkeypatch.setattr(blobs_module, "_KEPT_PACK_BUFFER_BYTES", kept)
        result = Checker(repo).run(read_data=True)
        assert result.errors == [] and result.bytes_read == expected
    assert sliced and min(sliced) > 256 * 1024  # large stored blobs were checked in slices
    names = [name for name, _ in packs]
    first = repo.backend._path(FileType.DATA, names[0])  # a media pack: large stored blobs
    data = bytearray(first.read_bytes())
    for at in range(1000, len(data) - 1000, 50_000):  # in every blob over 50 KB
        data[at] ^= 1
    first.write_bytes(bytes(data))
    second = repo.backend._path(FileType.DATA, names[1])
    second.write_bytes(second.read_bytes()[:-5])
    third = repo.backend._path(FileType.DATA, names[2])
    third.write_bytes(third.read_bytes() + b"more")
    errors = Checker(Repository.open(LocalBackend(copy), [SECRET])).run(read_data=True).errors
    for name in names[:3]:
        assert any(f"data/{name}" in error for error in errors), (name, errors)


class StatFails(LocalBackend):
    """A file system whose ``stat`` of a pack fails (EIO; ESTALE on NFS)."""

    def stat(self, kind: FileType, name: str) -> int:
        if kind is FileType.DATA:
            try:
                raise OSError(errno.EIO, "Input/output error")
            except OSError as exc:
                raise StorageError(f"cannot read {name}: {exc.strerror}") from exc
        return super().stat(kind, name)


class GrowsAfterStat(LocalBackend):
    """Bytes appended to a pack between the size check reads and the read itself."""

    grow: str = ""

    def stat(self, kind: FileType, name: str) -> int:
        size = super().stat(kind, name)
        if kind is FileType.DATA and name == self.grow:
            with open(self._path(kind, name), "ab") as handle:
                handle.write(b"appended")
        return size


def test_a_pack_in_a_path_that_is_no_longer_a_pack_is_reported(
    repo_path: Path, tmp_path: Path, on_threads: None
) -> None:
    """(From a red-team session.) A pack filed in the wrong ``data/`` folder with a plain
    file where its own folder should be (stat: "Not a directory"), a pack whose size
    cannot be read, and one that grew between its size and its read: each is reported
    against its pack, and the check goes on (it ended in "internal error" at the first)."""
    copy = tmp_path / "repo"
    shutil.copytree(repo_path, copy)
    backend = LocalBackend(copy)
    name = sorted(backend.list(FileType.DATA), key=lambda p: p[1])[0][0]
    path = backend._path(FileType.DATA, name)
    path.rename(copy / "data" / ("00" if name[:2] != "00" else "01") / name)
    shutil.rmtree(path.parent)
    path.parent.write_bytes(b"x")
    result = Checker(Repository.open(LocalBackend(copy), [SECRET])).run(read_data=True)
    assert any(f"data/{name} cannot be read" in e for e in result.errors), result.errors
    assert result.bytes_read > 0  # the other packs were read
    result = Checker(Repository.open(StatFails(repo_path), [SECRET])).run(read_data=True)
    assert result.errors and all("cannot be read" in e for e in result.errors)
    grows = GrowsAfterStat(copy)
    grows.grow = sorted(grows.list(FileType.DATA), key=lambda p: p[1])[-1][0]
    result = Checker(Repository.open(grows, [SECRET])).run(read_data=True)
    assert any(f"data/{grows.grow}" in e and "does not match" in e for e in result.errors)


def test_a_pack_that_cannot_be_read_is_reported(repo_path: Path, on_threads: None) -> None:
    failing = FailingReads(repo_path, StorageError("input/output error"))
    result = Checker(Repository.open(failing, [SECRET])).run(read_data=True)
    assert result.errors and all("input/output error" in error for error in result.errors)
    assert len(result.errors) == failing.loads - 1 >= 2
    assert reading_threads() == []


def test_a_failure_while_reading_ends_the_check_with_it(repo_path: Path, on_threads: None) -> None:
    """Not a storage error (a bug, say): raised from the check, as before it moved to a
    thread, not lost there."""
    failing = FailingReads(repo_path, RuntimeError("something unexpected"))
    with pytest.raises(RuntimeError, match="something unexpected"):
        Checker(Repository.open(failing, [SECRET])).run(read_data=True)
    assert reading_threads() == []


def test_a_damaged_pack_is_reported_after_the_trees_problems(
    repo_path: Path, tmp_path: Path
) -> None:
    work = tmp_path / "repo"
    shutil.copytree(repo_path, work)
    packs = sorted(p for p in (work / "data").rglob("*") if p.is_file())
    damaged = packs[len(packs) // 2]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.chmod(0o600)
    damaged.write_bytes(bytes(data))
    (work / "snapshots").joinpath("0" * 64).write_bytes(b"not a snapshot")

    repo = Repository.open(LocalBackend(work), [SECRET])
    errors = Checker(repo).run(read_data=True).errors
    snapshot = [at for at, error in enumerate(errors) if "0" * 8 in error]
    pack = [at for at, error in enumerate(errors) if damaged.name[:12] in error]
    assert snapshot and pack, errors
    assert max(snapshot) < min(pack)
    assert reading_threads() == []


@pytest.mark.parametrize("processes", [False, True])
def test_an_interrupt_while_the_trees_are_walked_stops_the_reading(
    repo_path: Path, monkeypatch: pytest.MonkeyPatch, processes: bool
) -> None:
    if not processes:
        parallel.configure(worker_processes=0)
    else:
        parallel.configure(worker_processes=2)
    started = threading.Event()

    def interrupted(self: Checker) -> None:
        assert reading_threads(), "the packs are read while the trees are walked"
        started.set()
        raise KeyboardInterrupt

    monkeypatch.setattr(Checker, "_check_snapshots_and_trees", interrupted)
    try:
        repo = Repository.open(LocalBackend(repo_path), [SECRET])
        with pytest.raises(KeyboardInterrupt):
            Checker(repo).run(read_data=True)
    finally:
        parallel.configure(worker_processes=None)
    assert started.is_set()
    assert reading_threads() == []


def test_files_that_are_not_repository_objects_are_reported_and_left_alone(
    repo_path: Path, tmp_path: Path, cli: Cli
) -> None:
    """Files whose names are no 64-digit id, in data/ (in a pack's folder, in a folder
    of their own) and in the other folders of objects: check names each as an error
    (it parsed data/ names as ids and ended in "internal error"); the other commands
    leave them out, as restic does (none reads, parses or deletes them)."""
    work = tmp_path / "repo"
    shutil.copytree(repo_path, work)
    pack_folder = next(p for p in sorted((work / "data").iterdir()) if p.is_dir())
    (work / "data" / "zz").mkdir()
    planted = [
        pack_folder / "not-hex",
        work / "data" / "zz" / ("z" * 64),
        pack_folder / ("AB" * 32),  # upper case: no name backvault or restic writes
        work / "index" / "not-hex",
        work / "snapshots" / "not-hex",
        work / "locks" / "not-hex",
    ]
    for path in planted:
        path.write_bytes(b"left here by someone else\n")
    key = SECRET.decode()
    for check in (["check"], ["check", "--read-data"], ["check", "--read-data-subset", "1/2"]):
        result = cli.run("-r", str(work), *check, key=key)
        assert result.code == 3 and "internal error" not in result.err, result.err
        for path in planted:
            assert (
                f"error: {path.parent.name if path.parent.parent == work else 'data'}/: "
                f"the file {path.name!r} is not a repository object (its name is not a "
                "64-digit hex id; backvault and restic ignore it): move it out of the "
                "repository"
            ) in result.err.splitlines(), result.err
        assert f"check found {len(planted)} problems" in result.err
    source = repo_path.parent / "src"
    for args in (
        ["snapshots"],
        ["restore", "latest", "--target", str(tmp_path / "restored")],
        ["backup", str(source)],
        ["prune"],
        ["repair", "index"],
        ["unlock"],
    ):
        result = cli.run("-r", str(work), *args, key=key)
        assert result.code == 0, (args, result.err)
    assert all(path.read_bytes() == b"left here by someone else\n" for path in planted)
    assert tree_digest(tmp_path / "restored" / source.relative_to("/")) == tree_digest(source)
