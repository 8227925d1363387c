"""Retries with exponential backoff and full jitter on transient failures, bounded
concurrency, and a size check after every upload. Authentication failures and refusals
are never retried: retrying cannot fix them."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from backvault.storage.base import Backend, FileType, StorageError, TransientStorageError

log = logging.getLogger("backvault.storage")
T = TypeVar("T")


class RetryingBackend(Backend):
    def __init__(
        self,
        inner: Backend,
        attempts: int = 8,
        base_delay: float = 0.25,
        max_delay: float = 20.0,
        connections: int = 4,
        verify_uploads: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.location = inner.location
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.verify_uploads = verify_uploads
        self._slots = threading.BoundedSemaphore(connections)
        self._sleep = sleep
        self.retries = 0

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        last: TransientStorageError | None = None
        for attempt in range(self.attempts):
            try:
                with self._slots:
                    return fn()
            except TransientStorageError as exc:
                last = exc
                self.retries += 1
                if attempt + 1 == self.attempts:
                    break
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
                log.info(
                    "retrying",
                    extra={"what": what, "attempt": attempt + 1, "delay": round(delay, 2)},
                )
                self._sleep(delay)
        raise StorageError(
            f"{self.location} kept failing ({self.attempts} attempts at {what}): {last}; "
            "check the storage and run the command again (nothing is half-written)"
        ) from last

    def create(self) -> None:
        self._retry("create", self.inner.create)

    def exists(self) -> bool:
        return self._retry("config", self.inner.exists)

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        def upload() -> None:
            self.inner.save(kind, name, data)
            if self.verify_uploads:
                size = self.inner.stat(kind, name)
                if size != len(data):
                    raise TransientStorageError(
                        f"{kind.value}/{name}: the storage holds {size} bytes after an upload of {len(data)}"
                    )

        self._retry(f"{kind.value}/{name}", upload)

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        def read() -> bytes:
            data = self.inner.load(kind, name, offset, length)
            if length is not None and offset >= 0 and len(data) < length:
                # A connection cut mid-body; the object itself may be fine.
                size = self.inner.stat(kind, name)
                if offset + length <= size:
                    raise TransientStorageError(f"{kind.value}/{name}: short read")
            return data

        return self._retry(f"{kind.value}/{name}", read)

    def stat(self, kind: FileType, name: str) -> int:
        return self._retry(f"{kind.value}/{name}", lambda: self.inner.stat(kind, name))

    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        return iter(self._retry(f"list {kind.value}", lambda: list(self.inner.list(kind))))

    def remove(self, kind: FileType, name: str) -> None:
        self._retry(f"{kind.value}/{name}", lambda: self.inner.remove(kind, name))

    def close(self) -> None:
        self.inner.close()
