"""Who may call the vault, tried as an attacker would, against real vault processes.

- A JWT works only when it is addressed to this vault (``aud``) by the configured issuer
  (``iss``), is EdDSA-signed by the configured key, and is short-lived (``iat``/``exp``);
  a vault with a JWT key but no audience or issuer refuses to start.
- JWT subjects and built-in account names live in separate namespaces.
- Built-in tokens can be revoked, rotated and made to expire, with immediate effect.
- Databases from before these changes migrate, and records made by JWT subjects before the
  namespaces were separated move to them with one command.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from backvault.opaque import IdentityKSF, OpaqueConfig
from backvault.vaultclient.http import VaultClient, VaultRefused
from tests.servers import VaultNode, free_port, make_node, postgres_cluster

CONFIG = OpaqueConfig(ksf=IdentityKSF())  # the KSF runs on the client only
AUDIENCE = "https://vault-eu-1.example/"  # this vault's public URL
ISSUER = "https://accounts.example"
SIGNING_KEY = Ed25519PrivateKey.generate()
ATTACKER_KEY = Ed25519PrivateKey.generate()
PUBLIC_PEM = SIGNING_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
RAW_PUBLIC_KEY = SIGNING_KEY.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw
)
ABSENT = object()


def wrapping(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda _export_key: secret


def claims(**changes: Any) -> dict[str, Any]:
    """A vault token's claims as the account system should mint them, with changes."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": "dave",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 300,
    }
    for name, value in changes.items():
        if value is ABSENT:
            del payload[name]
        else:
            payload[name] = value
    return payload


def signed(payload: dict[str, Any], key: Any = SIGNING_KEY, **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm="EdDSA", headers=headers or None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A token built by hand, as an attacker would (PyJWT refuses to make these)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def rs256_token() -> str:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims(), rsa_key, algorithm="RS256")


def attacker_jwk() -> dict[str, str]:
    raw = ATTACKER_KEY.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def status_code(node: VaultNode, token: str) -> int:
    response = httpx.get(
        node.url + "/v1/record", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    return response.status_code


def admin(node: VaultNode, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `backvault vault COMMAND` against the node's database, as its operator would."""
    return subprocess.run(
        node.command(command, *node.args, *args),
        env=node.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class JwtVault:
    node: VaultNode
    db: Path

    def sql(self, statement: str, *params: Any) -> list[Any]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(statement, params).fetchall()


def jwt_env(key_file: Path, **changes: str | None) -> dict[str, str]:
    env: dict[str, str | None] = {
        "BACKVAULT_SERVER_JWT_PUBLIC_KEY_FILE": str(key_file),
        "BACKVAULT_SERVER_JWT_AUDIENCE": AUDIENCE,
        "BACKVAULT_SERVER_JWT_ISSUER": ISSUER,
        **{f"BACKVAULT_SERVER_{name.upper()}": value for name, value in changes.items()},
    }
    return {name: value for name, value in env.items() if value is not None}


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtVault]:
    """One node accepting both JWTs from the account system and built-in tokens."""
    tmp = tmp_path_factory.mktemp("jwt-vault")
    (tmp / "accounts.pub.pem").write_bytes(PUBLIC_PEM)
    db = tmp / "vault.db"
    node = make_node(tmp / "node", f"sqlite:///{db}", env=jwt_env(tmp / "accounts.pub.pem"))
    node.start()
    yield JwtVault(node, db)
    assert node.stop() == 0


# --- JWTs meant for something else ------------------------------------------------------

BAD_TOKENS: dict[str, Callable[[], str]] = {
    "the chat web session's audience": lambda: signed(claims(aud="https://chat.example/web")),
    "another vault's audience": lambda: signed(claims(aud="https://vault-us-1.example/")),
    "several audiences, this vault among them": lambda: signed(
        claims(aud=[AUDIENCE, "https://chat.example/web"])
    ),
    "no aud": lambda: signed(claims(aud=ABSENT)),
    "another issuer": lambda: signed(claims(iss="https://other-accounts.example")),
    "no iss": lambda: signed(claims(iss=ABSENT)),
    "alg none": lambda: forged({"alg": "none", "typ": "JWT"}, claims(), lambda _: b""),
    "HS256 keyed with the public key's PEM": lambda: forged(
        {"alg": "HS256", "typ": "JWT"},
        claims(),
        lambda data: hmac.new(PUBLIC_PEM, data, hashlib.sha256).digest(),
    ),
    "HS256 keyed with the raw public key": lambda: forged(
        {"alg": "HS256", "typ": "JWT"},
        claims(),
        lambda data: hmac.new(RAW_PUBLIC_KEY, data, hashlib.sha256).digest(),
    ),
    "RS256": rs256_token,
    "EdDSA by another key carried in a jwk header": lambda: signed(
        claims(), ATTACKER_KEY, jwk=attacker_jwk()
    ),
    "EdDSA by another key named by kid and jku": lambda: signed(
        claims(), ATTACKER_KEY, kid="accounts-2", jku="https://attacker.example/jwks.json"
    ),
    "missing iat": lambda: signed(claims(iat=ABSENT)),
    "missing exp": lambda: signed(claims(exp=ABSENT)),
    "iat as a string": lambda: signed(claims(iat=str(int(time.time())))),
    "lifetime over the 1 h limit": lambda: signed(
        claims(iat=int(time.time()) - 10, exp=int(time.time()) + 3600)
    ),
    "expired": lambda: signed(claims(iat=int(time.time()) - 600, exp=int(time.time()) - 120)),
    "iat in the future": lambda: signed(
        claims(iat=int(time.time()) + 600, exp=int(time.time()) + 900)
    ),
    "nbf in the future": lambda: signed(claims(nbf=int(time.time()) + 600)),
    "sub in the JWT namespace's own syntax": lambda: signed(claims(sub="jwt:dave")),
}


@pytest.mark.parametrize("make_token", BAD_TOKENS.values(), ids=list(BAD_TOKENS))
def test_a_token_meant_for_something_else_is_refused(
    vault: JwtVault, make_token: Callable[[], str]
) -> None:
    response = httpx.get(
        vault.node.url + "/v1/record",
        headers={"Authorization": f"Bearer {make_token()}"},
        timeout=10,
    )
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized"


def test_a_token_minted_for_this_vault_works(vault: JwtVault) -> None:
    now = int(time.time())
    for good in (
        signed(claims()),
        signed(claims(aud=[AUDIENCE])),
        signed(claims(iat=now - 60, exp=now + 3540)),  # exactly the longest lifetime
        signed(claims(nbf=now - 5)),
        signed(claims(), typ="JWT", kid="accounts-1"),
    ):
        assert status_code(vault.node, good) == 200, good
    with VaultClient(vault.node.url, signed(claims()), CONFIG) as dave:
        dave.register(b"dave's password", wrapping(b"D" * 32))
        assert dave.login(b"dave's password").wrapped_secret == b"D" * 32


def run_serve(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "backvault.cli",
            "vault",
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--data-dir",
            str(tmp / "data"),
        ],
        env={**os.environ, "HOME": str(tmp), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"jwt_audience": None}, "jwt_audience"),
        ({"jwt_issuer": None}, "jwt_issuer"),
        ({"jwt_audience": None, "jwt_issuer": None}, "jwt_audience"),
        ({"jwt_max_lifetime": "0"}, "jwt_max_lifetime"),
    ],
    ids=["no audience", "no issuer", "neither", "no lifetime"],
)
def test_a_jwt_key_without_audience_and_issuer_refuses_to_start(
    tmp_path: Path, changes: dict[str, str | None], complaint: str
) -> None:
    (tmp_path / "accounts.pub.pem").write_bytes(PUBLIC_PEM)
    proc = run_serve(tmp_path, jwt_env(tmp_path / "accounts.pub.pem", **changes))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backvault: vault settings: "), lines
    assert complaint in lines[0]
    assert not (tmp_path / "data").exists(), "nothing is created before the settings are good"


def test_a_jwt_key_that_is_not_ed25519_refuses_to_start(tmp_path: Path) -> None:
    rsa_public = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for name, content in (("rsa.pem", rsa_public), ("garbage.pem", b"not a key\n")):
        (tmp_path / name).write_bytes(content)
        proc = run_serve(tmp_path, jwt_env(tmp_path / name))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Ed25519" in lines[0] and name in lines[0], lines
    proc = run_serve(tmp_path, jwt_env(tmp_path / "missing.pem"))
    assert proc.returncode == 2 and "missing.pem" in proc.stderr, proc.stderr


# --- separate namespaces ------------------------------------------------------------------


def test_a_jwt_subject_never_reaches_the_builtin_account_of_the_same_name(
    vault: JwtVault,
) -> None:
    builtin_token = vault.node.add_account("alice")
    jwt_token = signed(claims(sub="alice"))
    with (
        VaultClient(vault.node.url, builtin_token, CONFIG) as owner,
        VaultClient(vault.node.url, jwt_token, CONFIG) as namesake,
    ):
        owner.register(b"the owner's password", wrapping(b"B" * 32))
        assert namesake.status()["exists"] is False
        # The namesake's guess, even the right one, never touches the owner's record.
        with pytest.raises(VaultRefused) as refused:
            namesake.login(b"the owner's password")
        assert refused.value.status == 403 and refused.value.attempts_left is None
        assert owner.status()["attempts_used"] == 0
        assert [e["event"] for e in owner.audit()] == ["registration_started", "registered"]
        namesake.register(b"the namesake's password", wrapping(b"J" * 32))
        assert owner.login(b"the owner's password").wrapped_secret == b"B" * 32
        assert namesake.login(b"the namesake's password").wrapped_secret == b"J" * 32
        namesake.delete_record()
        assert owner.status()["exists"] is True
    assert vault.sql("SELECT account FROM records WHERE account LIKE '%alice'") == [("alice",)]


def test_records_made_by_jwt_subjects_before_the_upgrade_move_with_one_command(
    vault: JwtVault,
) -> None:
    # Before namespaces were separated, a JWT subject's record was keyed by the bare
    # subject, with no built-in account of that name: make one exactly so.
    made_then = vault.node.add_account("erin")
    with VaultClient(vault.node.url, made_then, CONFIG) as then:
        then.register(b"erin's password", wrapping(b"E" * 32))
        with pytest.raises(VaultRefused):
            then.login(b"a wrong guess")
    vault.sql("DELETE FROM accounts WHERE name = 'erin'")
    # A built-in account's record is not the JWT namespace's and must stay.
    frank = vault.node.add_account("frank")
    with VaultClient(vault.node.url, frank, CONFIG) as builtin:
        builtin.register(b"frank's password", wrapping(b"F" * 32))

    erin = signed(claims(sub="erin"))
    with VaultClient(vault.node.url, erin, CONFIG) as now:
        assert now.status()["exists"] is False
    # Nobody may take the orphaned record by creating a built-in account of its name.
    taken = admin(vault.node, "add-account", "erin")
    assert taken.returncode == 1 and "migrate-jwt-records" in taken.stderr, taken.stderr

    moved = admin(vault.node, "migrate-jwt-records")
    assert moved.returncode == 0, moved.stderr
    assert "erin" in moved.stdout and "frank" not in moved.stdout
    with VaultClient(vault.node.url, erin, CONFIG) as now:
        assert now.status()["attempts_used"] == 1  # the count moved with the record
        assert now.login(b"erin's password").wrapped_secret == b"E" * 32
        events = [e["event"] for e in now.audit()]
        assert events[:2] == ["registration_started", "registered"]
        assert "record_moved" in events
    with VaultClient(vault.node.url, frank, CONFIG) as builtin:
        assert builtin.login(b"frank's password").wrapped_secret == b"F" * 32

    # A record made before per-registration credential identifiers answers under the bare
    # name's OPRF key even after the move: the name stays reserved for every moved record.
    taken = admin(vault.node, "add-account", "erin")
    assert taken.returncode == 1 and "jwt:erin" in taken.stderr, taken.stderr

    again = admin(vault.node, "migrate-jwt-records")
    assert again.returncode == 0 and "no record" in again.stdout, again.stdout
    refused = admin(vault.node, "migrate-jwt-records", "frank")
    assert refused.returncode == 1 and "built-in account" in refused.stderr, refused.stderr


# --- built-in tokens: revoke, rotate, expire ------------------------------------------------


def test_a_revoked_or_rotated_token_stops_working_at_once(vault: JwtVault) -> None:
    token = vault.node.add_account("gina")
    assert status_code(vault.node, token) == 200
    revoked = admin(vault.node, "revoke-token", "gina")
    assert revoked.returncode == 0, revoked.stderr
    assert status_code(vault.node, token) == 401
    rotated = admin(vault.node, "rotate-token", "gina")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("bvt_") and new != token
    assert status_code(vault.node, new) == 200
    assert status_code(vault.node, token) == 401
    newer = admin(vault.node, "rotate-token", "gina").stdout.strip()
    assert status_code(vault.node, newer) == 200
    assert status_code(vault.node, new) == 401
    unknown = admin(vault.node, "revoke-token", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr, unknown.stderr


def test_an_expired_builtin_token_is_refused(vault: JwtVault) -> None:
    made = admin(vault.node, "add-account", "hana", "--expires-in", "90d")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert status_code(vault.node, token) == 200
    ((expires_at,),) = vault.sql("SELECT token_expires_at FROM accounts WHERE name = 'hana'")
    assert 89 * 86400 < expires_at - time.time() <= 90 * 86400
    # Ninety days later (the clock moved on; the running node checks every request):
    vault.sql("UPDATE accounts SET token_expires_at = ? WHERE name = 'hana'", time.time() - 1)
    assert status_code(vault.node, token) == 401
    rotated = admin(vault.node, "rotate-token", "hana", "--expires-in", "12h")
    assert rotated.returncode == 0, rotated.stderr
    assert status_code(vault.node, rotated.stdout.strip()) == 200
    bad = admin(vault.node, "add-account", "iris", "--expires-in", "soon")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--expires-in" in bad.stderr
    assert vault.sql("SELECT name FROM accounts WHERE name = 'iris'") == []


def test_token_expiry_is_checked_against_the_clock(tmp_path: Path) -> None:
    from backvault.vault.sealing import FileSealer
    from backvault.vault.service import VaultService
    from backvault.vault.store import make_engine

    now = [1_000_000.0]
    service = VaultService(
        make_engine(f"sqlite:///{tmp_path / 'v.db'}"),
        FileSealer(tmp_path / "sealing.key"),
        clock=lambda: now[0],
    )
    service.start()
    token = service.add_account("jo", expires_in=3600)
    forever = service.add_account("kim")
    assert service.account_for_token(token) == "jo"
    now[0] += 3599
    assert service.account_for_token(token) == "jo"
    now[0] += 1
    assert service.account_for_token(token) is None
    assert service.account_for_token(forever) == "kim"


# --- migrating databases from before ------------------------------------------------------


def v1_tables() -> sa.MetaData:
    """The schema as version 1 of the vault created it (frozen here: the code moved on)."""
    metadata = sa.MetaData()
    sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))
    sa.Table(
        "vault_keys",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sealed_oprf_seed", sa.LargeBinary, nullable=False),
        sa.Column("sealed_server_private_key", sa.LargeBinary, nullable=False),
        sa.Column("sealed_fake_record_seed", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Table(
        "accounts",
        metadata,
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Table(
        "records",
        metadata,
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("sealed_payload", sa.LargeBinary, nullable=False),
        sa.Column("attempts_used", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    sa.Table(
        "logins",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account", sa.String(128), nullable=False, index=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("sealed_state", sa.LargeBinary, nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )
    sa.Table(
        "audit",
        metadata,
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("account", sa.String(128), nullable=False, index=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("attempts_left", sa.Integer, nullable=True),
        sa.Column("detail", sa.String(200), nullable=False, default=""),
    )
    return metadata


def make_v1_database(url: str, account: str, token: str) -> None:
    from backvault.vault.store import make_engine

    engine = make_engine(url)
    metadata = v1_tables()
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(metadata.tables["schema_version"].insert().values(version=1))
        conn.execute(
            metadata.tables["accounts"]
            .insert()
            .values(
                name=account,
                token_hash=hashlib.sha256(token.encode()).hexdigest(),
                created_at=time.time(),
            )
        )
    engine.dispose()


def test_a_v1_database_with_an_account_works_after_the_upgrade(tmp_path: Path) -> None:
    token = "bvt_made-by-version-1-" + "x" * 20
    db = tmp_path / "v1.db"
    make_v1_database(f"sqlite:///{db}", "lena", token)
    node = make_node(tmp_path / "node", f"sqlite:///{db}").start()
    try:
        with VaultClient(node.url, token, CONFIG) as lena:
            lena.register(b"lena's password", wrapping(b"L" * 32))
            assert lena.login(b"lena's password").wrapped_secret == b"L" * 32
        rotated = admin(node, "rotate-token", "lena")
        assert rotated.returncode == 0, rotated.stderr
        assert status_code(node, token) == 401
        assert status_code(node, rotated.stdout.strip()) == 200
    finally:
        assert node.stop() == 0


def test_a_v1_postgresql_database_takes_the_longest_jwt_subjects(tmp_path: Path) -> None:
    (tmp_path / "accounts.pub.pem").write_bytes(PUBLIC_PEM)
    longest = "s" * 128  # "jwt:" + 128 characters no longer fits version 1's columns
    with postgres_cluster() as pg:
        db = pg.new_database("v1jwt")
        make_v1_database(db, "mia", "bvt_made-by-version-1-" + "y" * 20)
        node = make_node(tmp_path / "node", db, env=jwt_env(tmp_path / "accounts.pub.pem"))
        node.start()
        try:
            with VaultClient(node.url, signed(claims(sub=longest)), CONFIG) as subject:
                subject.register(b"a long subject's password", wrapping(b"M" * 32))
                assert subject.login(b"a long subject's password").wrapped_secret == b"M" * 32
                assert [e["event"] for e in subject.audit()][:3] == [
                    "registration_started",
                    "registered",
                    "login_started",
                ]
        finally:
            assert node.stop() == 0
