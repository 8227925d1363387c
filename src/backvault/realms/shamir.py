"""Shamir secret sharing of ristretto255 scalars, and combining shares at x = 0.

A realm's root key k is the constant term of a random polynomial f of degree t - 1; server i
holds f(i). Any t servers recover k (or, without ever recovering it, k * P from their
evaluations i * P) by Lagrange interpolation at 0; t - 1 shares are uniformly random and
say nothing about k.

Shamir indices are public integers 1..255 (at most 255 servers; the index is one byte in a
message). Every operation on scalars, secret or not, goes through libsodium via
:mod:`backvault.opaque.group`; Python integers only turn public indices into scalars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from backvault.opaque import group

MIN_INDEX = 1
MAX_INDEX = 255
_ONE = group.scalar_from_public_int(1)


class ShamirError(ValueError):
    """Bad input to secret sharing: an index outside 1..255, a repeated index, no shares, or
    a threshold the indices cannot meet."""


def _checked_indices(indices: Sequence[int] | Mapping[int, bytes]) -> list[int]:
    """The indices as a list, refusing what would make interpolation wrong or undefined:
    index 0 (that is where the secret lies), repeats (a zero denominator), non-integers."""
    checked = list(indices)
    if not checked:
        raise ShamirError("no Shamir indices given")
    for index in checked:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ShamirError(f"Shamir index {index!r} is not an integer")
        if not MIN_INDEX <= index <= MAX_INDEX:
            raise ShamirError(f"Shamir index {index} is outside {MIN_INDEX}..{MAX_INDEX}")
    if len(set(checked)) != len(checked):
        raise ShamirError(f"repeated Shamir indices in {sorted(checked)}")
    return checked


def split(secret: bytes, threshold: int, indices: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` (a non-zero scalar) so that any ``threshold`` of the ``indices``
    recover it: {index: f(index)} for a fresh random f of degree threshold - 1 with
    f(0) = secret. A threshold of 1 is refused: every share would be the secret itself."""
    group.deserialize_scalar(secret, "secret")
    checked = _checked_indices(indices)
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ShamirError(f"threshold {threshold!r} is not an integer")
    if not 2 <= threshold <= len(checked):
        raise ShamirError(f"threshold {threshold} is not in 2..{len(checked)} (the share count)")
    # f(x) = secret + a_1 x + ... + a_{t-1} x^{t-1}, highest coefficient last.
    coefficients = [secret] + [group.random_scalar() for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for index in checked:
        x = group.scalar_from_public_int(index)
        value = coefficients[-1]
        for coefficient in reversed(coefficients[:-1]):  # Horner
            value = group.scalar_add(group.scalar_mul(value, x), coefficient)
        shares[index] = value
    return shares


def lagrange_at_zero(indices: Sequence[int]) -> dict[int, bytes]:
    """The Lagrange coefficients at x = 0 for these indices, as scalars:
    lambda_i = prod_{j != i} x_j / (x_j - x_i), so that f(0) = sum lambda_i f(x_i) for any f
    of degree below len(indices)."""
    checked = _checked_indices(indices)
    xs = {index: group.scalar_from_public_int(index) for index in checked}
    coefficients: dict[int, bytes] = {}
    for i in checked:
        numerator = _ONE
        denominator = _ONE
        for j in checked:
            if j == i:
                continue
            numerator = group.scalar_mul(numerator, xs[j])
            denominator = group.scalar_mul(denominator, group.scalar_sub(xs[j], xs[i]))
        coefficients[i] = group.scalar_mul(numerator, group.scalar_inverse(denominator))
    return coefficients


def combine_scalars(shares: Mapping[int, bytes]) -> bytes:
    """sum lambda_i * s_i: the secret when given at least threshold shares of one split (with
    fewer, an unrelated scalar; nothing here can tell the difference)."""
    coefficients = lagrange_at_zero(list(shares))
    total: bytes | None = None
    for index, share in shares.items():
        group.deserialize_scalar(share, f"share {index}")
        term = group.scalar_mul(coefficients[index], share)
        total = term if total is None else group.scalar_add(total, term)
    assert total is not None  # lagrange_at_zero refused an empty mapping
    return total


def combine_elements(elements: Mapping[int, bytes]) -> bytes:
    """sum lambda_i * P_i: from evaluations P_i = s_i * B by threshold share holders, the
    evaluation k * B under the shared key, without k ever existing in one place. Refuses
    invalid elements and an identity result."""
    coefficients = lagrange_at_zero(list(elements))
    total: bytes | None = None
    for index, element in elements.items():
        group.deserialize_element(element, f"element of share {index}")
        term = group.scalar_mult(coefficients[index], element)
        total = term if total is None else group.element_add(total, term)
    assert total is not None  # lagrange_at_zero refused an empty mapping
    return group.deserialize_element(total, "combined element")


def public_share(share: bytes) -> bytes:
    """share * G: the public key of a share, against which its holder's VOPRF proofs are
    checked (and, for a full set, which combine to the realm's public key k * G)."""
    return group.scalar_mult_base(group.deserialize_scalar(share, "share"))
