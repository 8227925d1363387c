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

    # f(m) = Σ min(c_i, m) + unbounded·m - t·m is concave in m with f(0) = 0, so the m
    # with f(m) ≥ 0 form an interval [0, M]: a binary search finds M (counts a realm
    # reports cannot make this slow).
    def possible(m: int) -> bool:
        return sum(min(c, m) for c in bounded) + unbounded * m >= threshold * m

    low, high = 0, sum(bounded) // (threshold - unbounded)
    while low < high:
        middle = (low + high + 1) // 2
        if possible(middle):
            low = middle
        else:
            high = middle - 1
    return low


def default_allowed_guesses(threshold: int, realms: int) -> int:
    """The largest per-realm limit G_r that keeps the worst case with t-1 realms rolled
    back, (n - t + 1)·G_r, at most WORST_CASE_TARGET; at least 1."""
    return max(1, WORST_CASE_TARGET // (realms - threshold + 1))
