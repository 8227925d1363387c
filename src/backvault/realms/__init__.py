"""The threshold realm protocol (docs/realms.md): pure code, no I/O. ``descriptor`` (the
public registration every realm stores), ``bounds`` (how many guesses remain), ``shamir``
(secret sharing over ristretto255 scalars); the client's and the realm's computations."""
