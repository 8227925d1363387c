"""The threshold realm protocol (docs/realms.md): pure code, no I/O.

One VOPRF key is spread over several realms with Shamir secret sharing, so that a threshold
of them evaluates it together and fewer learn nothing about it. ``descriptor`` (the public
registration every realm stores), ``bounds`` (how many guesses remain), ``shamir`` (secret
sharing over ristretto255 scalars); the client's and the realm's computations.
"""
