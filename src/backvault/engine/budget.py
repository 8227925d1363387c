"""A byte budget shared by a producer and worker threads, so memory stays flat."""

from __future__ import annotations

import threading


class ByteBudget:
    """Bounds the bytes handed to workers and not yet finished with.

    ``take`` blocks while the budget is spent; a single request larger than the whole
    budget is let through when nothing else is in flight, so it cannot deadlock.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._limit:
                self._cond.wait()
            self._used += n

    def give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    def wait_idle(self) -> None:
        """Block until every taken byte was given back."""
        with self._cond:
            while self._used:
                self._cond.wait()
