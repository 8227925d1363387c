"""What a key slot is, readable only with the master key.

A restic key file carries ``username`` and ``hostname`` in clear, and the storage provider
reads them. backvault writes the same neutral values into every key file it makes, and puts
what the slot is — a 64-digit recovery key, or a password slot and the vault and account
that hold its secret — in an extra field, ``backvault_label``, sealed with the repository's
master key (restic's authenticated encryption). restic ignores fields it does not know.

The sealed label is padded to a fixed size, so its length tells nothing either, and it names
the key file it belongs to (a digest of the file's scrypt salt): a label copied into another
key file is not believed.

Key files written before this had the kind in clear; ``from_legacy_names`` recognises them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from backvault.crypto.aead import AuthenticationFailed, Key

# What every key file backvault writes shows in clear.
NEUTRAL_USERNAME = "backvault"
NEUTRAL_HOSTNAME = "backvault"

RECOVERY = "recovery key"
PASSWORD = "password"  # noqa: S105 - a slot kind
OTHER = "key"  # a key file made with no particular purpose (tests, tools)

# Earlier versions' clear names.
LEGACY_RECOVERY_USERNAME = "backvault-recovery-key"
LEGACY_PASSWORD_PREFIX = "backvault-password:"  # noqa: S105 - a name prefix

LABEL_VERSION = 1
_PAD_TO = 512  # bytes: a vault URL and an account name fit many times over


class LabelError(ValueError):
    """A sealed label that does not open, or does not belong to this key file."""


@dataclass(frozen=True)
class SlotLabel:
    kind: str  # RECOVERY, PASSWORD or OTHER
    vault_url: str = ""  # password slots: the vault holding the slot secret
    account: str = ""  # … and the account there
    # The kind was read from clear names an earlier version wrote, which anyone who can
    # write the storage could have changed: good enough to show, never a reason to remove
    # a slot or erase a vault record. Relabelling keeps the flag.
    from_clear_names: bool = False

    @classmethod
    def recovery(cls) -> SlotLabel:
        return cls(RECOVERY)

    @classmethod
    def password(cls, vault_url: str, account: str) -> SlotLabel:
        return cls(PASSWORD, vault_url, account)

    def describe(self) -> str:
        if self.kind == PASSWORD:
            return f"password (vault {self.vault_url}, account {self.account})"
        return self.kind

    def seal(self, master: Key, salt: bytes) -> bytes:
        """The label encrypted and authenticated under the master key, bound to the key
        file whose scrypt salt is ``salt``."""
        document = {
            "v": LABEL_VERSION,
            "kind": self.kind,
            "vault": self.vault_url,
            "account": self.account,
            "keyfile": _binding(salt),
        }
        if self.from_clear_names:
            document["clear"] = True
        plain = json.dumps(document, separators=(",", ":")).encode()
        padded_size = -(-(len(plain) + 1) // _PAD_TO) * _PAD_TO
        return master.seal(plain.ljust(padded_size, b" "))  # JSON ignores trailing spaces

    @classmethod
    def open(cls, master: Key, salt: bytes, sealed: bytes) -> SlotLabel:
        try:
            document = json.loads(master.open(sealed))
        except AuthenticationFailed as exc:
            raise LabelError("the label does not open with this repository's key") from exc
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise LabelError("the label is not valid JSON") from exc
        if not isinstance(document, dict) or document.get("v") != LABEL_VERSION:
            raise LabelError("unknown label version")
        if document.get("keyfile") != _binding(salt):
            raise LabelError("the label belongs to another key file")
        kind = document.get("kind")
        if kind not in (RECOVERY, PASSWORD, OTHER):
            raise LabelError(f"unknown slot kind {kind!r}")
        return cls(
            kind,
            str(document.get("vault", "")),
            str(document.get("account", "")),
            document.get("clear") is True,
        )

    @classmethod
    def from_legacy_names(cls, username: str, hostname: str) -> SlotLabel | None:
        """The label of a key file an earlier version wrote, from its clear names."""
        if username == LEGACY_RECOVERY_USERNAME:
            return cls(RECOVERY, from_clear_names=True)
        if username.startswith(LEGACY_PASSWORD_PREFIX):
            account = username.removeprefix(LEGACY_PASSWORD_PREFIX)
            return cls(PASSWORD, hostname, account, from_clear_names=True)
        return None


def _binding(salt: bytes) -> str:
    return hashlib.sha256(b"backvault slot label\0" + salt).hexdigest()
