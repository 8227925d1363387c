"""Backing up paths into a repository as a restic snapshot.

The tree mirrors restic's: a snapshot of ``/home/a/chat`` has a root tree holding ``home``,
which holds ``a``, which holds ``chat`` with its full contents. Files unchanged since the
parent snapshot (same type, size, mtime, ctime and inode) are not read again; SQLite
databases are read through a consistent copy and cut into page-aligned chunks.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import getpass
import grp
import hashlib
import json
import os
import pwd
import queue
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from backvault.device.paths import private_temp_dir
from backvault.engine.budget import ByteBudget
from backvault.engine.parallel import WorkerPool
from backvault.engine.progress import NoProgress, Progress
from backvault.engine.sealer import (
    FILE,
    RANGES,
    ChunkSealer,
    Piece,
    TaskResult,
    cut_file,
    flush_packs,
    learn_known,
    seal_pieces,
    sealer_in_worker,
)
from backvault.repo import format as fmt
from backvault.repo.chunker import page_ranges
from backvault.repo.errors import DamagedObject
from backvault.repo.format import BlobType, Node, Snapshot
from backvault.repo.lock import RepositoryLock
from backvault.repo.repository import Repository
from backvault.repo.timefmt import format_ns, now_ns
from backvault.repo.writer import RepositoryWriter
from backvault.source.sqlite import (
    SQLiteCopyError,
    consistent_copy,
    is_sqlite_database,
    page_size_of,
)

_MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024
# Files up to this size are cut and sealed whole by one worker; larger ones are cut first,
# then sealed in pieces by every worker.
_WHOLE_FILE_MAX = 8 * 1024 * 1024
# Pieces go to the workers in tasks of about this many bytes or _BATCH_PIECES pieces.
_PIECE_BYTES = 4 * 1024 * 1024
_BATCH_PIECES = 64
# Every task is charged at least this much against the in-flight budget.
_MIN_CHARGE = 256 * 1024


class _FileWork:
    """A file whose pieces are with the workers; ``future`` gives its blob ids."""

    def __init__(self, pieces: int) -> None:
        self.remaining = pieces
        self.ids: dict[int, list[bytes]] = {}
        self.error: OSError | None = None
        self.future: Future[list[bytes]] = Future()


class _DatabaseCopy(NamedTuple):
    stack: contextlib.ExitStack[bool | None]  # closing it removes the copy
    path: Path
    state: list[Any]


class _Delivery(NamedTuple):
    pieces: list[tuple[_FileWork, int, int]]  # (file, piece index, input bytes)
    charge: int
    future: Future[TaskResult]


@dataclass
class BackupResult:
    snapshot_id: str
    parent_id: str | None
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs: int = 0
    sqlite_databases: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    bytes_added: int = 0
    bytes_stored: int = 0
    packs_written: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc["errors"] = [{"path": p, "error": e} for p, e in self.errors]
        return doc


class _Names:
    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = ""
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = ""
        return self._groups[gid]


def _node_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "dev"
    return "irregular"


class Backup:
    def __init__(
        self,
        repo: Repository,
        progress: Progress | None = None,
        workers: int | None = None,
        sqlite_state_file: Path | None = None,
        temp_dir: str | None = None,
    ) -> None:
        self.repo = repo
        self.progress = progress or NoProgress()
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.names = _Names()
        self.temp_dir = temp_dir  # where this run's private folder goes (default: cache)
        self._sqlite_state_file = sqlite_state_file
        self._sqlite_state: dict[str, Any] = {}
        self._sqlite_state_new: dict[str, Any] = {}

    # --- entry point -----------------------------------------------------------------

    def run(
        self,
        paths: list[str],
        tags: list[str] | None = None,
        hostname: str | None = None,
        on_saved: Callable[[str], None] | None = None,
        scan_first: bool = False,
    ) -> BackupResult:
        """Back up ``paths``. ``scan_first`` sums file sizes beforehand so that progress
        can show a percentage and the time left."""
        started = time.monotonic()
        start_ns = now_ns()
        targets = sorted({os.path.normpath(os.path.abspath(p)) for p in paths})
        for target in targets:
            if not os.path.lexists(target):
                raise FileNotFoundError(f"{target} does not exist")
        hostname = hostname or socket.gethostname()
        self._load_sqlite_state()
        # Copies of databases are the chat history in clear: they go to a folder of this
        # run's own, inside a folder only this user may enter, and it goes away on every
        # way out (an error, Ctrl-C, SIGTERM, which the command line turns into an
        # exception); a run killed outright leaves it for the next run to remove.
        root = Path(self.temp_dir) if self.temp_dir else private_temp_dir()
        _remove_copies_of_dead_runs(root)
        self._copies_dir = Path(tempfile.mkdtemp(prefix=f"backup-{os.getpid()}-", dir=root))
        self._cancel_copies = threading.Event()
        # Databases that changed are copied from the start, while the index loads and the
        # other files are read (the copy is what a daily backup waits for longest).
        self._sqlite_copier = ThreadPoolExecutor(1, thread_name_prefix="backvault-sqlite")
        self._early_copies: dict[str, Future[_DatabaseCopy]] = {}
        try:
            expected = self._start_database_copies(targets)
            return self._run_locked(
                targets, tags, hostname, on_saved, scan_first, expected, started, start_ns
            )
        finally:
            self._cancel_copies.set()
            self._sqlite_copier.shutdown(cancel_futures=True)
            for future in self._early_copies.values():  # copies no one used (an error)
                if not future.cancelled() and future.exception() is None:
                    future.result().stack.close()
            shutil.rmtree(self._copies_dir, ignore_errors=True)

    def _run_locked(
        self,
        targets: list[str],
        tags: list[str] | None,
        hostname: str,
        on_saved: Callable[[str], None] | None,
        scan_first: bool,
        expected_database_bytes: int,
        started: float,
        start_ns: int,
    ) -> BackupResult:
        with RepositoryLock(self.repo):
            known: list[RepositoryWriter] = []  # the writer, once the index is loaded
            self.pool = self._worker_pool(known)
            # A big database is coming: start the worker processes now, while the index
            # loads (they learn what the repository holds below).
            self.pool.expect(expected_database_bytes)
            self.repo.ensure_index()
            parent_id, parent = self._find_parent(targets, hostname)
            result = BackupResult(snapshot_id="", parent_id=parent_id)
            self.result = result
            self.progress.start(_total_size(targets) if scan_first else None, "backup")
            self.writer = RepositoryWriter(self.repo)
            writer = self.writer
            known.append(writer)
            self.pool.set_local_context(ChunkSealer(self.repo.key, writer.knows))
            if self.pool.uses_processes:
                self.pool.on_each_process(learn_known, writer.known_ids())
            self.budget = ByteBudget(_MAX_IN_FLIGHT_BYTES)
            self._batch: list[tuple[_FileWork, int, Piece, int]] = []
            self._batch_bytes = 0
            self._batch_lock = threading.RLock()
            self._results: queue.SimpleQueue[_Delivery | None] = queue.SimpleQueue()
            self._packer_error: BaseException | None = None
            packer = threading.Thread(target=self._pack_results, name="backvault-packer")
            packer.start()
            try:
                root_tree = self._archive_roots(targets, parent.tree if parent else None)
                for packs in self.pool.on_each_process(flush_packs):
                    for pack_id, blobs in packs:
                        self.writer.adopt_pack(pack_id, blobs)
                self._sqlite_copier.shutdown()
                self.pool.shutdown()
                self._stop_packer(packer)
                self.writer.flush()
            except BaseException:
                self._cancel_copies.set()
                self.pool.shutdown(cancel=True)
                self._sqlite_copier.shutdown(cancel_futures=True)
                self._stop_packer(packer)
                # Index what was uploaded, so the next run can reuse it.
                with contextlib.suppress(Exception):
                    self.writer.flush()
                raise
            user = _username()
            snapshot = Snapshot(
                time=format_ns(start_ns),
                tree=root_tree,
                paths=targets,
                hostname=hostname,
                username=user,
                uid=os.getuid(),
                gid=os.getgid(),
                parent=bytes.fromhex(parent_id) if parent_id else None,
                tags=sorted(set(tags or [])),
            )
            result.snapshot_id = self.repo.save_snapshot(snapshot)
            self._save_sqlite_state(result.snapshot_id)
            if on_saved:
                on_saved(result.snapshot_id)
        self.progress.finish()
        stats = self.writer.stats
        result.bytes_added = stats.bytes_plain_new
        result.bytes_stored = stats.bytes_stored_new
        result.packs_written = stats.packs_written
        result.seconds = time.monotonic() - started
        return result

    def _find_parent(self, targets: list[str], hostname: str) -> tuple[str | None, Snapshot | None]:
        errors: list[DamagedObject] = []
        candidates = [
            (name, snap)
            for name, snap in self.repo.list_snapshots(errors=errors)
            if sorted(snap.paths) == targets and snap.hostname == hostname
        ]
        for name, snap in reversed(candidates):
            if self.repo.has_blob(snap.tree):
                return name, snap
        return None, None

    # --- trees -----------------------------------------------------------------------

    def _parent_children(self, parent_tree: bytes | None) -> dict[str, Node]:
        if parent_tree is None:
            return {}
        try:
            return {n.name: n for n in self.repo.load_tree(parent_tree)}
        except DamagedObject:
            return {}

    def _archive_roots(self, targets: list[str], parent_tree: bytes | None) -> bytes:
        """Build the virtual tree from / down to each target, then archive the targets."""
        layout: dict[str, Any] = {}
        for target in targets:
            parts = [p for p in target.split(os.sep) if p]
            cursor = layout
            for part in parts[:-1]:
                child = cursor.setdefault(part, {})
                if child is None:  # an ancestor is itself a target: it covers this one
                    break
                cursor = child
            else:
                cursor[parts[-1]] = None  # None marks a target: archive all of it
        return self._archive_layout("/", layout, parent_tree)

    def _archive_layout(
        self, path: str, layout: dict[str, Any], parent_tree: bytes | None
    ) -> bytes:
        old = self._parent_children(parent_tree)
        nodes: list[Node] = []
        pending: list[tuple[Node, Future[list[bytes]]]] = []
        for name in sorted(layout):
            child_path = os.path.join(path, name)
            sub = layout[name]
            if sub is None:
                node = self._archive_entry(child_path, name, old.get(name), pending)
                if node is not None:
                    nodes.append(node)
                continue
            try:
                st = os.lstat(child_path)
            except OSError as exc:
                self._error(child_path, exc)
                continue
            node = self._node_from_stat(name, st)
            prev = old.get(name)
            node.subtree = self._archive_layout(
                child_path, sub, prev.subtree if prev and prev.type == "dir" else None
            )
            nodes.append(node)
        return self._finish_tree(nodes, pending, parent_tree)

    def _finish_tree(
        self,
        nodes: list[Node],
        pending: list[tuple[Node, Future[list[bytes]]]],
        parent_tree: bytes | None,
    ) -> bytes:
        self._submit_batch()
        for node, future in pending:
            try:
                node.content = future.result()
            except OSError as exc:  # the file became unreadable while we read it
                self._error(exc.filename or node.name, exc)
                nodes.remove(node)
        if parent_tree is not None and self.repo.has_blob(parent_tree):
            # Nothing in this folder changed: the parent snapshot's tree is this one
            # (encoding it again costs much for a database of 190 000 chunks).
            with contextlib.suppress(DamagedObject):
                if sorted(nodes, key=fmt.tree_order) == self.repo.load_tree(parent_tree):
                    return parent_tree
        return self.writer.add(BlobType.TREE, fmt.encode_tree(nodes))

    def _archive_dir(self, path: str, parent_tree: bytes | None) -> bytes:
        old = self._parent_children(parent_tree)
        nodes: list[Node] = []
        pending: list[tuple[Node, Future[list[bytes]]]] = []
        try:
            entries = sorted(os.scandir(path), key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            self._error(path, exc)
            entries = []
        names = {e.name for e in entries}
        archived: dict[str, Node] = {}
        # Databases first: their consistent copy is made while the rest is read.
        for entry in sorted(
            entries, key=lambda e: not _looks_like_database(e.name, names.__contains__)
        ):
            if _is_sqlite_sidecar(path, entry.name, names):
                continue  # its content is inside the database's consistent copy
            node = self._archive_entry(entry.path, entry.name, old.get(entry.name), pending)
            if node is not None:
                archived[entry.name] = node
        nodes = [archived[e.name] for e in entries if e.name in archived]
        self.result.dirs += 1
        return self._finish_tree(nodes, pending, parent_tree)

    def _archive_entry(
        self,
        path: str,
        name: str,
        previous: Node | None,
        pending: list[tuple[Node, Future[list[bytes]]]],
    ) -> Node | None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            self._error(path, exc)
            return None
        node = self._node_from_stat(name, st)
        try:
            if node.type == "dir":
                node.subtree = self._archive_dir(
                    path, previous.subtree if previous and previous.type == "dir" else None
                )
            elif node.type == "symlink":
                node.linktarget = os.readlink(path)
            elif node.type == "file":
                pending.append((node, self._archive_file(path, st, node, previous)))
            elif node.type in ("dev", "chardev"):
                node.device = st.st_rdev
        except OSError as exc:
            self._error(path, exc)
            return None
        return node

    def _node_from_stat(self, name: str, st: os.stat_result) -> Node:
        node_type = _node_type(st.st_mode)
        return Node(
            name=name,
            type=node_type,
            mode=fmt.go_mode_from_unix(st.st_mode),
            mtime=format_ns(st.st_mtime_ns),
            atime=format_ns(st.st_atime_ns),
            ctime=format_ns(st.st_ctime_ns),
            uid=st.st_uid,
            gid=st.st_gid,
            user=self.names.user(st.st_uid),
            group=self.names.group(st.st_gid),
            inode=st.st_ino,
            device_id=st.st_dev,
            size=st.st_size if node_type == "file" else 0,
            links=st.st_nlink if node_type != "dir" else 0,
            content=[] if node_type == "file" else None,
        )

    # --- files -----------------------------------------------------------------------

    def _unchanged(self, node: Node, previous: Node | None) -> bool:
        return (
            previous is not None
            and previous.type == "file"
            and previous.size == node.size
            and previous.mtime == node.mtime
            and previous.ctime == node.ctime
            and previous.inode == node.inode
            and previous.content is not None
            and all(self.repo.has_blob(b) for b in previous.content)
        )

    def _archive_file(
        self, path: str, st: os.stat_result, node: Node, previous: Node | None
    ) -> Future[list[bytes]]:
        self.result.bytes_total += st.st_size
        unchanged = self._unchanged(node, previous)
        # A database in WAL mode changes in its -wal first, so its own stat cannot be
        # trusted: read the header of anything that may be one. An unchanged file with
        # no database name and no WAL or journal beside it is not read at all.
        may_be = _looks_like_database(path, os.path.lexists)
        if (not unchanged or may_be) and is_sqlite_database(path):
            return self._archive_sqlite(path, st, node, previous)
        if unchanged:
            assert previous is not None and previous.content is not None
            self.result.files_unmodified += 1
            self.progress.advance(node.size)
            return _done(list(previous.content))
        if previous is None:
            self.result.files_new += 1
        else:
            self.result.files_changed += 1
        return self._store_file(path, st.st_size)

    # --- handing file data to the workers ------------------------------------------------

    def _worker_pool(self, writer: list[RepositoryWriter]) -> WorkerPool:
        """Threads seal chunks for the writer in this process; past a few MiB of work,
        worker processes take over, writing packs of their own into a local repository.
        ``writer`` holds the writer once there is one: processes started before learn what
        the repository holds through ``learn_known``."""
        key, backend, config = self.repo.key, self.repo.backend, self.repo.config
        if not backend.capabilities.direct_file_io:
            return WorkerPool(None, self.workers)
        return WorkerPool(
            None,
            self.workers,
            make_context=sealer_in_worker,
            process_args=lambda: (
                key.to_json(),
                config,
                backend.spec(),
                writer[0].known_ids() if writer else b"",
            ),
        )

    def _store_file(self, path: str, size: int) -> Future[list[bytes]]:
        """Queue a file for the workers; its future gives the blob ids of its content."""
        if size <= _WHOLE_FILE_MAX:
            work = _FileWork(1)
            self._add_piece(work, 0, Piece(FILE, path), size)
            return work.future
        # A large file is cut first (one task), then sealed in pieces by every worker.
        cuts = self.pool.submit(cut_file, path).result()
        return self._store_ranges(path, cuts, compress=None)

    def _store_ranges(
        self, path: str, ranges: list[tuple[int, int]], compress: bool | None
    ) -> Future[list[bytes]]:
        pieces: list[list[tuple[int, int]]] = [[]]
        size = 0
        for offset, length in ranges:
            if pieces[-1] and size + length > _PIECE_BYTES:
                pieces.append([])
                size = 0
            pieces[-1].append((offset, length))
            size += length
        if not pieces[-1]:
            pieces.pop()
        work = _FileWork(len(pieces))
        if not pieces:
            work.future.set_result([])
        for index, piece_ranges in enumerate(pieces):
            piece = Piece(RANGES, path, piece_ranges, compress)
            self._add_piece(work, index, piece, sum(length for _, length in piece_ranges))
        return work.future

    def _add_piece(self, work: _FileWork, index: int, piece: Piece, size: int) -> None:
        self._raise_packer_error()
        with self._batch_lock:
            self._batch.append((work, index, piece, size))
            self._batch_bytes += size
            if self._batch_bytes >= _PIECE_BYTES or len(self._batch) >= _BATCH_PIECES:
                self._submit_batch()

    def _submit_batch(self) -> None:
        """Hand the queued pieces to a worker as one task (one task per small file would
        spend more time passing tasks between processes than working)."""
        with self._batch_lock:  # the main thread and the database copier both add
            batch, size = self._batch, self._batch_bytes
            if not batch:
                return
            self._batch, self._batch_bytes = [], 0
        charge = max(size, _MIN_CHARGE)
        self.budget.take(charge)
        try:
            future = self.pool.submit(
                seal_pieces, [piece for _, _, piece, _ in batch], work_bytes=size
            )
        except BaseException:
            self.budget.give(charge)
            raise
        deliver = functools.partial(self._deliver, [(w, i, n) for w, i, _, n in batch], charge)
        future.add_done_callback(deliver)

    def _deliver(
        self,
        pieces: list[tuple[_FileWork, int, int]],
        charge: int,
        future: Future[TaskResult],
    ) -> None:
        # Runs on the pool's thread: pass the results on, so that writing packs never
        # holds up the workers.
        self._results.put(_Delivery(pieces, charge, future))

    def _pack_results(self) -> None:
        """The packer thread: add the workers' sealed chunks to packs, in order of arrival,
        and complete each file once all its pieces are in."""
        while True:
            delivery = self._results.get()
            if delivery is None:
                return
            failed: BaseException | None = None
            try:
                if delivery.future.cancelled():
                    failed = CancelledError()
                elif self._packer_error is None:
                    self._add_results(delivery)
            except BaseException as exc:
                self._packer_error = exc
            finally:
                self.budget.give(delivery.charge)
            failed = self._packer_error or failed
            if failed is not None:  # nobody must wait for these files for ever
                for work, _, _ in delivery.pieces:
                    if not work.future.done():
                        work.future.set_exception(failed)

    def _add_results(self, delivery: _Delivery) -> None:
        exc = delivery.future.exception()
        if exc is not None:
            raise exc
        outcome = delivery.future.result()
        for pack_id, blobs in outcome.packs:
            self.writer.adopt_pack(pack_id, blobs)
        results = outcome.pieces
        for (work, index, size), result in zip(delivery.pieces, results, strict=True):
            if isinstance(result, OSError):
                work.error = work.error or result
            elif work.error is None:
                for chunk in result:
                    if chunk.sealed is not None:
                        self.writer.add_sealed(BlobType.DATA, chunk)
                    elif chunk.sealed_length:
                        self.writer.expect(chunk.id)  # in a worker's pack, reported later
                    elif not self.writer.knows(chunk.id):
                        raise RuntimeError(f"blob {chunk.id.hex()[:12]} is not stored")
                work.ids[index] = [chunk.id for chunk in result]
            self.result.bytes_read += size
            self.progress.advance(size)
            work.remaining -= 1
            if work.remaining == 0:
                if work.error is not None:
                    work.future.set_exception(work.error)
                else:
                    work.future.set_result([i for n in range(len(work.ids)) for i in work.ids[n]])

    def _stop_packer(self, packer: threading.Thread) -> None:
        self._results.put(None)
        packer.join()
        self._raise_packer_error()

    def _raise_packer_error(self) -> None:
        if self._packer_error is not None:
            raise self._packer_error

    def _archive_sqlite(
        self, path: str, st: os.stat_result, node: Node, previous: Node | None
    ) -> Future[list[bytes]]:
        self.result.sqlite_databases += 1
        state = _sqlite_file_state(path, st)
        cached = self._sqlite_state.get(path)
        if (
            cached is not None
            and previous is not None
            and cached.get("state") == state
            and previous.content is not None
            and cached.get("content_sha256") == _content_digest(previous.content)
            and all(self.repo.has_blob(b) for b in previous.content)
        ):
            # Neither the database nor its WAL changed since the parent snapshot.
            self._sqlite_state_new[path] = cached
            node.size = previous.size
            self.progress.advance(st.st_size)
            self.result.files_unmodified += 1
            return _done(list(previous.content))
        if previous is None:
            self.result.files_new += 1
        else:
            self.result.files_changed += 1
        # The copy takes a while (SQLite copies page by page): a thread makes it and hands
        # its pages to the workers, while this thread goes on with the other files (and
        # the worker processes start, if it is big).
        self.pool.expect(st.st_size)
        return self._sqlite_copier.submit(self._store_database, path, state, node)

    def _start_database_copies(self, targets: list[str]) -> int:
        """Start copying every database under the targets that changed since the last
        backup; their total size."""
        total = 0
        for path in _databases_under(targets):
            try:
                st = os.stat(path)
            except OSError:
                continue  # the walk reports it
            state = _sqlite_file_state(path, st)
            cached = self._sqlite_state.get(path)
            if cached is not None and cached.get("state") == state:
                continue
            self._early_copies[path] = self._sqlite_copier.submit(self._copy_database, path, state)
            total += st.st_size
        return total

    def _copy_database(self, path: str, state: list[Any]) -> _DatabaseCopy:
        """A consistent copy, and the database's state taken before it was made (so that
        a change during the copy is seen by the next backup)."""
        stack = contextlib.ExitStack()
        try:
            copy = stack.enter_context(consistent_copy(path, self._copies_dir, self._cancel_copies))
        except BaseException:
            stack.close()
            raise
        return _DatabaseCopy(stack, copy, state)

    def _store_database(self, path: str, state: list[Any], node: Node) -> list[bytes]:
        early = self._early_copies.pop(path, None)
        try:
            made = early.result() if early is not None else self._copy_database(path, state)
        except SQLiteCopyError as exc:
            raise OSError(errno.EIO, str(exc), path) from exc
        with made.stack:
            node.size = made.path.stat().st_size
            future = self._store_ranges(
                str(made.path), page_ranges(node.size, page_size_of(made.path)), compress=True
            )
            self._submit_batch()
            content = future.result()  # the copy must stay until the workers read it
        self._sqlite_state_new[path] = {
            "state": made.state,
            "content_sha256": _content_digest(content),
        }
        return content

    # --- sqlite change cache ---------------------------------------------------------

    def _load_sqlite_state(self) -> None:
        if self._sqlite_state_file is None:
            return
        try:
            self._sqlite_state = json.loads(self._sqlite_state_file.read_text())["databases"]
        except (OSError, ValueError, KeyError, TypeError):
            self._sqlite_state = {}

    def _save_sqlite_state(self, snapshot_id: str) -> None:
        if self._sqlite_state_file is None:
            return
        merged = {**self._sqlite_state, **self._sqlite_state_new}
        with contextlib.suppress(OSError):
            self._sqlite_state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._sqlite_state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"snapshot": snapshot_id, "databases": merged}))
            os.replace(tmp, self._sqlite_state_file)

    def _error(self, path: str, exc: BaseException) -> None:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.result.errors.append((path, message))
        self.progress.note(f"cannot read {path}: {message}")


_SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def _remove_copies_of_dead_runs(root: Path) -> None:
    """Remove the copy folders of runs whose process is gone (killed with SIGKILL, or the
    machine lost power): nothing else would."""
    for folder in root.glob("backup-*-*"):
        try:
            pid = int(folder.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or a live process of another user


def _is_sqlite_sidecar(directory: str, name: str, siblings: set[str]) -> bool:
    """A live database's -wal, -shm or -journal file: never back it up on its own.
    Restored next to the consistent copy, a stale WAL could be replayed onto it."""
    for suffix in _SQLITE_SIDECARS:
        if name.endswith(suffix):
            database = name[: -len(suffix)]
            if database in siblings and is_sqlite_database(os.path.join(directory, database)):
                return True
    return False


def _sqlite_file_state(path: str, st: os.stat_result) -> list[Any]:
    state: list[Any] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    try:
        wal = os.stat(path + "-wal")
    except OSError:
        wal = None
    # A missing WAL and an empty one hold the same (nothing); readers, including our own
    # consistent copy, may create an empty one.
    if wal is None or wal.st_size == 0:
        state.append(None)
    else:
        state.append([wal.st_size, wal.st_mtime_ns, wal.st_ctime_ns, wal.st_ino])
    return state


_DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")


def _looks_like_database(name: str, has_sibling: Callable[[str], bool]) -> bool:
    """A cheap guess, before reading the header: a name like a database's, or a WAL or
    rollback journal next to it."""
    return name.endswith(_DATABASE_SUFFIXES) or any(
        has_sibling(name + suffix) for suffix in _SQLITE_SIDECARS
    )


def _content_digest(content: list[bytes]) -> str:
    """A database's blob list, in the change cache: its digest (a 1.5 GB database has
    190 000 blobs; their list would make the cache file and its reading big)."""
    return hashlib.sha256(b"".join(content)).hexdigest()


def _databases_under(targets: list[str]) -> list[str]:
    """SQLite databases under the targets, found by name first (a cheap walk, no stat
    of every file), then by their header."""
    found: list[str] = []
    for target in targets:
        if os.path.isfile(target) and not os.path.islink(target):
            candidates = [target]
        else:
            candidates = []
            for directory, _dirs, files in os.walk(target):
                names = set(files)
                candidates.extend(
                    os.path.join(directory, name)
                    for name in files
                    if _looks_like_database(name, names.__contains__)
                )
        found.extend(
            path for path in candidates if not os.path.islink(path) and is_sqlite_database(path)
        )
    return found


def _total_size(targets: list[str]) -> int:
    total = 0
    for target in targets:
        if os.path.isfile(target) and not os.path.islink(target):
            total += os.lstat(target).st_size
            continue
        for directory, _dirs, files in os.walk(target):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(directory, name))
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
    return total


def _done(value: list[bytes]) -> Future[list[bytes]]:
    future: Future[list[bytes]] = Future()
    future.set_result(value)
    return future


def _username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
