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

``AccountBook`` keeps the built-in accounts: it issues, rotates, revokes and checks their
tokens (a part of ``VaultService``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from backvault.vault.config import SettingsError
from backvault.vault.outcomes import BadRequest, NoSuchAccount
from backvault.vault.records import RecordStore
from backvault.vault.schema import accounts, records

# \Z, not $: "$" also matches before a final newline, which would make "alice\n" a name.
ACCOUNT_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@+\-]{0,127}\Z")
TOKEN_PREFIX = "bvt_"  # noqa: S105 - a marker, not a secret
# JWT subjects are accounts "jwt:SUBJECT"; built-in names cannot hold ":" (ACCOUNT_NAME).
JWT_NAMESPACE = "jwt:"

# Header fields a vault token may carry. Anything else (jwk, jku, x5u, x5c, crit, b64, …)
# would name another key or change how the token is read: refused, the key is ours.
JWT_HEADER_FIELDS = frozenset({"alg", "typ", "kid"})
JWT_ALGORITHM = "EdDSA"


def check_account_name(name: str) -> str:
    if not ACCOUNT_NAME.match(name):
        raise BadRequest(
            "account names are 1-128 characters: letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    return name


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _expiry(now: float, expires_in: float | None) -> float | None:
    if expires_in is None:
        return None
    if expires_in <= 0:
        raise BadRequest("a token's lifetime must be positive")
    return now + expires_in


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


class AccountBook(RecordStore):
    """The built-in accounts and their tokens (only a token's SHA-256 is kept)."""

    def add_account(self, name: str, expires_in: float | None = None) -> str:
        """Create an account and return its bearer token (shown once; only a hash is kept).
        With ``expires_in`` (seconds) the token stops working that long from now."""
        check_account_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                exists = conn.execute(
                    sa.select(accounts.c.name).where(accounts.c.name == name)
                ).first()
                if exists is not None:
                    raise BadRequest(f"the account {name!r} already exists")
                # A record a JWT subject made before the namespaces were separated (still
                # under the bare name, or moved but answering under its OPRF key): a new
                # built-in account must inherit neither the record nor its OPRF key.
                taken = conn.execute(
                    sa.select(records.c.account).where(
                        sa.or_(records.c.account == name, records.c.credential_name == name)
                    )
                ).first()
                if taken is not None and taken.account == name:
                    raise BadRequest(
                        f"a record for {name!r} exists that no built-in account owns (made "
                        f"by the JWT subject {name!r} before JWT subjects had their own "
                        f"namespace); run `backvault vault migrate-jwt-records {name}` "
                        "first, or choose another name"
                    )
                if taken is not None:
                    raise BadRequest(
                        f"the name {name!r} is taken by the record of {taken.account!r}, "
                        "moved there from it; choose another name"
                    )
                conn.execute(
                    accounts.insert().values(
                        name=name,
                        token_hash=hash_token(token),
                        created_at=now,
                        token_expires_at=_expiry(now, expires_in),
                    )
                )
        except sa.exc.IntegrityError as exc:
            raise BadRequest(f"the account {name!r} already exists") from exc
        return token

    def rotate_token(self, name: str, expires_in: float | None = None) -> str:
        """Give the account a new token (returned, shown once); the old one stops working
        at once, on every node. Also lifts a revocation."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        with self.engine.begin() as conn:
            changed = conn.execute(
                accounts.update()
                .where(accounts.c.name == name)
                .values(
                    token_hash=hash_token(token),
                    token_expires_at=_expiry(now, expires_in),
                    token_revoked_at=None,
                )
            ).rowcount
            if not changed:
                raise NoSuchAccount(f"there is no built-in account {name!r}")
            self._audit(conn, name, "token_rotated", "operator", None, "a new account token")
        return token

    def revoke_token(self, name: str) -> None:
        """The account's token stops working at once, on every node, until
        ``rotate_token`` gives it a new one. Its record is untouched."""
        now = self.clock()
        with self.engine.begin() as conn:
            changed = conn.execute(
                accounts.update()
                .where(accounts.c.name == name)
                .values(token_revoked_at=sa.func.coalesce(accounts.c.token_revoked_at, now))
            ).rowcount
            if not changed:
                raise NoSuchAccount(f"there is no built-in account {name!r}")
            self._audit(conn, name, "token_revoked", "operator", None, "the account token")

    def account_for_token(self, token: str) -> str | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    accounts.c.name,
                    accounts.c.token_hash,
                    accounts.c.token_expires_at,
                    accounts.c.token_revoked_at,
                ).where(accounts.c.token_hash == digest)
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        if row.token_revoked_at is not None:
            return None
        if row.token_expires_at is not None and self.clock() >= row.token_expires_at:
            return None
        return str(row.name)
