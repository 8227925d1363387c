"""restic's authenticated encryption: ``IV || AES-256-CTR(ciphertext) || Poly1305-AES``.

The MAC is Poly1305-AES (Bernstein 2005) over the ciphertext only, with the IV as nonce:
the one-time Poly1305 key is ``r || AES-128_k(IV)``, where (k, r) is the repository's MAC
key. ``cryptography``'s Poly1305 clamps ``r`` as restic does, so the tags are identical.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.poly1305 import Poly1305

IV_SIZE = 16
MAC_SIZE = 16
OVERHEAD = IV_SIZE + MAC_SIZE
_CTR_ROOM = 16  # cryptography's update_into wants an AES block more room than it writes
ENCRYPTION_KEY_SIZE = 32
MAC_K_SIZE = 16
MAC_R_SIZE = 16
# IVs are drawn from ``secrets`` this many at a time: one getrandom call per blob was a
# measurable share of sealing 180,000 small database chunks.
_IVS_PER_DRAW = 256
# Counts the forks this process came from: a draw belongs to the process that made it.
# A pid alone does not tell (a grandchild may get the pid of a parent that has exited).
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class AuthenticationFailed(ValueError):
    """Ciphertext does not verify: wrong key, or the data was altered or damaged."""


@dataclass(frozen=True)
class Key:
    """A restic key: AES-256 encryption key plus the Poly1305-AES key (k, r)."""

    encrypt: bytes
    mac_k: bytes
    mac_r: bytes
    # Cipher objects cached per thread (they are not thread-safe); not part of the key.
    _local: threading.local = field(
        default_factory=threading.local, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if (len(self.encrypt), len(self.mac_k), len(self.mac_r)) != (32, 16, 16):
            raise ValueError("a restic key is 32 + 16 + 16 bytes")

    def __repr__(self) -> str:
        return "Key(<secret>)"

    @classmethod
    def generate(cls) -> Key:
        return cls(secrets.token_bytes(32), secrets.token_bytes(16), secrets.token_bytes(16))

    @classmethod
    def from_derived_bytes(cls, material: bytes) -> Key:
        """Split 64 KDF bytes as restic does: encryption key, then MAC k, then MAC r."""
        if len(material) != 64:
            raise ValueError("need 64 bytes of key material")
        return cls(material[:32], material[32:48], material[48:64])

    def derive(self, purpose: bytes) -> Key:
        """A key of its own for ``purpose`` (HKDF-SHA256 of this key): what this device seals
        for itself never opens as, or passes for, the repository's data."""
        material = HKDF(
            hashes.SHA256(), 64, salt=None, info=b"backvault key for " + purpose
        ).derive(self.encrypt + self.mac_k + self.mac_r)
        return Key.from_derived_bytes(material)

    def to_json(self) -> dict[str, Any]:
        """The master key document inside a key file's ``data``."""
        return {
            "mac": {"k": _b64(self.mac_k), "r": _b64(self.mac_r)},
            "encrypt": _b64(self.encrypt),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Key:
        try:
            return cls(
                base64.b64decode(doc["encrypt"], validate=True),
                base64.b64decode(doc["mac"]["k"], validate=True),
                base64.b64decode(doc["mac"]["r"], validate=True),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError("not a restic master key document") from exc

    def _mac(self, iv: bytes, ciphertext: bytes | memoryview) -> bytes:
        return Poly1305.generate_tag(self._mac_key(iv), ciphertext)

    def _mac_key(self, iv: bytes) -> bytes:
        """The one-time Poly1305 key of ``iv``: ``r || AES_k(iv)``."""
        # AES_k(nonce) is one ECB block: a per-thread encryptor is reused for every blob
        # (ECB keeps no state between blocks), which saves building a cipher per blob.
        local = self._local
        encryptor = getattr(local, "ecb", None)
        if encryptor is None:
            encryptor = Cipher(algorithms.AES(self.mac_k), modes.ECB()).encryptor()  # noqa: S305 - one block: AES_k(nonce) of Poly1305-AES
            local.ecb = encryptor
        return self.mac_r + encryptor.update(iv)

    def _aes(self) -> algorithms.AES:
        aes = getattr(self._local, "aes", None)
        if aes is None:
            aes = algorithms.AES(self.encrypt)
            self._local.aes = aes
        return aes

    def _ctr(self, iv: bytes) -> CipherContext:
        """This thread's AES-CTR context, starting at counter block ``iv``: it encrypts and
        decrypts alike (CTR XORs a keystream; ``update`` gives every byte, no ``finalize``).
        One context is kept per thread and moved to each blob's IV with ``reset_nonce``
        (the API cryptography provides for exactly this), which saves building a Cipher
        and its context per blob (a third of the decryption time of an 8 KiB blob). CTR
        keeps no other state: after the reset the keystream is that of a fresh context."""
        local = self._local
        context: CipherContext | None = getattr(local, "ctr", None)
        if context is None:
            context = Cipher(self._aes(), modes.CTR(iv)).encryptor()
            local.ctr = context
        else:
            context.reset_nonce(iv)
        return context

    def _verified(self, sealed: bytes | memoryview) -> tuple[bytes, memoryview]:
        """The IV and ciphertext of sealed data whose MAC verifies (else
        AuthenticationFailed). The ciphertext is a view: the MAC and AES read it in place."""
        data = memoryview(sealed)
        if len(data) < OVERHEAD:
            raise AuthenticationFailed("ciphertext is shorter than its IV and MAC")
        iv = bytes(data[:IV_SIZE])
        ciphertext = data[IV_SIZE:-MAC_SIZE]
        if not hmac.compare_digest(self._mac(iv, ciphertext), data[-MAC_SIZE:]):
            raise AuthenticationFailed("MAC mismatch")
        return iv, ciphertext

    def _fresh_iv(self) -> bytes:
        """A new random IV: the next 16 bytes of this thread's draw from ``secrets``. Each
        byte is handed out once; the draw belongs to the process that made it (a forked
        child must not repeat its parent's IVs) and to one thread."""
        local = self._local
        pool: bytes | None = getattr(local, "ivs", None)
        used: int = getattr(local, "ivs_used", 0)
        # (The pid too: a fork made outside Python, by C code, runs no at-fork handler.)
        owner = (os.getpid(), _fork_generation)
        if pool is None or used >= len(pool) or getattr(local, "ivs_owner", None) != owner:
            pool, used = secrets.token_bytes(IV_SIZE * _IVS_PER_DRAW), 0
            local.ivs, local.ivs_owner = pool, owner
        local.ivs_used = used + IV_SIZE
        return pool[used : used + IV_SIZE]

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt and authenticate: ``IV || ciphertext || MAC``, with a fresh random IV."""
        iv = self._fresh_iv()
        ciphertext = self._ctr(iv).update(plaintext)
        return iv + ciphertext + self._mac(iv, ciphertext)

    def seal_parts(self, parts: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
        """``seal`` of the parts joined, as parts (IV, each part's ciphertext, MAC), so
        that big plaintext made of pieces is never copied whole."""
        return list(self.seal_stream(parts))

    def seal_stream(self, parts: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
        """``seal_parts`` as each part is sealed: IV, each part's ciphertext, then the
        MAC, for a caller that writes them as they come (the index cache: ~13 MB sealed,
        at the end of a backup, when its process holds the most)."""
        iv = self._fresh_iv()
        context = self._ctr(iv)
        mac = Poly1305(self._mac_key(iv))
        yield iv
        for part in parts:
            ciphertext = context.update(part)
            mac.update(ciphertext)
            yield ciphertext
        yield mac.finalize()

    def open_into(self, sealed: bytes | memoryview, out: bytearray | memoryview) -> memoryview:
        """``open`` that decrypts into ``out`` instead of a new object, for hot loops that
        reuse one buffer; ``out`` must hold ``len(sealed)`` bytes. A view of ``out``."""
        iv, ciphertext = self._verified(sealed)
        if len(out) < len(sealed):  # update_into wants room for one block more than it writes
            raise ValueError("the output buffer is smaller than the sealed data")
        written = self._ctr(iv).update_into(ciphertext, out)
        return memoryview(out)[:written]

    def open_in_slices(self, sealed: bytes | memoryview, out: bytearray) -> Iterator[memoryview]:
        """``open`` a slice at a time into ``out``, for a caller that only reads the
        plaintext once (to hash it): the MAC is verified first (AuthenticationFailed
        before any plaintext), then each slice is decrypted into ``out`` and is valid
        until the next. No object of the blob's size is made."""
        iv, ciphertext = self._verified(sealed)
        step = len(out) - _CTR_ROOM  # update_into wants room for a block more than it writes
        if step <= 0:
            raise ValueError("the output buffer is too small to decrypt into")
        # A context of its own, not the thread's (``_ctr``): the caller may open or seal
        # something else between two slices.
        context = Cipher(self._aes(), modes.CTR(iv)).decryptor()
        for start in range(0, len(ciphertext), step):
            written = context.update_into(ciphertext[start : start + step], out)
            yield memoryview(out)[:written]

    def open(self, sealed: bytes | memoryview) -> bytes:
        """Verify and decrypt; raises AuthenticationFailed before releasing any plaintext."""
        iv, ciphertext = self._verified(sealed)
        return self._ctr(iv).update(ciphertext)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
