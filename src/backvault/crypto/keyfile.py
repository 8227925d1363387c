"""restic key files (``keys/<id>``): the master key wrapped under scrypt of a password.

backvault's slot secrets are 256 random bits, so scrypt's cost protects nothing here; we
still write restic's format with restic's default parameters so stock restic opens them.

The clear ``username`` and ``hostname`` are neutral in every key file backvault writes;
what the slot is lives in the sealed ``backvault_label`` field (see slotlabel).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from backvault.crypto.aead import AuthenticationFailed, Key
from backvault.crypto.slotlabel import NEUTRAL_HOSTNAME, NEUTRAL_USERNAME, LabelError, SlotLabel

SALT_SIZE = 64
# restic's defaults before calibration; accepted by every restic version.
DEFAULT_SCRYPT_N = 1 << 15
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
_MAX_SCRYPT_MEMORY = 1 << 30


class KeyFileError(ValueError):
    """A key file that is not a restic key file."""


class WrongSecret(ValueError):
    """The secret does not open this key file."""


@dataclass(frozen=True)
class KeyFile:
    created: str
    username: str
    hostname: str
    n: int
    r: int
    p: int
    salt: bytes
    data: bytes  # the sealed master key document
    label: bytes = b""  # the sealed SlotLabel; empty in key files restic or old versions made

    def __repr__(self) -> str:
        return (
            f"KeyFile(created={self.created!r}, username={self.username!r}, "
            f"hostname={self.hostname!r}, n={self.n}, r={self.r}, p={self.p}, "
            f"label={'<sealed>' if self.label else None})"
        )

    def to_bytes(self) -> bytes:
        doc = {
            "created": self.created,
            "username": self.username,
            "hostname": self.hostname,
            "kdf": "scrypt",
            "N": self.n,
            "r": self.r,
            "p": self.p,
            "salt": base64.b64encode(self.salt).decode(),
            "data": base64.b64encode(self.data).decode(),
        }
        if self.label:
            doc["backvault_label"] = base64.b64encode(self.label).decode()
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyFile:
        try:
            doc: Any = json.loads(raw)
            if doc.get("kdf") != "scrypt":
                raise KeyFileError(f"unsupported KDF {doc.get('kdf')!r}")
            n, r, p = doc["N"], doc["r"], doc["p"]
            if not all(isinstance(v, int) and v > 0 for v in (n, r, p)) or n & (n - 1):
                raise KeyFileError("bad scrypt parameters")
            if 128 * r * n > _MAX_SCRYPT_MEMORY or p > 64:
                raise KeyFileError("scrypt parameters are unreasonably large")
            return cls(
                created=str(doc.get("created", "")),
                username=str(doc.get("username", "")),
                hostname=str(doc.get("hostname", "")),
                n=n,
                r=r,
                p=p,
                salt=base64.b64decode(doc["salt"], validate=True),
                data=base64.b64decode(doc["data"], validate=True),
                label=base64.b64decode(doc.get("backvault_label", ""), validate=True),
            )
        except KeyFileError:
            raise
        except RecursionError:  # JSON nested deeper than Python's recursion limit
            raise KeyFileError("not a restic key file: JSON nested too deep") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyFileError(f"not a restic key file: {exc}") from exc

    def _wrapping_key(self, secret: bytes) -> Key:
        material = hashlib.scrypt(
            secret,
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=_MAX_SCRYPT_MEMORY + (1 << 20),
            dklen=64,
        )
        return Key.from_derived_bytes(material)

    def open(self, secret: bytes) -> Key:
        """The master key, or WrongSecret."""
        try:
            plaintext = self._wrapping_key(secret).open(self.data)
        except AuthenticationFailed as exc:
            raise WrongSecret("the secret does not open this key file") from exc
        try:
            return Key.from_json(json.loads(plaintext))
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise KeyFileError("key file holds no valid master key") from exc

    def read_label(self, master: Key) -> SlotLabel | None:
        """What the slot is: its sealed label, else what an earlier version's clear names
        say; None for a key file restic made, or whose label does not belong to it."""
        if self.label:
            try:
                return SlotLabel.open(master, self.salt, self.label)
            except LabelError:
                return None
        return SlotLabel.from_legacy_names(self.username, self.hostname)

    def relabelled(self, master: Key, label: SlotLabel) -> KeyFile:
        """The same slot (same salt, same sealed master key) with neutral names and a
        sealed label: how an earlier version's key file loses its clear names."""
        return KeyFile(
            self.created,
            NEUTRAL_USERNAME,
            NEUTRAL_HOSTNAME,
            self.n,
            self.r,
            self.p,
            self.salt,
            self.data,
            label.seal(master, self.salt),
        )

    @classmethod
    def create(
        cls,
        master: Key,
        secret: bytes,
        *,
        created: str,
        label: SlotLabel,
        n: int = DEFAULT_SCRYPT_N,
        r: int = DEFAULT_SCRYPT_R,
        p: int = DEFAULT_SCRYPT_P,
    ) -> KeyFile:
        """A new key file for ``secret``, with neutral names and ``label`` sealed."""
        salt = secrets.token_bytes(SALT_SIZE)
        draft = cls(created, NEUTRAL_USERNAME, NEUTRAL_HOSTNAME, n, r, p, salt, b"")
        document = json.dumps(master.to_json(), separators=(",", ":")).encode()
        sealed = draft._wrapping_key(secret).seal(document)
        return cls(
            created,
            NEUTRAL_USERNAME,
            NEUTRAL_HOSTNAME,
            n,
            r,
            p,
            salt,
            sealed,
            label.seal(master, salt),
        )
