"""Packs written a part at a time (``Backend.spool``): a worker process no longer holds a
whole pack (8 MiB, and another being saved) in memory; and large blobs (a big folder's
tree) compressed and sealed in parts. What a spool must keep of
``save``: nothing is visible under a name before it is saved, a spool given up or left by
a killed process is never taken for an object, and stock restic reads a repository with
such leftovers."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from backvault.repo import format as fmt
from backvault.repo.format import BlobType, ContentIds, Node
from backvault.repo.repository import Repository
from backvault.repo.writer import LARGE_BLOB_BYTES, SPOOL_PART_BYTES, RepositoryWriter
from backvault.storage import FileType, LocalBackend, Spool, StorageError, open_backend
from backvault.storage.base import BackendWrapper
from tests.conftest import Cli, InitRepo, make_tree, tree_digest
from tests.test_restic_interop import restic


def _run_on(root: Path, script: str) -> subprocess.CompletedProcess[bytes]:
    """``script`` in a process of its own, with the repository's folder as its argument."""
    return subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True)


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "data").iterdir() if p.name.startswith("."))


def test_a_spooled_object_appears_whole_under_its_name_only_when_saved(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    spool = backend.spool(FileType.DATA)
    assert spool is not None
    parts = [os.urandom(100_000), b"", os.urandom(3)]
    for part in parts:
        spool.write(part)
        assert list(backend.list(FileType.DATA)) == []  # nothing listed while filling
    spool.save_as("ab" * 32)
    assert backend.load(FileType.DATA, "ab" * 32) == b"".join(parts)
    assert list(backend.list(FileType.DATA)) == [("ab" * 32, 100_003)]
    assert _hidden(backend.root) == []  # the spool became the object
    spool.discard()  # after saving: nothing to give up, the object stays
    assert backend.load(FileType.DATA, "ab" * 32) == b"".join(parts)


def test_a_discarded_spool_leaves_nothing_and_cannot_be_saved(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    spool = backend.spool(FileType.DATA)
    assert spool is not None
    spool.write(b"half a pack")
    assert len(_hidden(backend.root)) == 1
    spool.discard()
    assert _hidden(backend.root) == []
    with pytest.raises(StorageError, match="already saved or discarded"):
        spool.save_as("cd" * 32)
    assert list(backend.list(FileType.DATA)) == []


def test_a_killed_process_leaves_a_hidden_spool_removed_once_a_day_old(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    LocalBackend(root).create()
    killed = _run_on(
        root,
        "import os, signal, sys\n"
        "from backvault.storage import FileType, LocalBackend\n"
        "spool = LocalBackend(sys.argv[1]).spool(FileType.DATA)\n"
        "spool.write(b'x' * 100_000)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    assert killed.returncode == -signal.SIGKILL
    (left,) = _hidden(root)
    assert list(LocalBackend(root).list(FileType.DATA)) == []  # never taken for a pack
    LocalBackend(root).spool(FileType.DATA).discard()  # type: ignore[union-attr]
    assert _hidden(root) == [left]  # an hour-old one may belong to a process still at work
    day_old = time.time() - 25 * 3600
    os.utime(root / "data" / left, (day_old, day_old))
    LocalBackend(root).spool(FileType.DATA).discard()  # type: ignore[union-attr]
    assert _hidden(root) == []


def test_stock_restic_checks_and_restores_a_repository_with_spool_leftovers(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """Packs of a real backup written through spools (files larger than a spool part),
    plus the leftover of a killed process: restic's check --read-data and restore."""
    source = make_tree(tmp_path / "src")
    (source / "big.bin").write_bytes(os.urandom(3 * SPOOL_PART_BYTES))
    many = source / "many"  # a folder whose tree (~1.5 MB) is sealed in parts
    many.mkdir()
    for i in range(6000):
        (many / f"message-{i:05d}.txt").write_bytes(b"%d\n" % i)
    expected = tree_digest(source)
    cli.ok("-r", str(repo.path), "backup", str(source))
    sizes = [size for _, size in LocalBackend(repo.path).list(FileType.DATA)]
    assert max(sizes) > SPOOL_PART_BYTES  # a pack that went through a spool
    (repo.path / "data" / ".spool-0123456789abcdef").write_bytes(b"left by a killed backup")
    check = restic(repo.path, repo.key, "check", "--read-data")
    assert "no errors were found" in check.stdout
    target = tmp_path / "restored-by-restic"
    restic(repo.path, repo.key, "restore", "latest", "--target", str(target))
    assert tree_digest(target / source.relative_to("/")) == expected
    ours = cli.run("-r", str(repo.path), "check", "--read-data")
    assert ours.code == 0, ours.err


class NoSpool(BackendWrapper):
    """The local backend as a remote one is: objects saved whole, no spool."""

    def spool(self, kind: FileType) -> Spool | None:
        return None


def _writer(repo: InitRepo, spooled: bool) -> RepositoryWriter:
    backend = LocalBackend(repo.path)
    return RepositoryWriter(
        Repository.open(backend if spooled else NoSpool(backend), [repo.key.encode()])
    )


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_large_blobs_are_sealed_in_parts_and_read_back(repo: InitRepo, spooled: bool) -> None:
    """A blob over LARGE_BLOB_BYTES is compressed and sealed a slice at a time (into a
    pack of its own, where the backend has a spool): read back whole, compressed when that
    saves (one zstd frame recording its size), stored as it is when not."""
    writer = _writer(repo, spooled)
    rng = random.Random(9)
    text = b"".join(b'"%064x",' % rng.getrandbits(256) for _ in range(60_000))  # 3.9 MB
    noise = rng.randbytes(3 * LARGE_BLOB_BYTES + 5)
    ids = [writer.add(BlobType.TREE, text), writer.add(BlobType.DATA, noise)]
    writer.flush()
    again = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    assert again.load_blob(ids[0], BlobType.TREE) == text
    assert again.load_blob(ids[1], BlobType.DATA) == noise
    packed = [again.lookup(blob_id) for blob_id in ids]
    assert packed[0] is not None and packed[0].blob.uncompressed_length == len(text)
    assert packed[0].blob.length < len(text) // 1.5  # hex compresses
    assert packed[1] is not None and packed[1].blob.uncompressed_length is None


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_a_big_folder_s_tree_is_stored_from_its_parts_never_whole(
    repo: InitRepo, spooled: bool
) -> None:
    """A database's tree (here 140 000 content ids, ~9.4 MB of JSON) is stored from
    ``tree_parts``, read once for its id and again to be sealed: the blob ``encode_tree``
    makes, compressed, under its hash; at no moment is memory of the JSON's size held
    (without a spool, the sealed blob, about half of it; with one, a pack of its own
    written a part at a time: not even that); stored again, it is found, not written
    twice."""
    rng = random.Random(11)
    nodes = [
        Node(
            name="msgstore.db", type="file", size=1, content=ContentIds(rng.randbytes(32 * 140_000))
        ),
        Node(name="note.txt", type="file", size=1, content=[rng.randbytes(32)]),
        Node(name="Media", type="dir", subtree=rng.randbytes(32)),
    ]
    whole = fmt.encode_tree(nodes)
    size, expected_id = len(whole), hashlib.sha256(whole).digest()
    del whole
    writer = _writer(repo, spooled)
    tracemalloc.start()
    try:
        tree_id = writer.add_parts(BlobType.TREE, fmt.tree_parts(nodes))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tree_id == expected_id
    assert peak < (size * 2 // 5 if spooled else size * 4 // 5), (peak, size)
    assert writer.add_parts(BlobType.TREE, fmt.tree_parts(nodes)) == tree_id
    assert writer.stats.blobs_new == 1 and writer.stats.blobs_duplicate == 1
    writer.flush()
    again = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    assert again.load_blob(tree_id, BlobType.TREE) == fmt.encode_tree(nodes)
    assert again.load_tree(tree_id) == sorted(nodes, key=fmt.tree_order)
    stored = again.lookup(tree_id)
    assert stored is not None and stored.blob.uncompressed_length == size
    assert stored.blob.length < size // 1.5
    assert RepositoryWriter(again).add_parts(BlobType.TREE, fmt.tree_parts(nodes)) == tree_id
    assert len(list(again.backend.list(FileType.DATA))) == 1


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_parts_that_do_not_compress_are_stored_as_they_are(repo: InitRepo, spooled: bool) -> None:
    rng = random.Random(12)
    noise = [rng.randbytes(LARGE_BLOB_BYTES // 2 + 7) for _ in range(3)]
    writer = _writer(repo, spooled)
    blob_id = writer.add_parts(BlobType.DATA, lambda: iter(noise))
    writer.flush()
    again = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    assert again.load_blob(blob_id, BlobType.DATA) == b"".join(noise)
    stored = again.lookup(blob_id)
    assert stored is not None and stored.blob.uncompressed_length is None


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
@pytest.mark.parametrize("size", [1000, 3 * LARGE_BLOB_BYTES])
@pytest.mark.parametrize("compressible", [True, False])
def test_parts_that_change_between_readings_are_never_stored(
    repo: InitRepo, size: int, compressible: bool, spooled: bool
) -> None:
    """The parts are read twice: if the second reading differs from the first (same
    size, other bytes), nothing is stored under the first one's id."""
    rng = random.Random(13)
    readings = [b"a" * size, b"b" * size] if compressible else [rng.randbytes(size) for _ in "ab"]
    calls = iter(readings)
    writer = _writer(repo, spooled)
    with pytest.raises(RuntimeError, match="changed between two readings"):
        writer.add_parts(BlobType.DATA, lambda: iter([next(calls)]))
    with pytest.raises(RuntimeError, match="in no pack"):
        writer.flush()
    assert list(LocalBackend(repo.path).list(FileType.DATA)) == []


def test_the_fault_wrapper_counts_a_spool_saved_as_a_write(tmp_path: Path) -> None:
    """The crash suite kills a process right before its N-th write: a pack saved from a
    spool is one."""
    root = tmp_path / "repo"
    LocalBackend(root).create()
    done = _run_on(
        root,
        "import sys\n"
        "from backvault.storage import FileType, LocalBackend\n"
        "from backvault.storage.faults import KillAfterWrites\n"
        "backend = KillAfterWrites(LocalBackend(sys.argv[1]), writes=1)\n"
        "backend.save(FileType.DATA, 'ab' * 32, b'first')\n"
        "spool = backend.spool(FileType.DATA)\n"
        "spool.write(b'second')\n"
        "spool.save_as('cd' * 32)\n",
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert [name for name, _ in LocalBackend(root).list(FileType.DATA)] == ["ab" * 32]
    assert len(_hidden(root)) == 1  # killed before the rename: the spool keeps its hidden name


def test_a_remote_backend_has_no_spool_and_packs_are_saved_whole() -> None:
    assert open_backend("rest:http://127.0.0.1:1/").spool(FileType.DATA) is None
