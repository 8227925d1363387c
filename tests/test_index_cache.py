"""The local index cache: a run reads one file instead of every index file, and never
answers for blobs the repository's index files no longer list."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from backvault.device.index_cache import IndexCacheFile
from backvault.device.paths import repository_cache_dir
from backvault.repo import format as fmt
from backvault.repo import index as index_module
from backvault.repo import index_cache as index_cache_module
from backvault.repo.format import BlobType, FormatError, IndexFile, PackedBlob
from backvault.repo.index import Index
from backvault.repo.repository import Repository
from backvault.repo.writer import RepositoryWriter
from backvault.storage import Backend, FileType
from backvault.storage.base import BackendWrapper
from backvault.storage.local import LocalBackend
from tests.conftest import Cli, InitRepo, tree_digest

SECRET = b"k" * 32


class CountingBackend(BackendWrapper):
    """The real local backend, counting the index files read through it."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.index_reads: list[str] = []

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if kind is FileType.INDEX:
            self.index_reads.append(name)
        return super().load(kind, name, offset, length)


def opened(path: Path, cache: Path | None) -> tuple[Repository, CountingBackend]:
    backend = CountingBackend(LocalBackend(path))
    repo = Repository.open(backend, [SECRET])
    if cache is not None:
        repo.index_cache = IndexCacheFile(cache)
    return repo, backend


def store_blobs(repo: Repository, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    writer = RepositoryWriter(repo, pack_target=64 * 1024)
    ids = [writer.add(BlobType.DATA, rng.randbytes(3000)) for _ in range(count)]
    writer.flush()
    return ids


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    Repository.init(LocalBackend(tmp_path / "repo"), SECRET)
    return tmp_path / "repo"


def test_a_run_reads_only_the_index_files_the_cache_does_not_hold(
    repo_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "index"
    repo, _ = opened(repo_path, cache)
    first = store_blobs(repo, 200, seed=1)  # a run's own index files go into its cache
    assert repo.store_index_cache() and cache.exists()
    assert cache.stat().st_mode & 0o777 == 0o600
    # Another device adds an index file the cache does not list.
    other, _ = opened(repo_path, None)
    second = store_blobs(other, 50, seed=2)
    repo, backend = opened(repo_path, cache)
    repo.ensure_index()
    assert len(backend.index_reads) == 1  # only the other device's
    assert repo.has_blobs(first + second)
    assert repo.lookup(second[0]) == other.lookup(second[0])
    assert repo.lookup(first[0]) == other.lookup(first[0])
    assert repo.store_index_cache()
    repo, backend = opened(repo_path, cache)
    repo.ensure_index()
    assert backend.index_reads == [] and repo.has_blobs(first + second)
    assert not repo.store_index_cache()  # nothing new: not written again


def test_a_cache_is_not_used_once_an_index_file_it_holds_is_gone(
    repo_path: Path, tmp_path: Path
) -> None:
    """A prune rewrites index files: a cache made before holds blobs that may be gone."""
    cache = tmp_path / "cache" / "index"
    repo, _ = opened(repo_path, cache)
    ids = store_blobs(repo, 100, seed=3)
    repo.store_index_cache()
    names = [name for name, _ in repo.backend.list(FileType.INDEX)]
    repo.backend.remove(FileType.INDEX, names[0])
    repo, backend = opened(repo_path, cache)
    repo.ensure_index()
    assert sorted(backend.index_reads) == sorted(names[1:])  # every file, read again
    assert not repo.has_blobs(ids)  # what only the removed file listed is not known


@pytest.mark.parametrize("damage", ["flipped", "truncated", "another repository", "empty"])
def test_a_cache_that_does_not_open_is_ignored_and_written_again(
    repo_path: Path, tmp_path: Path, damage: str
) -> None:
    cache = tmp_path / "cache" / "index"
    repo, _ = opened(repo_path, cache)
    ids = store_blobs(repo, 100, seed=4)
    repo.store_index_cache()
    data = cache.read_bytes()
    if damage == "flipped":
        cache.write_bytes(data[:500] + bytes([data[500] ^ 1]) + data[501:])
    elif damage == "truncated":
        cache.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        cache.write_bytes(b"")
    else:  # another repository's cache, under this one's name
        Repository.init(LocalBackend(tmp_path / "other"), SECRET)
        other, _ = opened(tmp_path / "other", tmp_path / "other-cache")
        store_blobs(other, 10, seed=5)
        other.store_index_cache()
        shutil.copy(tmp_path / "other-cache", cache)
    repo, backend = opened(repo_path, cache)
    repo.ensure_index()
    assert len(backend.index_reads) == len(list(repo.backend.list(FileType.INDEX)))
    assert repo.has_blobs(ids)
    assert repo.store_index_cache()
    repo, backend = opened(repo_path, cache)
    repo.ensure_index()
    assert backend.index_reads == [] and repo.has_blobs(ids)


def test_no_cache_is_written_of_an_index_that_is_not_exactly_its_files(
    repo_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "index"
    repo, _ = opened(repo_path, cache)
    rng = random.Random(6)
    writer = RepositoryWriter(repo)
    writer.add(BlobType.DATA, rng.randbytes(3000))
    writer.flush(write_index=False)  # a pack indexed in memory, in no index file
    assert not repo.store_index_cache() and not cache.exists()
    # Packs indexed from their headers (a damaged index file) are in no index file either.
    store_blobs(repo, 20, seed=7)
    name = next(name for name, _ in repo.backend.list(FileType.INDEX))
    index_file = repo_path / "index" / name
    os.chmod(index_file, 0o600)
    index_file.write_bytes(b"damaged")
    repo, _ = opened(repo_path, cache)
    repo.ensure_index()
    assert not repo.store_index_cache() and not cache.exists()


def test_the_cache_holds_no_blob_id_in_the_clear(repo_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "index"
    repo, _ = opened(repo_path, cache)
    ids = store_blobs(repo, 50, seed=8)
    repo.store_index_cache()
    data = cache.read_bytes()
    assert not any(blob_id[:8] in data for blob_id in ids)


def test_a_cache_from_before_a_prune_does_not_make_a_backup_skip_pruned_data(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """The attack: a cache holding blobs a prune removed, planted back (or just left from
    before) — a backup that trusted it would record data the repository no longer has."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "photo.jpg").write_bytes(random.Random(9).randbytes(300_000))
    run = ("-r", str(repo.path))
    cli.ok(*run, "backup", str(source), key=repo.key)
    cache = cli.home / "cache" / repo.id / "index"
    assert cache.exists()
    old_cache = cache.read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "note.txt").write_text("something else\n")
    cli.ok(*run, "backup", "--tag", "keep", str(other), key=repo.key)
    cli.ok(*run, "forget", "--keep-tag", "keep", "--prune", key=repo.key)
    cache.write_bytes(old_cache)  # rolled back to before the prune
    summary = cli.ok("--json", *run, "backup", str(source), key=repo.key).json()
    assert summary["bytes_added"] >= 300_000  # stored again, not taken as known
    cli.ok(*run, "check", "--read-data", key=repo.key)
    target = tmp_path / "restored"
    cli.ok(*run, "restore", "latest", "--target", str(target), key=repo.key)
    restored = target / str(source).lstrip("/")
    assert tree_digest(restored) == tree_digest(source)


def test_backups_and_restores_through_the_cache_give_what_was_backed_up(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    rng = random.Random(10)
    run = ("-r", str(repo.path))
    for day in range(3):
        (source / f"day{day}.bin").write_bytes(rng.randbytes(200_000))
        cli.ok(*run, "backup", str(source), key=repo.key)
    cache = cli.home / "cache" / repo.id / "index"
    assert cache.exists()
    unchanged = cli.ok("--json", *run, "backup", str(source), key=repo.key).json()
    assert (unchanged["files_new"], unchanged["files_changed"]) == (0, 0)
    assert unchanged["files_unmodified"] == 3
    target = tmp_path / "restored"
    cli.ok(*run, "restore", "latest", "--target", str(target), key=repo.key)
    assert tree_digest(target / str(source).lstrip("/")) == tree_digest(source)
    assert "day2.bin" in cli.ok(*run, "ls", "latest", key=repo.key).out
    cli.ok(*run, "check", "--read-data", key=repo.key)


# --- the red team's findings (each failed before its fix) --------------------------------


def _with_config_id(path: Path, key: bytes, repo_id: str) -> None:
    """Seal the repository's config again with another id (what anyone holding the master
    key can write: every member of a shared repository)."""
    repo = Repository.open(LocalBackend(path), [key])
    config = dataclasses.replace(repo.config, id=repo_id)
    config_file = path / "config"
    os.chmod(config_file, 0o600)
    config_file.write_bytes(repo.key.seal(fmt.encode_unpacked(config.to_json(), compress=False)))


def test_a_config_id_cannot_put_the_device_cache_outside_its_folder(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """The cache's folder is named after the config's id: an absolute id or one with
    ``..`` must not make a backup write (or chmod) a folder elsewhere."""
    victim = tmp_path / "victim"
    victim.mkdir()
    os.chmod(victim, 0o755)
    _with_config_id(repo.path, repo.key.encode(), str(victim))
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.txt").write_text("a\n")
    done = cli.ok("-r", str(repo.path), "backup", str(source), key=repo.key)
    assert "keeps no cache for it" in done.err
    assert list(victim.iterdir()) == [] and victim.stat().st_mode & 0o777 == 0o755
    assert repository_cache_dir("../../x" + "0" * 58) is None
    assert repository_cache_dir("0" * 64) is not None


def test_a_saved_state_whose_grouped_rows_are_not_the_first_rows_is_refused() -> None:
    rng = random.Random(1)
    blobs = [PackedBlob(rng.randbytes(32), BlobType.DATA, 40 * i, 40, None) for i in range(3)]
    index = Index.of_files([IndexFile({rng.randbytes(32): blobs})])
    index.add_pack(rng.randbytes(32), [PackedBlob(rng.randbytes(32), BlobType.DATA, 0, 9, None)])
    state = bytearray(index.to_state())
    packs, rows, grouped = 2, 4, 3
    at = len(index_module._STATE_MAGIC) + 24 + 32 * packs + 4 * rows + rows + 24 * rows
    at += 32 * grouped  # where the grouped rows' column starts
    state[at : at + 4] = (rows - 1).to_bytes(4, "little")  # a grouped row -> the ungrouped one
    with pytest.raises(FormatError):
        Index.from_state(bytes(state))


@pytest.mark.parametrize("planted", ["fifo", "symlink to a file", "device"])
def test_a_cache_file_that_is_no_regular_file_of_ours_is_not_read(
    tmp_path: Path, planted: str
) -> None:
    """A FIFO would stop a scheduled backup for ever, /dev/zero fill its memory."""
    path = tmp_path / "cache" / "index"
    path.parent.mkdir()
    if planted == "fifo":
        os.mkfifo(path)
    elif planted == "device":
        os.symlink("/dev/zero", path)
    else:
        (tmp_path / "elsewhere").write_bytes(b"x" * 100)
        os.symlink(tmp_path / "elsewhere", path)
    result: list[bytes | None] = []
    reader = threading.Thread(target=lambda: result.append(IndexCacheFile(path).load()))
    reader.daemon = True
    reader.start()
    reader.join(5)
    if reader.is_alive():
        with open(path, "wb"):
            pass  # unblock it
        pytest.fail("reading the index cache blocked")
    assert result == [None]


def test_the_cache_is_sealed_a_slice_at_a_time_and_opens_whole(repo_path: Path) -> None:
    """Its parts are sealed as they are taken, none larger than a slice of the index's
    arrays (the end of a backup holds no sealed copy of the whole index), and they open
    as the index they came from."""
    repo, _ = opened(repo_path, None)
    index = Index()
    rng = random.Random(5)
    for _pack in range(40):
        blobs, offset = [], 0
        for _ in range(1000):
            blobs.append(PackedBlob(rng.randbytes(32), BlobType.DATA, offset, 4000, 8192))
            offset += 4000
        index.add_pack(rng.randbytes(32), blobs)
    parts = index_cache_module.seal_index_cache(repo.key, ["ab" * 32], index)
    sizes = []

    class Store:
        def __init__(self) -> None:
            self.saved = b""

        def load(self) -> bytes | None:
            return self.saved

        def save(self, sealed: Iterable[bytes]) -> None:
            for part in sealed:
                sizes.append(len(part))
                self.saved += part

    store = Store()
    store.save(parts)
    assert sum(sizes) > 2_000_000 and max(sizes) <= index_cache_module._SLICE_BYTES
    opened_cache = index_cache_module.open_index_cache(repo.key, store)
    assert opened_cache is not None
    names, again = opened_cache
    assert names == ["ab" * 32] and again.to_state() == index.to_state()
