"""The vault's one retry policy: try again, a bounded number of times, only on the failures
the caller names as transient, pausing a little longer after each."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry(
    action: Callable[[], T],
    *,
    attempts: int,
    on: type[BaseException] | tuple[type[BaseException], ...],
    pause: float,
    growing: bool = True,
) -> T:
    """``action()``; when it raises one of ``on``, called again, ``attempts`` times in all,
    after ``pause`` seconds times the number of attempts so far (``growing``) or ``pause``
    seconds each time. The last attempt's failure is raised; any other at once."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except on:
            if attempt == attempts:
                raise
            time.sleep(pause * attempt if growing else pause)
    raise ValueError("attempts must be at least 1")
