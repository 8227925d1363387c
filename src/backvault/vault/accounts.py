"""Who is calling: bearer tokens name an account. Pluggable, with two verifiers built in.

- Built-in tokens (self-hosting): ``backvault vault add-account NAME`` prints a random
  token; the vault keeps only its SHA-256, and can revoke, rotate or expire it.
- Ed25519-signed JWTs from the deployment's account system (how a chat service
  integrates): the vault holds the public key. A token must be addressed to this vault
  (``aud``) by the configured issuer (``iss``), be signed with EdDSA, and be short-lived
  (``iat`` and ``exp``, at most ``max_lifetime`` apart): the account system signs other
  tokens with the same key (a chat web session's), and none of those may open the vault.

The two kinds of account live in separate namespaces: a JWT's subject ``alice`` is the
account ``jwt:alice`` everywhere inside the vault (records, logins, audit, rate limits,
logs), which no built-in account can be, since built-in names cannot hold ``:``.

A token lets its holder *try*: only the password gets a record's secret out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from backvault.vault.config import SettingsError
from backvault.vault.service import ACCOUNT_NAME, JWT_NAMESPACE

# Header fields a vault token may carry. Anything else (jwk, jku, x5u, x5c, crit, b64, …)
# would name another key or change how the token is read: refused, the key is ours.
JWT_HEADER_FIELDS = frozenset({"alg", "typ", "kid"})
JWT_ALGORITHM = "EdDSA"


def jwt_account(subject: str) -> str:
    """The vault's name for a JWT subject's account."""
    return JWT_NAMESPACE + subject


class TokenVerifier(Protocol):
    def account(self, token: str) -> str | None:
        """The account the token names, or None if this verifier does not accept it."""


class BuiltinTokens:
    """Looks every token up in the vault's database (one indexed read), with no cache: a
    revoked, rotated or expired token stops working at once on every node."""

    def __init__(self, lookup: Callable[[str], str | None]) -> None:
        self._lookup = lookup

    def account(self, token: str) -> str | None:
        return self._lookup(token)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Ed25519JwtVerifier:
    def __init__(
        self,
        public_key_pem: bytes,
        audience: str,
        issuer: str,
        max_lifetime: float = 3600.0,
        leeway: float = 30.0,
    ) -> None:
        if not audience or not issuer:
            raise SettingsError("a JWT verifier needs both an audience and an issuer")
        if max_lifetime <= 0:
            raise SettingsError("the longest JWT lifetime must be positive")
        try:
            key = load_pem_public_key(public_key_pem)
        except (ValueError, TypeError) as exc:
            raise SettingsError("the JWT public key is not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SettingsError("the JWT public key must be an Ed25519 key")
        self._key = key
        self._audience = audience
        self._issuer = issuer
        self._max_lifetime = max_lifetime
        self._leeway = leeway

    def account(self, token: str) -> str | None:
        if token.count(".") != 2:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        if header.get("alg") != JWT_ALGORITHM or not set(header) <= JWT_HEADER_FIELDS:
            return None
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[JWT_ALGORITHM],
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": ["sub", "aud", "iss", "iat", "exp"],
                    # Checked below, more strictly than PyJWT does.
                    "verify_aud": False,
                },
            )
        except jwt.PyJWTError:
            return None
        # Exactly this vault: a token addressed to several audiences could be replayed
        # here by any of the others.
        if claims["aud"] not in (self._audience, [self._audience]):
            return None
        issued, expires = claims["iat"], claims["exp"]
        if not (_is_number(issued) and _is_number(expires)):
            return None
        if not 0 < expires - issued <= self._max_lifetime:
            return None
        subject = claims["sub"]
        if not isinstance(subject, str) or not ACCOUNT_NAME.match(subject):
            return None
        return jwt_account(subject)


def jwt_verifier_from_settings(
    public_key_file: str, audience: str, issuer: str, max_lifetime: float
) -> Ed25519JwtVerifier:
    """The JWT verifier, or a SettingsError naming the setting that is missing or wrong."""
    if not audience:
        raise SettingsError(
            "jwt_public_key_file is set but jwt_audience is not: set it to this vault's "
            "own public URL (or an id unique to it), the audience the account system "
            "puts in tokens meant for this vault only"
        )
    if not issuer:
        raise SettingsError(
            "jwt_public_key_file is set but jwt_issuer is not: set it to the account "
            "system's issuer (the iss claim of its tokens)"
        )
    if max_lifetime <= 0:
        raise SettingsError(
            f"jwt_max_lifetime must be a positive number of seconds, not {max_lifetime:g}"
        )
    path = Path(public_key_file)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise SettingsError(
            f"jwt_public_key_file {path}: cannot read it ({exc.strerror or exc}); give "
            "the account system's Ed25519 public key in PEM"
        ) from exc
    try:
        return Ed25519JwtVerifier(pem, audience, issuer, max_lifetime)
    except SettingsError as exc:
        raise SettingsError(
            f"jwt_public_key_file {path}: {exc}; give the account system's Ed25519 public "
            "key in PEM (-----BEGIN PUBLIC KEY-----)"
        ) from exc


class VerifierChain:
    def __init__(self, verifiers: Sequence[TokenVerifier]) -> None:
        self.verifiers = list(verifiers)

    def account(self, token: str) -> str | None:
        for verifier in self.verifiers:
            name = verifier.account(token)
            if name is not None:
                return name
        return None
