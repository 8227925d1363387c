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
from collections.abc import Callable
from typing import Any

from backvault.storage.base import Backend, BackendWrapper, FileType, Spool

ENV = "BACKVAULT_FAULT_KILL_AFTER_WRITES"


class KillAfterWrites(BackendWrapper):
    """Counts the writes and deletes of the process it is in: a worker process reopens it
    (from the backend's spec) with the count left when the workers started."""

    def __init__(self, inner: Backend, writes: int) -> None:
        super().__init__(inner)
        self._left = writes
        self._lock = threading.Lock()

    def wrapper_options(self) -> dict[str, Any]:
        with self._lock:
            return {"writes": self._left}

    def _tick(self) -> None:
        with self._lock:
            if self._left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)
            self._left -= 1

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        self._tick()
        self.inner.save(kind, name, data)

    def remove(self, kind: FileType, name: str) -> None:
        self._tick()
        self.inner.remove(kind, name)

    def spool(self, kind: FileType) -> Spool | None:
        inner = self.inner.spool(kind)
        return None if inner is None else _CountedSpool(inner, self._tick)


class _CountedSpool(Spool):
    """A spool whose ``save_as`` counts as a write (the moment its object appears)."""

    def __init__(self, inner: Spool, tick: Callable[[], None]) -> None:
        self._inner = inner
        self._tick = tick

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def save_as(self, name: str) -> None:
        self._tick()
        self._inner.save_as(name)

    def discard(self) -> None:
        self._inner.discard()
