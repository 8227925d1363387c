"""Key check values, which tell the vault's own keys from planted ones, and the vouches
that chain each key version's record to a lower version the vault already trusts."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from backvault.vault.sealing.formats import NONCE_SIZE

# A key's check value: SHA-256 of the AES-256-GCM encryption, under the key, of one zero
# block with a fixed nonce and associated data. Only the key's holder can compute it
# (through the HSM, or with the key file), and nobody can make a key with a given one, so
# a recorded check value tells the vault's own key from one planted under the same label
# or file name. The same input always gives the same output, so computing it again reveals
# nothing new; hashing keeps even that one block's ciphertext and tag out of the database.
# (A seal's random nonce equals the fixed one with probability 2^-96.)
CHECK_VALUE_NONCE = bytes(NONCE_SIZE)
CHECK_VALUE_ASSOCIATED_DATA = b"backvault sealing-key check value v1"
CHECK_VALUE_BLOCK = bytes(16)

# A version's record is vouched for by the key of a lower version the vault already
# trusts: the vouch is a value sealed (format 2, naming the vouching version) under that
# key, of nothing, with associated data naming this context, the version and its check
# value. Only the holder of the lower key makes one, so a record written into the database
# by someone who cannot use the vault's keys — even with the check value of a key they
# planted — is not vouched for, and its key is ignored. The first version of a database
# (and those adopted from before records existed) vouches for itself: that marks the
# database as chained, and a self-vouch never makes any other version trusted.
VOUCH_CONTEXT = b"backvault sealing-key version vouch v1\0"


def vouch_purpose(version: int, check_value: bytes) -> bytes:
    """The associated data of the vouch for ``version`` with ``check_value``."""
    return VOUCH_CONTEXT + version.to_bytes(8, "big") + check_value


def short_check_value(check_value: bytes) -> str:
    """How logs, metrics and listings show a check value: its first 8 bytes in hex."""
    return check_value[:8].hex()


def compute_check_value(encrypt: Callable[[Any, bytes, bytes, bytes], bytes], key: Any) -> bytes:
    """The check value of ``key``, from ``encrypt(key, nonce, plaintext, associated_data)``."""
    encrypted = encrypt(key, CHECK_VALUE_NONCE, CHECK_VALUE_BLOCK, CHECK_VALUE_ASSOCIATED_DATA)
    return hashlib.sha256(CHECK_VALUE_ASSOCIATED_DATA + b"\0" + encrypted).digest()
