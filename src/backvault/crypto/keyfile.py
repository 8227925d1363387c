"""restic key files (``keys/<id>``): the master key wrapped under scrypt of a password.

backvault's slot secrets are 256 random bits, so scrypt's cost protects nothing here; we
still write restic's format with restic's default parameters so stock restic opens them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from .aead import AuthenticationFailed, Key

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
            )
        except KeyFileError:
            raise
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
        except ValueError as exc:
            raise KeyFileError("key file holds no valid master key") from exc

    @classmethod
    def create(
        cls,
        master: Key,
        secret: bytes,
        *,
        created: str,
        username: str,
        hostname: str,
        n: int = DEFAULT_SCRYPT_N,
        r: int = DEFAULT_SCRYPT_R,
        p: int = DEFAULT_SCRYPT_P,
    ) -> KeyFile:
        draft = cls(created, username, hostname, n, r, p, secrets.token_bytes(SALT_SIZE), b"")
        document = json.dumps(master.to_json(), separators=(",", ":")).encode()
        sealed = draft._wrapping_key(secret).seal(document)
        return cls(created, username, hostname, n, r, p, draft.salt, sealed)
