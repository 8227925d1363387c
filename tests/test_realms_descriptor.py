"""The realm descriptor (docs/realms.md, "Descriptor D") and the guess bound: a descriptor
decodes only from its one canonical encoding and keeps the suite's rules; the bound table
of the spec is what the formula gives."""

from __future__ import annotations

import secrets

import pytest

from backvault.opaque import group
from backvault.realms import bounds
from backvault.realms.descriptor import (
    SUITE,
    Descriptor,
    DescriptorError,
    RealmEntry,
    check_threshold,
    decode,
)


def descriptor(n: int = 3, t: int = 2, user: str = "alice") -> Descriptor:
    realms = tuple(
        RealmEntry(secrets.token_bytes(16), i, group.scalar_mult_base(group.random_scalar()))
        for i in range(1, n + 1)
    )
    return Descriptor(secrets.token_bytes(16), user, t, 5, secrets.token_bytes(32), realms)


def test_round_trip_and_hash() -> None:
    d = descriptor(5, 3, "jwt:ünïcode")
    data = d.encode()
    assert decode(data) == d
    assert SUITE in data
    assert decode(data).hash == d.hash and len(d.hash) == 32
    assert descriptor().hash != d.hash


@pytest.mark.parametrize(("t", "n"), [(1, 2), (1, 3), (2, 4), (3, 6), (4, 3), (2, 1), (9, 17)])
def test_thresholds_that_are_not_a_majority_are_refused(t: int, n: int) -> None:
    with pytest.raises(DescriptorError):
        check_threshold(t, n)


@pytest.mark.parametrize(("t", "n"), [(2, 2), (2, 3), (3, 4), (3, 5), (9, 16)])
def test_majority_thresholds_are_accepted(t: int, n: int) -> None:
    check_threshold(t, n)


def test_every_malformed_descriptor_is_refused() -> None:
    d = descriptor()
    data = d.encode()
    with pytest.raises(DescriptorError, match="truncated"):
        decode(data[:-1])
    with pytest.raises(DescriptorError, match="trailing"):
        decode(data + b"\0")
    with pytest.raises(DescriptorError, match="version 1"):
        decode(b"XXXX" + data[4:])
    other_suite = data.replace(SUITE, SUITE[:-1] + b"5")
    with pytest.raises(DescriptorError, match="another suite"):
        decode(other_suite)
    realms = list(d.realms)
    with pytest.raises(DescriptorError, match="twice"):
        Descriptor(d.version, d.user_id, 2, 5, d.commitment, (realms[0], realms[0]))
    swapped = (RealmEntry(realms[1].realm_id, 1, realms[1].public_share), realms[0])
    with pytest.raises(DescriptorError, match="in order"):
        Descriptor(d.version, d.user_id, 2, 5, d.commitment, swapped)
    identity = (RealmEntry(realms[0].realm_id, 1, bytes(32)), realms[1])
    with pytest.raises(DescriptorError, match="identity"):
        Descriptor(d.version, d.user_id, 2, 5, d.commitment, identity)
    with pytest.raises(DescriptorError, match="more than half"):
        Descriptor(d.version, d.user_id, 1, 5, d.commitment, tuple(realms))
    with pytest.raises(DescriptorError):
        Descriptor(d.version[:8], d.user_id, 2, 5, d.commitment, tuple(realms))
    with pytest.raises(DescriptorError):
        Descriptor(d.version, d.user_id, 2, 0, d.commitment, tuple(realms))


def test_the_bound_table_of_the_spec() -> None:
    # (n, t) -> G_r, then the guesses with 0, 1 and t-1 realms rolled back (docs/realms.md).
    table = {
        (3, 2): (5, 7, 10, 10),
        (4, 3): (5, 6, 7, 10),
        (5, 3): (3, 5, 6, 9),
        (5, 4): (5, 6, 6, 10),
    }
    for (n, t), (allowed, *expected) in table.items():
        assert bounds.default_allowed_guesses(t, n) == allowed
        got = [bounds.guesses_left([None] * k + [allowed] * (n - k), t) for k in (0, 1, t - 1)]
        assert got == expected
        assert bounds.guesses_left([None] * t + [allowed] * (n - t), t) is None


def test_guesses_left_counts_what_each_realm_still_serves() -> None:
    assert bounds.guesses_left([5, 5, 0], 2) == 5  # one realm used up: pairs of the other two
    assert bounds.guesses_left([5, 1, 0], 2) == 1
    assert bounds.guesses_left([0, 0, 5], 2) == 0  # fewer than t realms left: nothing
    assert bounds.guesses_left([3, 3, 3, 3, 3], 3) == 5


def test_guesses_left_agrees_with_counting_every_m() -> None:
    """The binary search gives what trying every m gives (the definition), for random
    counts, thresholds and unbounded realms."""
    import random

    rng = random.Random(14)

    def by_definition(counts: list[int | None], t: int) -> int | None:
        unbounded = sum(1 for c in counts if c is None)
        bounded = [c for c in counts if c is not None]
        if unbounded >= t:
            return None
        return max(
            m
            for m in range(sum(bounded) // (t - unbounded) + 1)
            if sum(min(c, m) for c in bounded) + unbounded * m >= t * m
        )

    for _ in range(2000):
        n = rng.randint(2, 7)
        t = rng.randint(n // 2 + 1, n) if n > 2 else 2
        counts = [rng.choice([None, *range(12)]) for _ in range(n)]
        assert bounds.guesses_left(counts, t) == by_definition(counts, t), (counts, t)
    assert bounds.guesses_left([65535] * 16, 9) == 65535 * 16 // 9  # fast for big counts
