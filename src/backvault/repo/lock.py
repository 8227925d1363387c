"""Repository locks, following restic's rules (design.rst, "Locks").

Backups take a shared lock; operations that delete take an exclusive one. A lock older
than 30 minutes, or one whose process is gone on this same host, is stale. Held locks are
refreshed every 5 minutes so long backups never look stale.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import threading
from types import TracebackType

from backvault.repo.errors import DamagedObject, RepositoryLocked
from backvault.repo.format import FormatError, Lock
from backvault.repo.repository import Repository
from backvault.repo.timefmt import format_ns, now_ns, parse_ns
from backvault.storage import FileType, ObjectNotFound

STALE_AFTER_NS = 30 * 60 * 1_000_000_000
REFRESH_EVERY_S = 5 * 60


def _identity() -> tuple[str, str]:
    """This user and device, for locks (encrypted; never for key files, which are not)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return user, socket.gethostname()


def is_stale(lock: Lock, now: int | None = None) -> bool:
    now = now_ns() if now is None else now
    try:
        if now - parse_ns(lock.time) > STALE_AFTER_NS:
            return True
    except ValueError:
        return True
    if lock.hostname == socket.gethostname():
        return not _process_alive(lock.pid)
    return False


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_locks(repo: Repository) -> list[tuple[str, Lock | None]]:
    """Every lock file; None for one that cannot be read (treated as stale)."""
    found: list[tuple[str, Lock | None]] = []
    for name, _ in repo.list_objects(FileType.LOCK):
        try:
            found.append((name, Lock.from_json(repo.load_unpacked(FileType.LOCK, name))))
        except (DamagedObject, FormatError):
            found.append((name, None))
    return found


def remove_stale_locks(repo: Repository, all_locks: bool = False) -> int:
    removed = 0
    for name, lock in read_locks(repo):
        if all_locks or lock is None or is_stale(lock):
            with contextlib.suppress(ObjectNotFound):
                repo.backend.remove(FileType.LOCK, name)
                removed += 1
    return removed


class RepositoryLock:
    def __init__(self, repo: Repository, exclusive: bool = False) -> None:
        self.repo = repo
        self.exclusive = exclusive
        self._name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swap = threading.Lock()

    def _conflict(self) -> Lock | None:
        for name, lock in read_locks(self.repo):
            if name == self._name or lock is None or is_stale(lock):
                continue
            if self.exclusive or lock.exclusive:
                return lock
        return None

    def _save(self) -> str:
        user, host = _identity()
        lock = Lock(
            time=format_ns(now_ns()),
            exclusive=self.exclusive,
            hostname=host,
            username=user,
            pid=os.getpid(),
            uid=os.getuid() if hasattr(os, "getuid") else 0,
            gid=os.getgid() if hasattr(os, "getgid") else 0,
        )
        return self.repo.save_unpacked(FileType.LOCK, lock.to_json())

    def acquire(self) -> None:
        holder = self._conflict()
        if holder is None:
            self._name = self._save()
            # Two clients may have checked at the same moment: look again after writing.
            holder = self._conflict()
            if holder is not None:
                self.release()
        if holder is not None:
            kind = "exclusively " if holder.exclusive else ""
            raise RepositoryLocked(
                f"the repository is locked {kind}by {holder.username}@{holder.hostname} "
                f"(pid {holder.pid}) since {holder.time}; wait for it to finish, or if that "
                "process is gone, run `backvault unlock`"
            )
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
        self._thread.start()
        self.repo.locks_held += 1

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_EVERY_S):
            with self._swap:
                old = self._name
                try:
                    self._name = self._save()
                except Exception:  # noqa: S112 - keep the old lock; retry next round
                    continue
                if old:
                    with contextlib.suppress(Exception):
                        self.repo.backend.remove(FileType.LOCK, old)

    def release(self) -> None:
        if self._thread is not None and not self._stop.is_set():
            self.repo.locks_held -= 1
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._swap:
            if self._name:
                with contextlib.suppress(Exception):
                    self.repo.backend.remove(FileType.LOCK, self._name)
                self._name = None

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
