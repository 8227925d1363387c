"""The threshold realm protocol: pure code, no I/O.

A realm spreads one VOPRF key over several servers with Shamir secret sharing, so that a
threshold of them evaluates the key together and fewer learn nothing about it. The spec is
docs/realms.md (to be written).
"""
