"""How many guesses realms allow (docs/realms.md, "The bound"): what an attacker can still
make given the attempts left at each realm, and the default per-realm limit."""

from __future__ import annotations

from collections.abc import Sequence

WORST_CASE_TARGET = 10  # guesses with t-1 realms rolled back, at most


def guesses_left(attempts_left: Sequence[int | None], threshold: int) -> int | None:
    """The largest m with Σ min(c_i, m) ≥ t·m: each guess needs t distinct realms, each
    realm serves at most c_i more. ``None`` in ``attempts_left`` is a realm without a limit
    (rolled back, or its key share stolen); the answer is None (no bound) when t of them
    have none."""
    unbounded = sum(1 for c in attempts_left if c is None)
    bounded = [max(0, c) for c in attempts_left if c is not None]
    if unbounded >= threshold:
        return None
    # Σ min(c_i, m) + unbounded·m - t·m is concave in m and 0 at m = 0: the largest m
    # where it is still ≥ 0 is at most Σ c_i / (t - unbounded).
    best = 0
    for m in range(1, sum(bounded) // (threshold - unbounded) + 1):
        if sum(min(c, m) for c in bounded) + unbounded * m >= threshold * m:
            best = m
    return best


def default_allowed_guesses(threshold: int, realms: int) -> int:
    """The largest per-realm limit G_r that keeps the worst case with t-1 realms rolled
    back, (n - t + 1)·G_r, at most WORST_CASE_TARGET; at least 1."""
    return max(1, WORST_CASE_TARGET // (realms - threshold + 1))
