"""Retries with exponential backoff and full jitter on transient failures, bounded
concurrency, and a size check after every upload. Authentication failures and refusals
are never retried: retrying cannot fix them."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from backvault.storage.base import (
    Backend,
    BackendWrapper,
    FileType,
    StorageError,
    TransientStorageError,
)

log = logging.getLogger("backvault.storage")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """The project's one retry loop: up to ``attempts`` calls, with exponential backoff
    and full jitter between them (a random wait up to ``base_delay * 2**n``, capped at
    ``max_delay``), so that clients that failed together do not come back together."""

    attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 20.0

    def delay(self, failed_attempts: int) -> float:
        """How long to wait after the ``failed_attempts``-th failure in a row."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (failed_attempts - 1)))

    def call(
        self,
        fn: Callable[[], T],
        retry_on: tuple[type[BaseException], ...] = (TransientStorageError,),
        on_retry: Callable[[int, float, BaseException], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """``fn()``, called again after a failure of a ``retry_on`` type until it succeeds
        or ``attempts`` calls failed (then the last failure is raised). ``on_retry(n,
        delay, exc)`` hears of each retry before its wait."""
        for attempt in range(1, max(1, self.attempts) + 1):
            try:
                return fn()
            except retry_on as exc:
                if attempt >= self.attempts:
                    raise
                delay = self.delay(attempt)
                if on_retry is not None:
                    on_retry(attempt, delay, exc)
                sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


class RetryingBackend(BackendWrapper):
    """Retries transient failures of the backend it wraps (``RetryPolicy``), holds at
    most ``connections`` calls at once, and checks the size of every upload."""

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
        super().__init__(inner)
        self.policy = RetryPolicy(attempts, base_delay, max_delay)
        self.verify_uploads = verify_uploads
        self.connections = connections
        self._slots = threading.BoundedSemaphore(connections)
        self._sleep = sleep
        self.retries = 0

    @property
    def attempts(self) -> int:
        """How many times a call is tried at most."""
        return self.policy.attempts

    def wrapper_options(self) -> dict[str, Any]:
        return {
            "attempts": self.policy.attempts,
            "base_delay": self.policy.base_delay,
            "max_delay": self.policy.max_delay,
            "connections": self.connections,
            "verify_uploads": self.verify_uploads,
        }

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            with self._slots:
                return fn()

        def note(attempt: int, delay: float, exc: BaseException) -> None:
            self.retries += 1
            log.info("retrying", extra={"what": what, "attempt": attempt, "delay": round(delay, 2)})

        try:
            return self.policy.call(attempt, on_retry=note, sleep=self._sleep)
        except TransientStorageError as exc:
            self.retries += 1
            raise StorageError(
                f"{self.location} kept failing ({self.policy.attempts} attempts at {what}): "
                f"{exc}; check the storage and run the command again (nothing is half-written)"
            ) from exc

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

    def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
        return self._retry(
            f"{kind.value}/{name}", lambda: self.inner.load_into(kind, name, offset, into)
        )

    def stat(self, kind: FileType, name: str) -> int:
        return self._retry(f"{kind.value}/{name}", lambda: self.inner.stat(kind, name))

    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        return iter(self._retry(f"list {kind.value}", lambda: list(self.inner.list(kind))))

    def remove(self, kind: FileType, name: str) -> None:
        self._retry(f"{kind.value}/{name}", lambda: self.inner.remove(kind, name))
