"""A random irreducible polynomial of degree 53 over GF(2), for the config's
``chunker_polynomial``. restic refuses a config whose polynomial is not irreducible, and
its own chunker uses it when restic backs up into a backvault repository."""

from __future__ import annotations

import secrets

DEGREE = 53


def _mulmod(a: int, b: int, modulus: int) -> int:
    degree = modulus.bit_length() - 1
    result = 0
    while b:
        if b & 1:
            result ^= a
        b >>= 1
        a <<= 1
        if a >> degree & 1:
            a ^= modulus
    return result


def _gcd(a: int, b: int) -> int:
    while b:
        while a and a.bit_length() >= b.bit_length():
            a ^= b << (a.bit_length() - b.bit_length())
        a, b = b, a
    return a


def is_irreducible(poly: int) -> bool:
    """Ben-Or's test: gcd(f, x^(2^i) - x mod f) = 1 for i = 1 .. deg(f)/2."""
    degree = poly.bit_length() - 1
    if degree < 1:
        return False
    power = 2  # the polynomial x
    for _ in range(degree // 2):
        power = _mulmod(power, power, poly)  # x^(2^i) mod f
        if _gcd(poly, power ^ 2) != 1:
            return False
    return True


def random_irreducible() -> int:
    while True:
        candidate = secrets.randbits(DEGREE) | (1 << DEGREE) | 1
        if is_irreducible(candidate):
            return candidate
