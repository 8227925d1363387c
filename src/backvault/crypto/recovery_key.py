"""The 64-digit recovery key: 256 random bits as 64 hex digits, shown in 16 groups of 4.

Its canonical form (64 lowercase hex digits, no separators) is the password of the
recovery slot's restic key file, so stock restic opens the repository with it.
"""

from __future__ import annotations

import re
import secrets

DIGITS = 64
GROUP = 4
GROUPS = DIGITS // GROUP
_SEPARATORS = re.compile(r"[\s\-]+")
_HEX = set("0123456789abcdef")
# Characters people misread for hex digits, and what they probably meant.
_LOOKALIKES = {"o": "0", "l": "1", "i": "1", "s": "5", "z": "2", "g": "9", "q": "9", "b": "8"}


class MalformedKey(ValueError):
    """The text is not a 64-digit key; the message says which group is wrong."""


def generate() -> bytes:
    return secrets.token_bytes(DIGITS // 2)


def canonical(secret: bytes) -> str:
    """The form restic takes as the password: 64 lowercase hex digits."""
    if len(secret) != DIGITS // 2:
        raise ValueError("a recovery secret is 32 bytes")
    return secret.hex()


def display(secret: bytes) -> str:
    """16 groups of 4 digits, separated by spaces (easy to copy by hand)."""
    text = canonical(secret)
    return " ".join(text[i : i + GROUP] for i in range(0, DIGITS, GROUP))


def parse(text: str) -> bytes:
    """Parse a key as typed: spaces, dashes, line breaks and upper case are tolerated."""
    tokens = [t for t in _SEPARATORS.split(text.strip().lower()) if t]
    joined = "".join(tokens)
    if not joined:
        raise MalformedKey("the key is empty: enter the 64 digits (16 groups of 4)")
    for position, char in enumerate(joined):
        if char not in _HEX:
            group = position // GROUP + 1
            hint = ""
            if char in _LOOKALIKES:
                hint = f" (did you mean '{_LOOKALIKES[char]}'?)"
            raise MalformedKey(
                f"group {group} contains {char!r}, which is not a hex digit (0-9, a-f){hint}"
            )
    if len(tokens) > 1:
        # Typed in groups: point at the first group whose digits do not come in fours.
        digits_before = 0
        for token in tokens:
            if len(token) % GROUP:
                raise MalformedKey(
                    f"group {digits_before // GROUP + 1} ({token!r}) has {len(token)} digits; "
                    f"every group has {GROUP}"
                )
            digits_before += len(token)
    if len(joined) != DIGITS:
        if len(joined) < DIGITS:
            group = len(joined) // GROUP + 1
            raise MalformedKey(
                f"the key has {len(joined)} digits, it needs {DIGITS}: "
                f"group {group} is incomplete or missing"
            )
        raise MalformedKey(
            f"the key has {len(joined)} digits, it needs {DIGITS}: "
            f"there is more after group {GROUPS}"
        )
    return bytes.fromhex(joined)


def is_attempted_key(text: str) -> bool:
    """True when text looks like someone typing a 64-digit key, so that its errors are
    worth reporting: nearly all hex digits and close to 64 of them, or typed in groups
    of four."""
    lowered = text.strip().lower()
    compact = _SEPARATORS.sub("", lowered)
    if not compact:
        return False
    hex_share = sum(c in _HEX for c in compact) / len(compact)
    if DIGITS // 2 <= len(compact) <= DIGITS + 16 and hex_share >= 0.85:
        return True
    tokens = [t for t in _SEPARATORS.split(lowered) if t]
    return len(tokens) >= 8 and sum(len(t) == GROUP for t in tokens) >= len(tokens) * 0.75
