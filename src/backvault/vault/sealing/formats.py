"""The sealed formats (AES-256-GCM) and the errors of sealing:

- format 2, written today: ``0x02 || key version (4 bytes, big-endian) || nonce (12) ||
  ciphertext || tag (16)``, associated data ``the 5 header bytes || purpose``;
- format 1, written before key versions existed and still read:
  ``0x01 || nonce (12) || ciphertext || tag``, associated data ``purpose``, key version 1.
"""

from __future__ import annotations

FORMAT_UNVERSIONED = 1
FORMAT_VERSIONED = 2
HEADER_SIZE = 5  # format byte + key version
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
# NIST SP 800-38D 8.3: random 96-bit nonces keep the collision chance below 2^-32 only up
# to 2^32 encryptions under one key. The vault warns at half of it.
SEALS_PER_KEY_LIMIT = 2**32
SEALS_PER_KEY_WARNING = 2**31
MAX_KEY_VERSION = 2**32 - 1


class SealingError(Exception):
    """The sealing key is unavailable or unsafe, or a sealed blob does not open."""


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses — a label or
    file name planted with one must not stop the sealer."""
    return text.isascii() and text.isdigit()


def sealed_header(key_version: int) -> bytes:
    """The first bytes of every value sealed under ``key_version`` (format 2)."""
    return bytes([FORMAT_VERSIONED]) + key_version.to_bytes(4, "big")


def key_version_of(sealed: bytes) -> int:
    """The key version a sealed value names (format 1 values: version 1)."""
    return parse_sealed(sealed)[0]


def parse_sealed(sealed: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(key version, nonce, ciphertext || tag, associated-data prefix)."""
    if len(sealed) >= 1 + NONCE_SIZE + TAG_SIZE and sealed[0] == FORMAT_UNVERSIONED:
        return 1, sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :], b""
    if len(sealed) >= HEADER_SIZE + NONCE_SIZE + TAG_SIZE and sealed[0] == FORMAT_VERSIONED:
        header = sealed[:HEADER_SIZE]
        version = int.from_bytes(header[1:], "big")
        if version >= 1:
            body = sealed[HEADER_SIZE + NONCE_SIZE :]
            return version, sealed[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE], body, header
    raise SealingError("sealed data is malformed")
