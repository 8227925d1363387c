"""Who is calling: bearer tokens name an account. Pluggable, with two verifiers built in.

- Built-in tokens (self-hosting): ``backvault vault add-account NAME`` prints a random
  token; the vault keeps only its SHA-256.
- Ed25519-signed JWTs from the deployment's account system (how a chat service
  integrates): the vault holds the public key; ``sub`` names the account and ``exp`` is
  required; ``aud`` and ``iss`` are checked when configured.

A token lets its holder *try*: only the password gets a record's secret out.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .service import ACCOUNT_NAME


class TokenVerifier(Protocol):
    def account(self, token: str) -> str | None:
        """The account the token names, or None if this verifier does not accept it."""


class BuiltinTokens:
    """Looks tokens up in the vault's database, remembering answers for ``cache_seconds``
    (so a removed token keeps working at most that long on a node)."""

    def __init__(
        self,
        lookup: Callable[[str], str | None],
        cache_seconds: float = 30.0,
        max_entries: int = 100_000,
    ) -> None:
        self._lookup = lookup
        self._ttl = cache_seconds
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def account(self, token: str) -> str | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        name = self._lookup(token)
        with self._lock:
            # Unknown tokens are remembered briefly: the account may be created any moment.
            self._cache[key] = (now + (self._ttl if name else min(self._ttl, 2.0)), name)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return name


class Ed25519JwtVerifier:
    def __init__(
        self,
        public_key_pem: bytes,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
    ) -> None:
        key = load_pem_public_key(public_key_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the JWT public key must be an Ed25519 key (PEM)")
        self._key = key
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    @classmethod
    def from_file(
        cls, path: str | Path, audience: str | None, issuer: str | None
    ) -> Ed25519JwtVerifier:
        return cls(Path(path).read_bytes(), audience, issuer)

    def account(self, token: str) -> str | None:
        if token.count(".") != 2:
            return None
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["EdDSA"],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError:
            return None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not ACCOUNT_NAME.match(subject):
            return None
        return subject


class VerifierChain:
    def __init__(self, verifiers: Sequence[TokenVerifier]) -> None:
        self.verifiers = list(verifiers)

    def account(self, token: str) -> str | None:
        for verifier in self.verifiers:
            name = verifier.account(token)
            if name is not None:
                return name
        return None
