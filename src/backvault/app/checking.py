"""Choosing what ``check --read-data-subset`` reads."""

from __future__ import annotations

import random
from collections.abc import Callable

from backvault.app.errors import InvalidArgument


def subset_filter(spec: str | None) -> Callable[[str], bool] | None:
    """--read-data-subset: "n/t" (the n-th of t groups, by pack name) or "P%" (a random
    share of packs); None reads every pack."""
    if spec is None:
        return None
    text = spec.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            rng = random.Random()
            return lambda _name: rng.random() < share
        n, t = (int(x) for x in text.split("/"))
        if not 1 <= n <= t:
            raise ValueError
    except ValueError:
        raise InvalidArgument(
            f"--read-data-subset takes n/t (1 ≤ n ≤ t) or a percentage like 10%, not {spec!r}"
        ) from None
    return lambda name: int(name[:8], 16) % t == n - 1
