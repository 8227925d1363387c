"""Per-node token-bucket rate limits (per client address and per account), on top of the
guess limit, which is exact across nodes. These only shed load; they count nothing."""

from __future__ import annotations

import threading
import time

from cachetools import LRUCache


class RateLimiter:
    def __init__(
        self, per_minute: float, burst: float | None = None, max_keys: int = 100_000
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst if burst is not None else max(1.0, per_minute / 6)
        # The most recently seen keys' buckets: past max_keys, the least recently seen
        # key's bucket goes (it starts full again if that key comes back).
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(maxsize=max_keys)
        self._lock = threading.Lock()

    def allow(self, key: str) -> float:
        """0 if allowed now; otherwise the seconds to wait."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1 - tokens) / self.rate
        return wait
