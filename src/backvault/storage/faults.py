"""Fault injection for crash-safety tests: `BACKVAULT_FAULT_KILL_AFTER_WRITES=N` makes the
process kill itself with SIGKILL right before its (N+1)-th write or delete on the storage —
the harshest crash there is (no cleanup, no flush), at an exact, reproducible point.
Never set it outside tests.

A test hook, not a setting: ``open_backend`` reads the variable itself (the one
``BACKVAULT_*`` variable the client's settings, device.settings, leave to a lower layer),
so that a test can crash a process at an exact write without any settings plumbing."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

from backvault.storage.base import Backend, FileType

ENV = "BACKVAULT_FAULT_KILL_AFTER_WRITES"


class KillAfterWrites(Backend):
    def __init__(self, inner: Backend, writes: int) -> None:
        self.inner = inner
        self.location = inner.location
        self._left = writes
        self._lock = threading.Lock()

    def _tick(self) -> None:
        with self._lock:
            if self._left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)
            self._left -= 1

    def create(self) -> None:
        self.inner.create()

    def exists(self) -> bool:
        return self.inner.exists()

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        self._tick()
        self.inner.save(kind, name, data)

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.load(kind, name, offset, length)

    def stat(self, kind: FileType, name: str) -> int:
        return self.inner.stat(kind, name)

    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        return self.inner.list(kind)

    def remove(self, kind: FileType, name: str) -> None:
        self._tick()
        self.inner.remove(kind, name)

    def close(self) -> None:
        self.inner.close()
