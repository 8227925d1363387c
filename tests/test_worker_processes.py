"""Backup, restore and check on worker processes (engine/parallel.py), judged by the real
restic: the same data with and without worker processes gives repositories restic
accepts and restores identically; duplicates, large files cut in pieces, damage and kill -9
behave as they do on threads."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backvault.engine import parallel
from backvault.engine.archiver import Backup
from backvault.engine.archiver import archiver as backup_module
from backvault.engine.restorer import Restorer
from backvault.engine.sealer import KnownIds
from backvault.repo.repository import Repository
from backvault.storage import Backend, BackendWrapper, FileType, LocalBackend
from tests.conftest import Cli, InitRepo, make_tree, tree_digest
from tests.test_restic_interop import restic

PROCESSES = {"BACKVAULT_WORKER_PROCESSES": "2"}
THREADS = {"BACKVAULT_WORKER_PROCESSES": "0"}


def chat_source(root: Path) -> Path:
    """make_tree plus what takes the other code paths: a file over 8 MiB (cut first, then
    sealed in pieces by several workers), forwarded duplicates, a bigger WAL database."""
    make_tree(root)
    video = os.urandom(9 * 1024 * 1024 + 12345)
    (root / "media" / "video.mp4").write_bytes(video)
    (root / "media" / "forwarded").mkdir()
    for i in range(6):
        (root / "media" / "forwarded" / f"copy{i}.mp4").write_bytes(video)
    photo = os.urandom(300_000)
    for i in range(20):
        (root / "media" / f"same{i}.jpg").write_bytes(photo)
    db = sqlite3.connect(root / "big.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany(
        "INSERT INTO m(body) VALUES (?)", [(os.urandom(300).hex(),) for _ in range(8000)]
    )
    db.commit()
    db.close()
    return root


@pytest.mark.parametrize("mode", [PROCESSES, THREADS], ids=["processes", "threads"])
def test_backup_restore_check_on_workers_are_what_restic_accepts(
    cli: Cli, repo: InitRepo, tmp_path: Path, mode: dict[str, str]
) -> None:
    source = chat_source(tmp_path / "src")
    expected = tree_digest(source)
    first = cli.ok("--json", "-r", str(repo.path), "backup", str(source), env=mode).json()
    # Duplicates within one run are stored at most once per worker: 7 copies of the video
    # and 20 of the photo add far less than their sum.
    assert first["bytes_stored"] < 40 * 1024 * 1024
    # An incremental backup after a change to the database and a new file.
    db = sqlite3.connect(source / "big.db")
    db.executemany("INSERT INTO m(body) VALUES (?)", [(os.urandom(300).hex(),) for _ in range(50)])
    db.commit()
    db.close()
    (source / "media" / "new.jpg").write_bytes(os.urandom(700_000))
    expected = tree_digest(source)
    second = cli.ok("--json", "-r", str(repo.path), "backup", str(source), env=mode).json()
    assert second["bytes_added"] < 2 * 1024 * 1024  # the new photo and a few pages
    assert "no errors were found" in restic(repo.path, repo.key, "check", "--read-data").stdout
    check = cli.ok("--json", "-r", str(repo.path), "check", "--read-data", env=mode).json()
    assert check["errors"] == []
    ours = tmp_path / "ours"
    cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(ours), env=mode)
    assert tree_digest(ours / source.relative_to("/")) == expected
    theirs = tmp_path / "theirs"
    restic(repo.path, repo.key, "restore", "latest", "--target", str(theirs))
    assert tree_digest(theirs / source.relative_to("/")) == expected


def test_restore_on_workers_names_damaged_files_and_restores_the_rest(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = chat_source(tmp_path / "src")
    cli.ok("-r", str(repo.path), "backup", str(source), env=PROCESSES)
    # The pack the index gives for the video's first blob (two workers may both have
    # stored a chunk of it: the index's location is the one a restore reads).
    opened = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    _, snapshot = opened.find_snapshot("latest")
    tree = snapshot.tree
    for part in (*source.relative_to("/").parts, "media"):
        tree = next(n for n in opened.load_tree(tree) if n.name == part).subtree
        assert tree is not None
    video = next(n for n in opened.load_tree(tree) if n.name == "video.mp4")
    assert video.content
    location = opened.locate(video.content[0])
    victim = repo.path / "data" / location.pack_id.hex()[:2] / location.pack_id.hex()
    os.chmod(victim, 0o600)
    data = bytearray(victim.read_bytes())
    data[location.blob.offset + 100] ^= 0xFF
    victim.write_bytes(bytes(data))
    target = tmp_path / "out"
    result = cli.run(
        "-r", str(repo.path), "restore", "latest", "--target", str(target), env=PROCESSES
    )
    assert result.code == 3, result.err
    assert "not restored" in result.err and "is damaged" in result.err
    restored = tree_digest(target / source.relative_to("/"))
    original = tree_digest(source)
    assert restored  # the rest is there, identical
    for name, entry in restored.items():
        assert entry == original[name]
    leftovers = [p for p in target.rglob("*") if ".backvault-" in p.name]
    assert leftovers == []


def descendants(root: int) -> set[int]:
    """Every process below ``root`` (backvault's workers, however they were started: a
    fork server's children are its grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def test_kill_9_mid_backup_leaves_no_worker_running_and_the_next_backup_works(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = tmp_path / "big"
    source.mkdir()
    for i in range(40):
        (source / f"video{i}.mp4").write_bytes(os.urandom(4 * 1024 * 1024))
    proc = subprocess.Popen(
        [sys.executable, "-m", "backvault.cli", "-r", str(repo.path), "backup", str(source)],
        env={**cli.env, **PROCESSES},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Killed once the workers have written a pack: mid-backup, with workers busy.
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.is_file() for p in (repo.path / "data").rglob("*")):
        time.sleep(0.01)
    workers = descendants(proc.pid)
    assert proc.poll() is None, "the backup ended before it could be killed"
    assert len(workers) >= 2, "no worker process started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and alive(workers):
        time.sleep(0.1)
    assert not alive(workers), "worker processes outlived a killed backup"
    assert cli.ok("--json", "-r", str(repo.path), "snapshots").json() == []
    cli.ok("-r", str(repo.path), "backup", str(source), env=PROCESSES)
    cli.ok("-r", str(repo.path), "unlock")  # the killed run's lock (restic honours it)
    assert "no errors were found" in restic(repo.path, repo.key, "check", "--read-data").stdout


def _subtree(repo: Repository, tree: bytes, parts: tuple[str, ...]) -> bytes:
    for part in parts:
        tree = next(n for n in repo.load_tree(tree) if n.name == part).subtree  # type: ignore[assignment]
    return tree


def test_an_unchanged_folder_keeps_its_tree_and_a_change_is_seen(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    # The first backup reads every file, which updates their access times (stored in the
    # tree, as restic does); the next one sees those and reads nothing.
    Backup(repo).run([str(source)])
    first = Backup(repo).run([str(source)])
    second = Backup(repo).run([str(source)])
    parts = source.parts[1:]
    trees = [
        _subtree(repo, repo.find_snapshot(s.snapshot_id)[1].tree, parts) for s in (first, second)
    ]
    assert trees[0] == trees[1]  # the same tree: nothing new stored for it
    # A changed mtime deep down changes that folder's tree and every one above it.
    os.utime(source / "media" / "voice" / "note.opus", ns=(1_000_000_000, 1_000_000_000))
    third = Backup(repo).run([str(source)])
    third_tree = _subtree(repo, repo.find_snapshot(third.snapshot_id)[1].tree, parts)
    assert third_tree != trees[1]
    voice = [_subtree(repo, t, ("media", "voice")) for t in (trees[1], third_tree)]
    assert voice[0] != voice[1]
    restored = tmp_path / "out"
    Restorer(repo, restored).run(repo.find_snapshot(third.snapshot_id)[1])
    assert tree_digest(restored / source.relative_to("/")) == tree_digest(source)


class RecordingBackend(BackendWrapper):
    """Records every save, with the id of the process that made it, in a log file (a
    wrapper such as ``open_backend`` adds: worker processes must keep it)."""

    def __init__(self, inner: Backend, log: str) -> None:
        super().__init__(inner)
        self.log = log

    def wrapper_options(self) -> dict[str, Any]:
        return {"log": self.log}

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()} {kind.value}/{name}\n")
        super().save(kind, name, data)


def test_worker_processes_reopen_the_wrapped_backend_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(8):
        (source / f"f{i}.bin").write_bytes(os.urandom(600_000))
    log = tmp_path / "saves.log"
    backend = RecordingBackend(LocalBackend(tmp_path / "repo"), str(log))
    repo = Repository.init(backend, b"k" * 32)
    monkeypatch.setattr(parallel, "_requested_processes", 2)  # BACKVAULT_WORKER_PROCESSES=2
    result = Backup(repo, temp_dir=tmp_path).run([str(source)])
    saves = [line.split() for line in log.read_text().splitlines()]
    by_workers = [name for pid, name in saves if int(pid) != os.getpid()]
    assert by_workers, "no worker process saved through the wrapper"
    assert all(name.startswith("data/") for name in by_workers)
    assert result.packs_written >= len(by_workers)
    restored = tmp_path / "out"
    Restorer(repo, restored).run(repo.find_snapshot(result.snapshot_id)[1])
    assert tree_digest(restored / source.relative_to("/")) == tree_digest(source)


def _no_context() -> str:
    return "nothing"


def _pid(context: str) -> int:
    return os.getpid()


def test_a_cancelled_shutdown_frees_a_worker_waiting_at_the_barrier() -> None:
    """Ctrl-C while ``on_each_process`` hands out its tasks: a worker that took its task
    waits at the barrier for the others, whose tasks the shutdown cancels. The shutdown
    must not wait for it for ever (a backup interrupted then hung)."""
    from backvault.engine import parallel

    pool = parallel.WorkerPool(None, 1, _no_context, lambda: (), threshold=0, processes=2)
    pool.submit(_pid).result(timeout=60)  # the processes are running
    assert pool._process_pool is not None
    waiting = pool._process_pool.submit(parallel._on_each, _pid)  # one of the two tasks
    time.sleep(0.5)
    stopper = threading.Thread(target=pool.shutdown, kwargs={"cancel": True})
    stopper.start()
    stopper.join(timeout=60)
    assert not stopper.is_alive(), "the shutdown waits for a worker at the barrier"
    with pytest.raises(threading.BrokenBarrierError):
        waiting.result(timeout=10)


@given(
    known=st.lists(st.binary(min_size=32, max_size=32), max_size=60),
    asked=st.lists(st.binary(min_size=32, max_size=32), max_size=20),
    prefix_twins=st.integers(min_value=0, max_value=5),
)
def test_known_ids_answer_as_a_set_does(
    known: list[bytes], asked: list[bytes], prefix_twins: int
) -> None:
    # Ids sharing their first 8 bytes with a known one must not be taken for it.
    twins = [k[:8] + bytes(24) for k in known[:prefix_twins]]
    ids = KnownIds()
    half = len(known) // 2
    ids.update(b"".join(known[:half]))
    ids.update(b"".join(known[half:]))  # learned in two steps, as workers do
    for candidate in [*known, *asked, *twins, b"short"]:
        assert (candidate in ids) == (candidate in set(known))


def test_known_ids_do_not_take_two_neighbours_for_an_id() -> None:
    """Ids of one bucket lie back to back: the tail of one and the head of the next
    (which starts with the bucket's two bytes here) is not an id that was given."""
    first = b"\x01\x02" + bytes(14) + b"\x01\x02" + bytes(range(14))
    second = b"\x01\x02" + bytes(range(100, 130))
    ids = KnownIds()
    ids.update(first + second + first)  # one given twice is fine
    straddling = first[16:] + second[:16]
    assert straddling[:2] == b"\x01\x02" and straddling not in ids
    assert first in ids and second in ids and b"\x01\x02" + bytes(30) not in ids
    with pytest.raises(ValueError, match="32-byte ids"):
        ids.update(b"x" * 33)


def test_a_backup_failing_while_a_database_is_held_in_place_reports_its_error_and_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database read in place is held in a read transaction, begun on the copier's
    thread; a backup that fails before storing it ends the hold from the main thread. The
    error must be the backup's own, and the app must be able to checkpoint after."""
    source = tmp_path / "src"
    source.mkdir()
    db_path = source / "msgstore.db"
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO m(body) VALUES (?)", [("x" * 400,) for _ in range(2000)])
    db.commit()
    db.close()
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)

    def fail_once_held(run: Any, *_args: Any) -> None:
        for early in run.copier._early.values():
            assert early.result().image.in_place  # held, not copied
        raise RuntimeError("the index broke")

    monkeypatch.setattr(backup_module._BackupRun, "_find_parent", fail_once_held)
    parallel.configure(worker_processes=2)
    try:
        with pytest.raises(RuntimeError, match="the index broke"):
            Backup(repo, temp_dir=tmp_path).run([str(source)])
    finally:
        parallel.configure(worker_processes=None)
    app = sqlite3.connect(db_path)
    app.execute("INSERT INTO m(body) VALUES ('new')")
    app.commit()
    busy, _, _ = app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    app.close()
    assert busy == 0  # no read transaction of ours is left holding the file


@given(st.permutations(range(6)))
def test_a_file_s_ids_come_together_in_order_whatever_order_its_pieces_finish(
    order: list[int],
) -> None:
    """A file's pieces come back from the workers in any order: its ids are its pieces'
    in the file's order (one buffer, no joined copy of them at the end)."""
    from backvault.engine.archiver.pipeline import _FileWork
    from backvault.repo.format import ContentIds

    work = _FileWork()
    for _ in order:
        work.add_piece()
    work.queued()
    for position in order:
        assert not work.future.done()
        work.add_ids(position, bytes([position]) * 32 * (position + 1))
        work.piece_done()
    expected = b"".join(bytes([n]) * 32 * (n + 1) for n in range(len(order)))
    assert work.future.result() == ContentIds(expected)


def test_a_file_whose_piece_never_reported_ids_fails() -> None:
    from backvault.engine.archiver.pipeline import _FileWork

    work = _FileWork()
    work.add_piece()
    work.add_piece()
    work.queued()
    work.add_ids(1, bytes(32))
    work.piece_done()
    work.piece_done()  # piece 0 done without its ids
    with pytest.raises(RuntimeError, match="incomplete"):
        work.future.result()
