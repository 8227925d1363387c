"""Backing up paths into a repository as a restic snapshot.

The tree mirrors restic's: a snapshot of ``/home/a/chat`` has a root tree holding ``home``,
which holds ``a``, which holds ``chat`` with its full contents. Files unchanged since the
parent snapshot (same type, size, mtime, ctime and inode) are not read again
(``files_cache``); SQLite databases are read through a consistent copy (``databases``) and
cut into page-aligned chunks. File data goes through the ``pipeline``.

A backup runs under a shared repository lock: the one its caller holds (the CLI declares it
per command), or, for a program calling the engine directly without one, its own — so a
concurrent prune never deletes data this backup counts on.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from backvault.engine.archiver.databases import DatabaseCopier
from backvault.engine.archiver.files_cache import SQLiteStateCache, database_state, unchanged
from backvault.engine.archiver.pipeline import SealingPipeline
from backvault.engine.archiver.walk import UserNames, node_from_stat, target_layout, total_size
from backvault.engine.progress import NoProgress, Progress
from backvault.repo import format as fmt
from backvault.repo.chunker import page_ranges
from backvault.repo.errors import DamagedObject
from backvault.repo.format import BlobType, Node, Snapshot
from backvault.repo.lock import RepositoryLock
from backvault.repo.repository import Repository
from backvault.repo.timefmt import format_ns, now_ns
from backvault.source.sqlite import (
    SQLiteCopyError,
    databases_under,
    is_sidecar,
    is_sqlite_database,
    looks_like_database,
    page_size_of,
)

CHUNK_OVERRIDE_ENV = "BACKVAULT_SQLITE_CHUNK_KIB"


class _Content(Protocol):
    """A file's blob ids, when stored (a ``Future``, or ``_Known``)."""

    def result(self) -> Sequence[bytes]: ...


_Pending = list[tuple[Node, _Content]]  # files whose content is being stored

# A folder being archived, as a generator: it yields the folder below it to archive
# first (another ``_Folder``) and is sent that folder's tree id; it returns its own.
# ``_BackupRun._archive_tree`` runs them on a stack of its own, not Python's: a folder
# tree may nest deeper than the recursion limit (restic backs it up, and restores it).
_Folder = Generator["_Folder", bytes, bytes]


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


class Backup:
    """A backup of a repository: ``run`` makes one snapshot.

    ``sqlite_chunk_bytes``: the size SQLite databases are cut into; by default the
    repository's setting (``Config.sqlite_chunk_bytes``), so that every machine backing up
    to it cuts alike. ``BACKVAULT_SQLITE_CHUNK_KIB`` overrides it, for measurements only
    (chunks cut to another size do not dedupe with the repository's).

    ``temp_dir``: where the run's folder of database copies goes, a folder only this user
    may enter (the command line gives ``device.paths.private_temp_dir()``). Without one,
    the folder of ``sqlite_state_file`` (the device's own cache), or else a new private
    folder in the system's temporary folder.

    ``copy_databases``: False when the caller guarantees nothing writes the files while the
    backup runs (a private staging folder, as ``backvault import whatsapp`` makes): SQLite
    databases are then read in place, byte for byte (a consistent copy would renumber
    their change counter), and still cut at page boundaries.
    """

    def __init__(
        self,
        repo: Repository,
        progress: Progress | None = None,
        workers: int | None = None,
        sqlite_state_file: Path | None = None,
        temp_dir: str | os.PathLike[str] | None = None,
        sqlite_chunk_bytes: int | None = None,
        copy_databases: bool = True,
    ) -> None:
        self.repo = repo
        self.copy_databases = copy_databases
        if sqlite_chunk_bytes is None:
            override = os.environ.get(CHUNK_OVERRIDE_ENV)
            sqlite_chunk_bytes = (
                int(override) * 1024 if override else repo.config.sqlite_chunk_bytes
            )
        self.sqlite_chunk_bytes = sqlite_chunk_bytes
        self.progress = progress or NoProgress()
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.sqlite_state_file = sqlite_state_file
        self.temp_dir = temp_dir

    def run(
        self,
        paths: list[str],
        tags: list[str] | None = None,
        hostname: str | None = None,
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
        own_temp = self.temp_dir is None
        temp_root = self._temp_root()
        held = self.repo.locks_held > 0
        try:
            with contextlib.nullcontext() if held else RepositoryLock(self.repo):
                copier = DatabaseCopier(temp_root)
                try:
                    result = _BackupRun(self, copier).archive(
                        targets, tags, hostname, scan_first, start_ns
                    )
                finally:
                    copier.close()
        finally:
            if own_temp:
                shutil.rmtree(temp_root, ignore_errors=True)
        self.progress.finish()
        result.seconds = time.monotonic() - started
        return result

    def _temp_root(self) -> Path:
        """Where database copies go: the caller's folder, else a new private one (0700,
        made by ``tempfile``, so no other user can have prepared it) that the run removes
        — beside the SQLite state file when there is one (the same file system as the
        device's cache, not a small /tmp), else in the system's temporary folder."""
        if self.temp_dir is not None:
            return Path(self.temp_dir)
        parent = None
        if self.sqlite_state_file is not None:
            self.sqlite_state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            parent = self.sqlite_state_file.parent
        return Path(tempfile.mkdtemp(prefix="backvault-", dir=parent))


class _BackupRun:
    """One run of a ``Backup``: the walk, with its result, caches and pipeline."""

    def __init__(self, backup: Backup, copier: DatabaseCopier) -> None:
        self.repo = backup.repo
        self.progress = backup.progress
        self.names = UserNames()
        self.copier = copier
        self.sqlite_cache = SQLiteStateCache(backup.sqlite_state_file)
        self.result = BackupResult(snapshot_id="", parent_id=None)
        self.pipeline = SealingPipeline(backup.repo, backup.workers, self._read)
        # A database the worker processes read may be read in place, without a copy.
        copier.in_place = self.pipeline.reads_in_processes
        self.sqlite_chunk_bytes = backup.sqlite_chunk_bytes
        self.copy_databases = backup.copy_databases

    def _read(self, nbytes: int) -> None:
        self.result.bytes_read += nbytes
        self.progress.advance(nbytes)

    def archive(
        self,
        targets: list[str],
        tags: list[str] | None,
        hostname: str,
        scan_first: bool,
        start_ns: int,
    ) -> BackupResult:
        # Databases that changed are copied from the start, while the index loads and the
        # other files are read (the copy is what a daily backup waits for longest); a big
        # one starts the worker processes now (they learn what the repository holds once
        # the index is loaded).
        self.pipeline.expect(self._start_database_copies(targets))
        try:
            self.repo.ensure_index()
            parent_id, parent = self._find_parent(targets, hostname)
            self.result.parent_id = parent_id
            self.progress.start(total_size(targets) if scan_first else None, "backup")
            self.pipeline.start()
            root_tree = self._archive_tree(
                self._archive_layout("/", target_layout(targets), parent.tree if parent else None)
            )
            self.copier.shutdown()
            self.pipeline.finish()
        except BaseException:
            self.copier.cancelled.set()
            self.pipeline.cancel_workers()
            self.copier.shutdown(cancel=True)
            self.pipeline.abort()
            raise
        snapshot = Snapshot(
            time=format_ns(start_ns),
            tree=root_tree,
            paths=targets,
            hostname=hostname,
            username=_username(),
            uid=os.getuid(),
            gid=os.getgid(),
            parent=bytes.fromhex(parent_id) if parent_id else None,
            tags=sorted(set(tags or [])),
        )
        self.result.snapshot_id = self.repo.save_snapshot(snapshot)
        self.sqlite_cache.save(self.result.snapshot_id)
        stats = self.pipeline.writer.stats
        self.result.bytes_added = stats.bytes_plain_new
        self.result.bytes_stored = stats.bytes_stored_new
        self.result.packs_written = stats.packs_written
        return self.result

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

    @staticmethod
    def _archive_tree(top: _Folder) -> bytes:
        """Run folder ``top`` and every folder below it, depth first, as the recursion
        of the plain functions would (the same order, and a folder's error raised where
        its parent asked for it), on a list instead of Python's stack."""
        stack = [top]
        tree: bytes | None = None  # None: the folder on top has not started
        error: BaseException | None = None
        while stack:
            try:
                if error is not None:
                    thrown, error = error, None
                    below = stack[-1].throw(thrown)
                elif tree is None:
                    below = next(stack[-1])
                else:
                    below = stack[-1].send(tree)
            except StopIteration as done:
                stack.pop()
                tree = done.value
                continue
            except BaseException as exc:
                stack.pop()
                if not stack:
                    raise
                error = exc  # into the folder that asked for this one
                continue
            stack.append(below)
            tree = None
        assert tree is not None
        return tree

    def _parent_children(self, parent_tree: bytes | None) -> dict[str, Node]:
        if parent_tree is None:
            return {}
        # Not kept in the tree cache: each is read once, and held (``old``) only until its
        # folder's tree is made (kept, the 5.4 GB store's parent trees were ~9 MiB of
        # nodes for the whole backup).
        try:
            return {n.name: n for n in self.repo.load_tree(parent_tree, keep=False)}
        except DamagedObject:
            return {}

    def _archive_layout(
        self, path: str, layout: dict[str, Any], parent_tree: bytes | None
    ) -> _Folder:
        """A folder on the way from / to the targets (``walk.target_layout``)."""
        old = self._parent_children(parent_tree)
        nodes: list[Node] = []
        pending: _Pending = []
        for name in sorted(layout):
            child_path = os.path.join(path, name)
            sub = layout[name]
            if sub is None:
                node = yield from self._archive_entry(child_path, name, old.get(name), pending)
                if node is not None:
                    nodes.append(node)
                continue
            try:
                st = os.lstat(child_path)
            except OSError as exc:
                self._error(child_path, exc)
                continue
            node = node_from_stat(name, st, self.names)
            prev = old.get(name)
            node.subtree = yield self._archive_layout(
                child_path, sub, prev.subtree if prev and prev.type == "dir" else None
            )
            nodes.append(node)
        return self._finish_tree(path, nodes, pending, parent_tree, old)

    def _finish_tree(
        self,
        path: str,
        nodes: list[Node],
        pending: _Pending,
        parent_tree: bytes | None,
        old: dict[str, Node],
    ) -> bytes:
        self.pipeline.flush()
        for node, future in pending:
            try:
                node.content = future.result()
            except OSError as exc:  # the file became unreadable while we read it
                self._error(exc.filename or node.name, exc)
                nodes.remove(node)
                continue
            if not isinstance(future, _Known):
                _take_access_time_after_reading(os.path.join(path, node.name), node)
        # A folder in which nothing changed keeps its parent snapshot's tree: its nodes,
        # decoded already, compare equal (encoding a database's node of 190,000 chunks
        # again would cost 40 MB for a moment). Any other encodes to a new tree, or to a
        # stored one, which the writer finds.
        if (
            parent_tree is not None
            and len(nodes) == len(old)
            and all(old.get(node.name) == node for node in nodes)
            and self.repo.has_blob(parent_tree)
        ):
            return parent_tree
        # The parent's nodes are done with: a changed database's old content list (~6 MB
        # of ids) is not held while the new tree is encoded.
        old.clear()
        return self.pipeline.writer.add_parts(BlobType.TREE, fmt.tree_parts(nodes))

    def _archive_dir(self, path: str, parent_tree: bytes | None) -> _Folder:
        old = self._parent_children(parent_tree)
        pending: _Pending = []
        try:
            entries = sorted(os.scandir(path), key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            self._error(path, exc)
            entries = []
        names = {e.name for e in entries}
        archived: dict[str, Node] = {}
        # Databases first: their consistent copy is made while the rest is read.
        for entry in sorted(
            entries, key=lambda e: not looks_like_database(e.name, names.__contains__)
        ):
            if is_sidecar(path, entry.name, names):
                continue  # its content is inside the database's consistent copy
            node = yield from self._archive_entry(
                entry.path, entry.name, old.get(entry.name), pending, names
            )
            if node is not None:
                archived[entry.name] = node
        nodes = [archived[e.name] for e in entries if e.name in archived]
        self.result.dirs += 1
        return self._finish_tree(path, nodes, pending, parent_tree, old)

    def _archive_entry(
        self,
        path: str,
        name: str,
        previous: Node | None,
        pending: _Pending,
        siblings: set[str] | None = None,
    ) -> Generator[_Folder, bytes, Node | None]:
        """``siblings``: the names in the entry's folder, as listed (None: not listed).
        A folder's tree is asked of ``_archive_tree`` (yielded)."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            self._error(path, exc)
            return None
        node = node_from_stat(name, st, self.names)
        try:
            if node.type == "dir":
                node.subtree = yield self._archive_dir(
                    path, previous.subtree if previous and previous.type == "dir" else None
                )
                _take_access_time_after_reading(path, node)  # listing it moved its atime
            elif node.type == "symlink":
                node.linktarget = os.readlink(path)
            elif node.type == "file":
                pending.append((node, self._archive_file(path, st, node, previous, siblings)))
            elif node.type in ("dev", "chardev"):
                node.device = st.st_rdev
        except OSError as exc:
            self._error(path, exc)
            return None
        return node

    # --- files -----------------------------------------------------------------------

    def _archive_file(
        self,
        path: str,
        st: os.stat_result,
        node: Node,
        previous: Node | None,
        siblings: set[str] | None,
    ) -> _Content:
        self.result.bytes_total += st.st_size
        # A database in WAL mode changes in its -wal first, so its own stat cannot be
        # trusted: read the header of anything that may be one. An unchanged file with
        # no database name and no WAL or journal beside it is not read at all. Its
        # folder's listing tells (three stats a file cost a no-change backup of 20 000
        # files 0.17 s): a WAL made since the listing is seen by the next backup, as one
        # made just after a stat would be.
        if siblings is None:
            may_be = looks_like_database(path, os.path.lexists)
        else:
            may_be = looks_like_database(node.name, siblings.__contains__)
        if may_be and is_sqlite_database(path):
            return self._archive_sqlite(path, st, node, previous)
        # (Asked only now: a database's 200 000 blobs are looked up once, by the above.)
        same = unchanged(node, previous, self.repo.has_blob)
        if not same and not may_be and is_sqlite_database(path):
            return self._archive_sqlite(path, st, node, previous)
        if same:
            assert previous is not None and previous.content is not None
            self.result.files_unmodified += 1
            self.progress.advance(node.size)
            return _Known(previous.content)
        if previous is None:
            self.result.files_new += 1
        else:
            self.result.files_changed += 1
        return self.pipeline.store_file(path, st.st_size)

    # --- databases -------------------------------------------------------------------

    def _archive_sqlite(
        self, path: str, st: os.stat_result, node: Node, previous: Node | None
    ) -> _Content:
        self.result.sqlite_databases += 1
        state = database_state(path, st)
        if (
            self.sqlite_cache.reusable(path, state, previous)
            and previous is not None
            and previous.content is not None
            and self.repo.has_blobs(previous.content)
        ):
            # Neither the database nor its WAL changed since the parent snapshot.
            self.sqlite_cache.keep(path)
            node.size = previous.size
            self.progress.advance(st.st_size)
            self.result.files_unmodified += 1
            return _Known(previous.content)
        if previous is None:
            self.result.files_new += 1
        else:
            self.result.files_changed += 1
        if not self.copy_databases:  # nothing writes it: its own bytes, in place
            return self.pipeline.store_ranges(
                path,
                page_ranges(st.st_size, page_size_of(path), self.sqlite_chunk_bytes),
                compress=True,
                database=True,
            )
        # The copy takes a while (SQLite copies page by page): a thread makes it and hands
        # its pages to the workers, while this thread goes on with the other files (and
        # the worker processes start, if it is big).
        self.pipeline.expect(st.st_size)
        return self.copier.submit(self._store_database, path, state, node)

    def _start_database_copies(self, targets: list[str]) -> int:
        """Start copying every database under the targets that changed since the last
        backup; their total size."""
        total = 0
        if not self.copy_databases:
            return total
        for path in databases_under(targets):
            try:
                st = os.stat(path)
            except OSError:
                continue  # the walk reports it
            state = database_state(path, st)
            if self.sqlite_cache.state_unchanged(path, state):
                continue
            self.copier.start_early(path, state)
            total += st.st_size
        return total

    def _store_database(self, path: str, state: list[Any], node: Node) -> Sequence[bytes]:
        """On the copier's thread: copy the database, and store the copy's pages."""
        try:
            made = self.copier.take(path, state)
        except SQLiteCopyError as exc:
            raise OSError(errno.EIO, str(exc), path) from exc
        with made.stack:
            node.size = made.image.size
            future = self.pipeline.store_ranges(
                str(made.image.path),
                page_ranges(node.size, made.image.page_size, self.sqlite_chunk_bytes),
                compress=True,
                database=True,
                identity=made.image.identity,
            )
            self.pipeline.flush()
            # The copy (or the read transaction on the database) must stay until the
            # workers read it.
            content = future.result()
        self.sqlite_cache.record(path, made.state, content)
        return content

    def _error(self, path: str, exc: BaseException) -> None:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.result.errors.append((path, message))
        self.progress.note(f"cannot read {path}: {message}")


def _take_access_time_after_reading(path: str, node: Node) -> None:
    """The access time the file (or folder) has now that this backup read (or listed) it,
    if nothing else about it changed meanwhile (its ctime moves with any write or change
    of its metadata, not with a read). Reading it moved its atime (relatime: the first
    read after a change): recorded as it was before, the next backup would find every
    file it read with a new atime, and store its folder's tree again (a database's folder:
    13 MB), and every tree above."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if (
        st.st_ino == node.inode
        and format_ns(st.st_ctime_ns) == node.ctime
        and format_ns(st.st_mtime_ns) == node.mtime
    ):
        node.atime = format_ns(st.st_atime_ns)


class _Known:
    """The content of a file not read again: known already (a ``Future`` made for each
    of 12 000 unchanged files took ~5 µs, its lock and condition)."""

    __slots__ = ("_ids",)

    def __init__(self, ids: Sequence[bytes]) -> None:
        self._ids = ids

    def result(self) -> Sequence[bytes]:
        return self._ids


def _username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
