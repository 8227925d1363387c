"""Sealing at rest: every secret the vault stores is encrypted under a key that never
leaves an HSM (PKCS#11), or — the embedded default — a sealing-key file.

A sealed blob is ``version (1) || nonce (12) || AES-256-GCM(ciphertext || tag)``, with
associated data naming what is sealed and for whom (e.g. ``record:alice``), so a blob
copied into another row or field does not open.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
NONCE_SIZE = 12
KEY_SIZE = 32


class SealingError(Exception):
    """The sealing key is unavailable, or a sealed blob does not open."""


class Sealer(Protocol):
    description: str

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes: ...

    def open(self, sealed: bytes, purpose: bytes) -> bytes: ...

    def close(self) -> None: ...


def _split(sealed: bytes) -> tuple[bytes, bytes]:
    if len(sealed) < 1 + NONCE_SIZE + 16 or sealed[0] != FORMAT_VERSION:
        raise SealingError("sealed data is malformed")
    return sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :]


class FileSealer:
    """AES-256-GCM under a 32-byte key kept in a file (mode 0600).

    For a single self-hosted node. Keep the file off the database's disk and out of its
    backups: whoever holds both can open the records.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise SealingError(f"the sealing key file {self.path} does not exist")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(KEY_SIZE))
        key = self.path.read_bytes()
        if len(key) != KEY_SIZE:
            raise SealingError(f"the sealing key file {self.path} must hold exactly 32 bytes")
        if self.path.stat().st_mode & 0o077:
            raise SealingError(
                f"the sealing key file {self.path} is readable by others; chmod 600 it"
            )
        self._aead = AESGCM(key)
        self.description = f"sealing-key file {self.path}"

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        return bytes([FORMAT_VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, purpose)

    def open(self, sealed: bytes, purpose: bytes) -> bytes:
        nonce, body = _split(sealed)
        try:
            return self._aead.decrypt(nonce, body, purpose)
        except InvalidTag as exc:
            raise SealingError("sealed data does not open (wrong key, or altered)") from exc

    def close(self) -> None:
        pass


# Opening a token is retried this many times on a transient GeneralError.
_OPEN_ATTEMPTS = 6


class Pkcs11Sealer:
    """AES-256-GCM inside an HSM over PKCS#11: the key is generated in the token as
    sensitive and non-extractable, and every seal/open is a call into the token.

    python-pkcs11 initialises the library without OS locking, so calls into the token are
    serialised here with one lock (a seal or open takes about 0.2 ms on SoftHSM2).
    """

    def __init__(
        self,
        module: str,
        token_label: str,
        pin: str,
        key_label: str = "backvault-sealing",
        create: bool = True,
    ) -> None:
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass

        self._pkcs11 = pkcs11
        self._lock = threading.Lock()
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                lib = pkcs11.lib(module)
                token = lib.get_token(token_label=token_label)
                self._session: Any = token.open(user_pin=pin, rw=True)
                break
            except pkcs11.exceptions.GeneralError as exc:
                # Transient: SoftHSM2 answers this while another process (a second vault
                # node starting) rewrites the token's files; network HSMs while busy.
                if attempt + 1 == _OPEN_ATTEMPTS:
                    raise SealingError(
                        f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
                    ) from exc
                time.sleep(0.1 * (attempt + 1))
            except (pkcs11.PinIncorrect, pkcs11.PinLenRange) as exc:
                raise SealingError(
                    f"cannot log in to the HSM token {token_label!r}: {exc!r}"
                ) from exc
            except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
                raise SealingError(
                    f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
                ) from exc
        try:
            self._key: Any = self._session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=key_label
            )
        except pkcs11.NoSuchKey:
            if not create:
                self.close()
                raise SealingError(
                    f"the HSM token has no key labelled {key_label!r}; create it once with "
                    "`backvault vault init-hsm`"
                ) from None
            self._key = self._session.generate_key(
                KeyType.AES,
                256,
                label=key_label,
                store=True,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                },
            )
        except pkcs11.MultipleObjectsReturned:
            self.close()
            raise SealingError(f"the HSM token has several keys labelled {key_label!r}") from None
        self.description = f"PKCS#11 token {token_label!r} ({module}), key {key_label!r}"

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams, Mechanism

        nonce = secrets.token_bytes(NONCE_SIZE)
        try:
            with self._lock:
                body = self._key.encrypt(
                    plaintext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, purpose, 128),
                )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"the HSM refused to seal: {exc!r}") from exc
        return bytes([FORMAT_VERSION]) + nonce + bytes(body)

    def open(self, sealed: bytes, purpose: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams, Mechanism

        nonce, body = _split(sealed)
        try:
            with self._lock:
                return bytes(
                    self._key.decrypt(
                        body,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, purpose, 128),
                    )
                )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"sealed data does not open (wrong key, or altered): {exc!r}"
            ) from exc

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):  # a dead session needs no closing
            self._session.close()
