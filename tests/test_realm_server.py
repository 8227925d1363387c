"""The realm side of docs/realms.md, against real `backvault vault serve --realm` processes
and their SQLite files (one run on PostgreSQL): registration by compare-and-swap, phase 1,
the counted evaluation (with its DLEQ proof checked against pk_j from the descriptor),
erasure at G_r with the unlock window, the unlock and what it forgives, deletion by
version, accounts kept apart, the realm id and the JWT audience.

The client side here is a small test client that builds the payloads of docs/realms.md
with backvault.realms, opaque.voprf and realms.shamir. It stands in for the password
hash with SHA-512 (Argon2id runs on the client only; a realm never sees its output).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backvault.opaque import group, voprf
from backvault.realms import shamir
from backvault.realms.descriptor import SUITE, Descriptor, RealmEntry
from tests.servers import VaultNode, make_node, postgres_cluster

GENERATOR = group.scalar_mult_base(group.scalar_from_public_int(1))
UNLOCK_WINDOW = 3.0  # seconds: short, so the sweep's tombstone is seen within the test


# --- a test client of docs/realms.md -------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def lp(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA512(), length, salt, info).derive(ikm)


def mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha512).digest()[:32]


@dataclass
class Registration:
    """Everything the client made for one registration (docs/realms.md, "Key derivation")."""

    version: bytes
    descriptor: Descriptor
    access_key: bytes
    encryption_seed: bytes
    commitment: bytes
    unlock_key: bytes
    key_shares: dict[int, bytes]
    encryption_shares: dict[int, bytes]
    ciphertext: bytes
    slot_secret: bytes

    @property
    def encoded(self) -> bytes:
        return self.descriptor.encode()

    def index_of(self, realm_id: bytes) -> int:
        return self.descriptor.entry(realm_id).index

    def tag(self, realm_id: bytes) -> bytes:
        return mac(self.unlock_key, b"backvault-realms-v1 tag", self.version, realm_id)

    def share_mac(self, realm_id: bytes) -> bytes:
        index = self.index_of(realm_id)
        return mac(
            self.unlock_key,
            b"backvault-realms-v1 share",
            self.version,
            realm_id,
            bytes([index]),
            self.encryption_shares[index],
            self.ciphertext,
        )

    def payload(self, realm_id: bytes, expected: bytes | None = None) -> dict[str, Any]:
        index = self.index_of(realm_id)
        return {
            "expected_version": b64(expected) if expected is not None else None,
            "descriptor": b64(self.encoded),
            "key_share": b64(self.key_shares[index]),
            "tag_hash": b64(hashlib.sha256(self.tag(realm_id)).digest()),
            "encryption_share": b64(self.encryption_shares[index]),
            "share_mac": b64(self.share_mac(realm_id)),
            "ciphertext": b64(self.ciphertext),
        }


def password_keys(password: bytes, version: bytes, user_id: str) -> tuple[bytes, bytes]:
    salt = hashlib.sha512(
        b"backvault-realms-v1 salt" + lp(SUITE) + version + lp(user_id.encode())
    ).digest()[:32]
    stretched = hashlib.sha512(password + salt).digest()  # Argon2id's stand-in (see above)
    return stretched[:32], stretched[32:]


def make_registration(
    realm_ids: list[bytes],
    threshold: int,
    allowed: int,
    password: bytes,
    user_id: str = "ana",
    version: bytes | None = None,  # a version of the caller's choosing (an attacker's)
) -> Registration:
    version = secrets.token_bytes(16) if version is None else version
    access_key, encryption_seed = password_keys(password, version, user_id)
    indices = list(range(1, len(realm_ids) + 1))
    root_key = group.random_scalar()
    key_shares = shamir.split(root_key, threshold, indices)
    output = voprf.evaluate(root_key, access_key)
    derived = hkdf(output, version, b"backvault-realms-v1 unlock" + lp(SUITE), 64)
    commitment, unlock_key = derived[:32], derived[32:]
    descriptor = Descriptor(
        version,
        user_id,
        threshold,
        allowed,
        commitment,
        tuple(
            RealmEntry(realm_id, index, shamir.public_share(key_shares[index]))
            for index, realm_id in zip(indices, realm_ids, strict=True)
        ),
    )
    encryption_scalar = group.random_scalar()
    slot_secret = secrets.token_bytes(32)
    key = hkdf(
        encryption_seed + encryption_scalar,
        version,
        b"backvault-realms-v1 encryption" + lp(SUITE),
        32,
    )
    nonce = secrets.token_bytes(12)
    ciphertext = nonce + AESGCM(key).encrypt(nonce, slot_secret, descriptor.hash)
    return Registration(
        version,
        descriptor,
        access_key,
        encryption_seed,
        commitment,
        unlock_key,
        key_shares,
        shamir.split(encryption_scalar, threshold, indices),
        ciphertext,
        slot_secret,
    )


@dataclass
class Realm:
    node: VaultNode
    db: Path | None  # the SQLite file; None on PostgreSQL
    realm_id: bytes = b""

    def call(self, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method,
            self.node.url + "/realm/v1" + path,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            **kwargs,
        )

    def register(
        self, token: str, reg: Registration, expected: bytes | None = None
    ) -> httpx.Response:
        return self.call("POST", "/register", token, json=reg.payload(self.realm_id, expected))

    def registration(self, token: str) -> dict[str, Any]:
        response = self.call("GET", "/registration", token)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def evaluate(self, token: str, version: bytes, blinded: bytes) -> httpx.Response:
        return self.call(
            "POST",
            "/evaluate",
            token,
            json={"version": b64(version), "blinded_element": b64(blinded)},
        )

    def unlock(
        self,
        token: str,
        version: bytes,
        tag: bytes,
        attempt_ids: list[bytes] = [],  # noqa: B006
    ) -> httpx.Response:
        return self.call(
            "POST",
            "/unlock",
            token,
            json={
                "version": b64(version),
                "tag": b64(tag),
                "attempt_ids": [b64(i) for i in attempt_ids],
            },
        )

    def delete(self, token: str, version: bytes) -> httpx.Response:
        return self.call("DELETE", "/registration", token, params={"version": b64(version)})

    def row(self, account: str) -> dict[str, Any] | None:
        assert self.db is not None
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            found = conn.execute(
                "SELECT * FROM realm_registrations WHERE account = ?", (account,)
            ).fetchone()
        return dict(found) if found is not None else None

    def attempts(self, account: str) -> list[dict[str, Any]]:
        assert self.db is not None
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return [
                dict(r)
                for r in conn.execute(
                    "SELECT * FROM realm_attempts WHERE account = ? ORDER BY started_at", (account,)
                )
            ]


def start_realm(tmp: Path, *extra: str, env: dict[str, str] | None = None, db: str = "") -> Realm:
    database = tmp / "realm.db"
    node = make_node(
        tmp,
        db or f"sqlite:///{database}",
        "--sealing-key-file",
        str(tmp / "keys" / "sealing.key"),
        *extra,
        env={
            "BACKVAULT_SERVER_REALM": "true",  # (the --realm flag is serve's only)
            "BACKVAULT_SERVER_REALM_UNLOCK_WINDOW": str(UNLOCK_WINDOW),
            "BACKVAULT_SERVER_SWEEP_EVERY": "0.5",
            "BACKVAULT_SERVER_MAX_ATTEMPTS": "100",
            "BACKVAULT_SERVER_GUESS_CAP": "1000",
            **(env or {}),
        },
    ).start()
    realm = Realm(node, None if db else database)
    info = httpx.get(node.url + "/realm/v1/info", timeout=10).json()
    assert info["suite"] == SUITE.decode() and info["protocol"] == 1
    realm.realm_id = bytes.fromhex(info["realm_id"])
    return realm


@pytest.fixture(scope="module")
def realms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Realm]]:
    """Three independent realms (each its own database and sealing key)."""
    tmp = tmp_path_factory.mktemp("realms")
    started: list[Realm] = []
    try:
        for name in ("a", "b", "c"):
            started.append(start_realm(tmp / name))
        yield started
    finally:
        for realm in started:
            assert realm.node.stop() == 0


@dataclass
class Accounts:
    """One built-in account of the same name at every realm, with its token at each."""

    name: str
    tokens: list[str] = field(default_factory=list)


_counter = iter(range(10**6))


def account(realms: list[Realm]) -> Accounts:
    made = Accounts(f"user{next(_counter)}-{secrets.token_hex(3)}")
    made.tokens = [realm.node.add_account(made.name) for realm in realms]
    return made


def register_everywhere(
    realms: list[Realm], who: Accounts, reg: Registration, expected: bytes | None = None
) -> None:
    for realm, token in zip(realms, who.tokens, strict=True):
        response = realm.register(token, reg, expected)
        assert response.status_code == 200, response.text
        assert unb64(response.json()["version"]) == reg.version


def evaluation_ok(realm: Realm, reg: Registration, blinded: bytes, answer: dict[str, Any]) -> bytes:
    """Z_j after its proof verified against pk_j from the descriptor."""
    evaluated, proof = unb64(answer["evaluated_element"]), unb64(answer["proof"])
    public_share = reg.descriptor.entry(realm.realm_id).public_share
    assert voprf.verify_proof(GENERATOR, public_share, [blinded], [evaluated], proof)
    return evaluated


# --- the tests -----------------------------------------------------------------------------


def test_a_whole_recovery_with_two_of_three_realms(realms: list[Realm]) -> None:
    """Register at three realms (t = 2); phase 1 agrees; phase 2 at two realms gives the
    commitment; phase 3 at all three gives shares whose MACs verify and that decrypt."""
    who = account(realms)
    ids = [r.realm_id for r in realms]
    reg = make_registration(ids, 2, 5, b"correct horse", who.name)
    register_everywhere(realms, who, reg)

    seen = [realm.registration(token) for realm, token in zip(realms, who.tokens, strict=True)]
    assert all(
        s["state"] == "registered" and s["attempts"] == 0 and s["allowed"] == 5 for s in seen
    )
    assert {unb64(s["descriptor"]) for s in seen} == {reg.encoded}

    # Phase 2: the same B to exactly t = 2 realms.
    access_key, _seed = password_keys(b"correct horse", reg.version, who.name)
    blind = group.random_scalar()
    blinded = voprf.blind(access_key, blind)
    evaluations: dict[int, bytes] = {}
    attempt_ids: dict[bytes, list[bytes]] = {r.realm_id: [] for r in realms}
    for realm, token in list(zip(realms, who.tokens, strict=True))[:2]:
        response = realm.evaluate(token, reg.version, blinded)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["attempts_left"] == 4
        evaluations[reg.index_of(realm.realm_id)] = evaluation_ok(realm, reg, blinded, answer)
        attempt_ids[realm.realm_id].append(unb64(answer["attempt_id"]))
    output = voprf.unblind_and_hash(access_key, blind, shamir.combine_elements(evaluations))
    derived = hkdf(output, reg.version, b"backvault-realms-v1 unlock" + lp(SUITE), 64)
    assert hmac.compare_digest(derived[:32], reg.descriptor.commitment)
    unlock_key = derived[32:]

    # Phase 3 at every realm: each forgives its own attempt and answers its share.
    shares: dict[int, bytes] = {}
    for realm, token in zip(realms, who.tokens, strict=True):
        tag = mac(unlock_key, b"backvault-realms-v1 tag", reg.version, realm.realm_id)
        response = realm.unlock(token, reg.version, tag, attempt_ids[realm.realm_id])
        assert response.status_code == 200, response.text
        body = response.json()
        share, ciphertext = unb64(body["encryption_share"]), unb64(body["ciphertext"])
        index = reg.index_of(realm.realm_id)
        expected_mac = mac(
            unlock_key,
            b"backvault-realms-v1 share",
            reg.version,
            realm.realm_id,
            bytes([index]),
            share,
            ciphertext,
        )
        assert hmac.compare_digest(unb64(body["share_mac"]), expected_mac)
        shares[index] = share
        assert realm.registration(token)["attempts"] == 0  # forgiven
    encryption_scalar = shamir.combine_scalars({i: shares[i] for i in (1, 3)})
    key = hkdf(
        reg.encryption_seed + encryption_scalar,
        reg.version,
        b"backvault-realms-v1 encryption" + lp(SUITE),
        32,
    )
    nonce, sealed = reg.ciphertext[:12], reg.ciphertext[12:]
    assert AESGCM(key).decrypt(nonce, sealed, reg.descriptor.hash) == reg.slot_secret

    # Audited and counted like logins; no secret (nor an attempt id) in any log line.
    for realm in realms:
        metrics = httpx.get(realm.node.url + "/metrics", timeout=10).text
        assert 'backvault_vault_audit_events_total{event="realm_unlocked"}' in metrics
        log = realm.node.log.read_text()
        index = reg.index_of(realm.realm_id)
        for secret in (
            reg.key_shares[index],
            reg.encryption_shares[index],
            reg.tag(realm.realm_id),
            reg.ciphertext,
            *attempt_ids[realm.realm_id],
        ):
            assert b64(secret) not in log and secret.hex() not in log


def test_registration_is_compare_and_swap_and_replaces_the_key_share(realms: list[Realm]) -> None:
    realm = realms[0]
    who = account([realm])
    token = who.tokens[0]
    ids = [r.realm_id for r in realms]
    first = make_registration(ids, 2, 5, b"one", who.name)
    second = make_registration(ids, 2, 5, b"two", who.name)

    assert realm.register(token, first).status_code == 200
    # A client that believes nothing (or something else) is held is refused, told what is.
    for expected in (None, second.version):
        refused = realm.register(token, second, expected)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "version_mismatch"
        assert unb64(refused.json()["version"]) == first.version
    old = realm.row(who.name)
    assert old is not None and old["sealed_key_share"] is not None

    assert realm.register(token, second, first.version).status_code == 200
    new = realm.row(who.name)
    assert new is not None and new["version"] == second.version.hex()
    assert new["sealed_key_share"] != old["sealed_key_share"] and new["attempts"] == 0
    # The old registration is gone at once: it cannot be evaluated, unlocked or deleted.
    blinded = voprf.blind(b"x", group.random_scalar())
    stale = realm.evaluate(token, first.version, blinded)
    assert stale.status_code == 409 and unb64(stale.json()["version"]) == second.version
    assert realm.unlock(token, first.version, first.tag(realm.realm_id)).status_code == 409
    assert realm.delete(token, first.version).status_code == 409
    assert realm.registration(token)["state"] == "registered"
    # Neither share is stored in clear (they are sealed; the database holds no copy).
    assert realm.db is not None
    stored = realm.db.read_bytes()
    index = second.index_of(realm.realm_id)
    for secret in (second.key_shares[index], second.encryption_shares[index]):
        assert secret not in stored
    for secret in (first.key_shares[index], old["sealed_key_share"]):
        assert secret not in stored


def test_registrations_that_break_the_rules_are_refused(realms: list[Realm]) -> None:
    realm = realms[0]
    who = account([realm])
    token = who.tokens[0]
    others = [secrets.token_bytes(16) for _ in range(3)]
    # Not naming this realm.
    elsewhere = make_registration(others, 2, 5, b"pw", who.name)
    refused = realm.call("POST", "/register", token, json=elsewhere.payload(others[0]))
    assert refused.status_code == 400 and "not one of its realms" in refused.json()["message"]
    # A key share that is not the descriptor's pk at this realm's index.
    reg = make_registration([realm.realm_id, *others[:2]], 2, 5, b"pw", who.name)
    payload = reg.payload(realm.realm_id)
    payload["key_share"] = b64(reg.key_shares[2])
    refused = realm.call("POST", "/register", token, json=payload)
    assert refused.status_code == 400 and "index 1" in refused.json()["message"]
    # A descriptor that does not decode; more guesses than the realm allows.
    payload = reg.payload(realm.realm_id)
    payload["descriptor"] = b64(reg.encoded + b"\x00")
    assert realm.call("POST", "/register", token, json=payload).status_code == 400
    greedy = make_registration([realm.realm_id, *others[:2]], 2, 101, b"pw", who.name)
    refused = realm.register(token, greedy)
    assert refused.status_code == 400 and "at most 100" in refused.json()["message"]
    assert realm.registration(token) == {
        "state": "none",
        "descriptor": None,
        "attempts": 0,
        "allowed": 0,
    }


def test_evaluations_are_counted_and_phase_1_is_not(realms: list[Realm]) -> None:
    realm = realms[1]
    who = account([realm])
    token = who.tokens[0]
    reg = make_registration([r.realm_id for r in realms], 2, 5, b"pw", who.name)
    assert realm.register(token, reg).status_code == 200
    for _ in range(3):
        assert realm.registration(token)["attempts"] == 0
    blinded = voprf.blind(b"a guess", group.random_scalar())
    for used in (1, 2):
        response = realm.evaluate(token, reg.version, blinded)
        assert response.status_code == 200, response.text
        assert response.json()["attempts_left"] == 5 - used
        evaluation_ok(realm, reg, blinded, response.json())
        assert realm.registration(token)["attempts"] == used
    rows = realm.attempts(who.name)
    assert len(rows) == 2 and all(not r["forgiven"] for r in rows)
    # A malformed blinded element counts nothing.
    bad = realm.call(
        "POST",
        "/evaluate",
        token,
        json={"version": b64(reg.version), "blinded_element": b64(bytes(32))},
    )
    assert bad.status_code == 400 and realm.registration(token)["attempts"] == 2


def test_64_concurrent_evaluations_never_exceed_the_allowed_count(realms: list[Realm]) -> None:
    concurrent_evaluations(realms[2], allowed=40)


def concurrent_evaluations(realm: Realm, allowed: int) -> None:
    who = account([realm])
    token = who.tokens[0]
    reg = make_registration([realm.realm_id, secrets.token_bytes(16)], 2, allowed, b"pw", who.name)
    assert realm.register(token, reg).status_code == 200
    blinded = voprf.blind(b"a guess", group.random_scalar())
    go = threading.Barrier(64)

    def one(_: int) -> httpx.Response:
        go.wait()
        return realm.evaluate(token, reg.version, blinded)

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(one, range(64)))
    succeeded = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(succeeded) == allowed
    assert all(a.status_code == 403 and a.json()["error"] == "no_attempts_left" for a in refused)
    for answer in succeeded:
        evaluation_ok(realm, reg, blinded, answer.json())
    assert sorted(a.json()["attempts_left"] for a in succeeded) == list(range(allowed))
    assert len({a.json()["attempt_id"] for a in succeeded}) == allowed
    state = realm.registration(token)
    assert state["attempts"] == allowed and state["allowed"] == allowed
    if realm.db is not None:
        row = realm.row(who.name)
        assert row is not None and row["sealed_key_share"] is None
        assert len(realm.attempts(who.name)) == allowed


def test_the_last_evaluation_erases_the_key_share_and_the_window_the_rest(
    realms: list[Realm],
) -> None:
    realm = realms[0]
    who = account([realm])
    token = who.tokens[0]
    reg = make_registration([r.realm_id for r in realms], 2, 2, b"pw", who.name)
    assert realm.register(token, reg).status_code == 200
    blinded = voprf.blind(b"a guess", group.random_scalar())
    assert realm.evaluate(token, reg.version, blinded).status_code == 200
    row = realm.row(who.name)
    assert row is not None and row["sealed_key_share"] is not None and row["window_ends_at"] is None
    last = realm.evaluate(token, reg.version, blinded)
    assert last.status_code == 200 and last.json()["attempts_left"] == 0
    evaluation_ok(realm, reg, blinded, last.json())
    # The key share went with the commit of that last count; the rest stays for phase 3.
    row = realm.row(who.name)
    assert row is not None and row["sealed_key_share"] is None and row["state"] == "registered"
    assert row["tag_hash"] and row["sealed_encryption_share"] and row["ciphertext"]
    assert row["window_ends_at"] is not None
    refused = realm.evaluate(token, reg.version, blinded)
    assert refused.status_code == 403 and refused.json()["error"] == "no_attempts_left"
    # A correct last guess can still finish within the window.
    unlocked = realm.unlock(
        token, reg.version, reg.tag(realm.realm_id), [unb64(last.json()["attempt_id"])]
    )
    assert unlocked.status_code == 200, unlocked.text
    assert (
        unb64(unlocked.json()["encryption_share"])
        == reg.encryption_shares[reg.index_of(realm.realm_id)]
    )
    # Then the sweep leaves a tombstone: the version, the counts, no secret.
    deadline = time.time() + UNLOCK_WINDOW + 20
    while time.time() < deadline:
        row = realm.row(who.name)
        assert row is not None
        if row["state"] == "erased":
            break
        time.sleep(0.2)
    assert row["state"] == "erased" and row["version"] == reg.version.hex()
    for column in (
        "descriptor",
        "sealed_key_share",
        "tag_hash",
        "sealed_encryption_share",
        "share_mac",
        "ciphertext",
    ):
        assert row[column] is None, column
    assert realm.registration(token) == {
        "state": "erased",
        "descriptor": None,
        "attempts": 2,
        "allowed": 2,
    }
    gone = realm.unlock(token, reg.version, reg.tag(realm.realm_id))
    assert gone.status_code == 410 and gone.json()["error"] == "registration_erased"
    assert realm.evaluate(token, reg.version, blinded).status_code == 403
    # An erased registration is replaced with expected_version null (or its own version).
    again = make_registration([r.realm_id for r in realms], 2, 2, b"pw", who.name)
    assert realm.register(token, again).status_code == 200


def test_unlock_wants_the_tag_and_forgives_only_presented_ids_of_this_account(
    realms: list[Realm],
) -> None:
    realm = realms[1]
    ana, bea = account([realm]), account([realm])
    ids = [r.realm_id for r in realms]
    ana_reg = make_registration(ids, 2, 10, b"ana's", ana.name)
    bea_reg = make_registration(ids, 2, 10, b"bea's", bea.name)
    assert realm.register(ana.tokens[0], ana_reg).status_code == 200
    assert realm.register(bea.tokens[0], bea_reg).status_code == 200
    blinded = voprf.blind(b"a guess", group.random_scalar())

    def spend(token: str, reg: Registration, count: int) -> list[bytes]:
        made = []
        for _ in range(count):
            response = realm.evaluate(token, reg.version, blinded)
            assert response.status_code == 200, response.text
            made.append(unb64(response.json()["attempt_id"]))
        return made

    owners = spend(ana.tokens[0], ana_reg, 2)  # the owner's own tries
    thiefs = spend(ana.tokens[0], ana_reg, 3)  # a token thief's, whose ids the owner lacks
    beas = spend(bea.tokens[0], bea_reg, 2)

    # A wrong tag: refused, counts nothing, forgives nothing.
    wrong = realm.unlock(ana.tokens[0], ana_reg.version, secrets.token_bytes(32), owners)
    assert wrong.status_code == 403 and wrong.json()["error"] == "wrong_tag"
    assert realm.registration(ana.tokens[0])["attempts"] == 5
    # Bea's tag at ana's registration is just as wrong.
    assert (
        realm.unlock(ana.tokens[0], ana_reg.version, bea_reg.tag(realm.realm_id)).status_code == 403
    )

    # The right tag, presenting the owner's ids, bea's ids and made-up ones: only the
    # owner's are forgiven; the thief's stay counted, and bea's are untouched.
    done = realm.unlock(
        ana.tokens[0],
        ana_reg.version,
        ana_reg.tag(realm.realm_id),
        [*owners, *beas, secrets.token_bytes(16)],
    )
    assert done.status_code == 200, done.text
    assert unb64(done.json()["ciphertext"]) == ana_reg.ciphertext
    assert unb64(done.json()["share_mac"]) == ana_reg.share_mac(realm.realm_id)
    assert realm.registration(ana.tokens[0])["attempts"] == 3
    assert realm.registration(bea.tokens[0])["attempts"] == 2
    forgiven = {r["id"]: bool(r["forgiven"]) for r in realm.attempts(ana.name)}
    assert forgiven == {
        **{hashlib.sha256(i).hexdigest(): True for i in owners},
        **{hashlib.sha256(i).hexdigest(): False for i in thiefs},
    }
    assert not any(r["forgiven"] for r in realm.attempts(bea.name))
    # Presenting them again forgives nothing more.
    again = realm.unlock(ana.tokens[0], ana_reg.version, ana_reg.tag(realm.realm_id), owners)
    assert again.status_code == 200 and realm.registration(ana.tokens[0])["attempts"] == 3


def test_one_accounts_token_cannot_touch_anothers_registration(realms: list[Realm]) -> None:
    realm = realms[2]
    ana, bea = account([realm]), account([realm])
    reg = make_registration([r.realm_id for r in realms], 2, 5, b"pw", ana.name)
    assert realm.register(ana.tokens[0], reg).status_code == 200
    bea_token = bea.tokens[0]
    blinded = voprf.blind(b"a guess", group.random_scalar())
    assert realm.registration(bea_token)["state"] == "none"
    assert realm.evaluate(bea_token, reg.version, blinded).status_code == 409
    assert realm.unlock(bea_token, reg.version, reg.tag(realm.realm_id)).status_code == 409
    assert realm.delete(bea_token, reg.version).status_code == 204  # bea has nothing to delete
    assert realm.register(bea_token, reg, reg.version).status_code == 409
    state = realm.registration(ana.tokens[0])
    assert state["state"] == "registered" and state["attempts"] == 0
    assert realm.call("GET", "/registration", "bvt_not-a-token").status_code == 401
    assert httpx.get(realm.node.url + "/realm/v1/registration", timeout=10).status_code == 401


def test_delete_names_a_version_and_is_idempotent(realms: list[Realm]) -> None:
    realm = realms[0]
    who = account([realm])
    token = who.tokens[0]
    reg = make_registration([r.realm_id for r in realms], 2, 5, b"pw", who.name)
    assert realm.delete(token, reg.version).status_code == 204  # nothing held
    assert realm.register(token, reg).status_code == 200
    other = secrets.token_bytes(16)
    refused = realm.delete(token, other)
    assert refused.status_code == 409 and unb64(refused.json()["version"]) == reg.version
    assert realm.delete(token, reg.version).status_code == 204
    assert realm.row(who.name) is None
    assert realm.registration(token)["state"] == "none"
    assert realm.delete(token, reg.version).status_code == 204
    assert realm.call("DELETE", "/registration", token).status_code == 422  # no version


def test_the_rolling_cap_counts_unforgiven_evaluations_across_registrations(
    tmp_path: Path,
) -> None:
    realm = start_realm(
        tmp_path, env={"BACKVAULT_SERVER_MAX_ATTEMPTS": "5", "BACKVAULT_SERVER_GUESS_CAP": "6"}
    )
    try:
        who = account([realm])
        token = who.tokens[0]
        ids = [realm.realm_id, secrets.token_bytes(16)]
        blinded = voprf.blind(b"a guess", group.random_scalar())
        first = make_registration(ids, 2, 5, b"pw", who.name)
        assert realm.register(token, first).status_code == 200
        for _ in range(4):
            assert realm.evaluate(token, first.version, blinded).status_code == 200
        # Replacing the registration does not reset the cap: 2 more, not 5.
        second = make_registration(ids, 2, 5, b"pw", who.name)
        assert realm.register(token, second, first.version).status_code == 200
        kept = [realm.evaluate(token, second.version, blinded) for _ in range(2)]
        assert all(k.status_code == 200 for k in kept)
        capped = realm.evaluate(token, second.version, blinded)
        assert capped.status_code == 423 and capped.json()["error"] == "guess_cap_reached"
        assert realm.registration(token)["attempts"] == 2
        # Forgiven evaluations leave the cap.
        ids_kept = [unb64(k.json()["attempt_id"]) for k in kept]
        assert (
            realm.unlock(token, second.version, second.tag(realm.realm_id), ids_kept).status_code
            == 200
        )
        assert realm.evaluate(token, second.version, blinded).status_code == 200
    finally:
        assert realm.node.stop() == 0


def test_the_realm_id_is_made_once_and_kept_across_restarts(tmp_path: Path) -> None:
    node = make_node(
        tmp_path, f"sqlite:///{tmp_path / 'realm.db'}", "--sealing-key-file", str(tmp_path / "k")
    )
    # Known before the first start (to set the JWT audience), stable afterwards.
    printed = subprocess.run(
        node.command("realm-id", *node.args),
        env=node.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert len(printed) == 32 and bytes.fromhex(printed).hex() == printed
    node.args.append("--realm")
    for _ in range(2):
        node.start()
        try:
            info = httpx.get(node.url + "/realm/v1/info", timeout=10).json()
            assert info["realm_id"] == printed
        finally:
            assert node.stop() == 0
    # Without realm mode the realm endpoints are not served.
    node.args.remove("--realm")
    node.start()
    try:
        assert httpx.get(node.url + "/realm/v1/info", timeout=10).status_code == 404
    finally:
        assert node.stop() == 0


ISSUER = "https://accounts.example"
SIGNING_KEY = Ed25519PrivateKey.generate()


def signed(subject: str, audience: str) -> str:
    now = int(time.time())
    claims = {"sub": subject, "aud": audience, "iss": ISSUER, "iat": now, "exp": now + 300}
    return jwt.encode(claims, SIGNING_KEY, algorithm="EdDSA")


def test_a_realms_jwt_audience_must_be_its_realm_id(tmp_path: Path) -> None:
    key_file = tmp_path / "accounts.pub.pem"
    key_file.write_bytes(
        SIGNING_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    node = make_node(
        tmp_path,
        f"sqlite:///{tmp_path / 'realm.db'}",
        "--sealing-key-file",
        str(tmp_path / "k"),
        env={
            "BACKVAULT_SERVER_REALM": "true",
            "BACKVAULT_SERVER_JWT_PUBLIC_KEY_FILE": str(key_file),
            "BACKVAULT_SERVER_JWT_ISSUER": ISSUER,
            "BACKVAULT_SERVER_JWT_AUDIENCE": "https://realm-1.example/",
        },
    )
    realm_id = subprocess.run(
        node.command("realm-id", *node.args),
        env=node.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for audience in ("https://realm-1.example/", realm_id.upper()):
        node.env["BACKVAULT_SERVER_JWT_AUDIENCE"] = audience
        refused = subprocess.run(
            node.command("serve", "--listen", f"127.0.0.1:{node.port}", *node.args),
            env=node.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and realm_id in lines[0] and "jwt_audience" in lines[0], (
            refused.stderr
        )
    node.env["BACKVAULT_SERVER_JWT_AUDIENCE"] = realm_id
    node.start()
    try:
        realm = Realm(node, tmp_path / "realm.db", bytes.fromhex(realm_id))
        assert realm.registration(signed("dave", realm_id))["state"] == "none"
        # A token for another realm (which that realm could replay here) is refused.
        elsewhere = secrets.token_hex(16)
        assert realm.call("GET", "/registration", signed("dave", elsewhere)).status_code == 401
    finally:
        assert node.stop() == 0


def test_concurrent_evaluations_on_postgresql(tmp_path: Path) -> None:
    with postgres_cluster() as pg:
        db = pg.new_database("realm")
        realm = start_realm(tmp_path, db=db)
        try:
            concurrent_evaluations(realm, allowed=40)
        finally:
            assert realm.node.stop() == 0


def test_a_sealing_key_rotation_reseals_the_shares(tmp_path: Path) -> None:
    realm = start_realm(tmp_path)
    try:
        who = account([realm])
        token = who.tokens[0]
        reg = make_registration([realm.realm_id, secrets.token_bytes(16)], 2, 5, b"pw", who.name)
        assert realm.register(token, reg).status_code == 200
        before = realm.row(who.name)
        assert before is not None
        rotated = subprocess.run(
            realm.node.command("rotate-sealing-key", *realm.node.args),
            env=realm.node.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rotated.returncode == 0, rotated.stderr
        after = realm.row(who.name)
        assert after is not None
        for column in ("sealed_key_share", "sealed_encryption_share"):
            assert after[column] != before[column]
            assert after[column][:5] == b"\x02" + (2).to_bytes(4, "big"), column
        blinded = voprf.blind(b"a guess", group.random_scalar())
        answer = realm.evaluate(token, reg.version, blinded)
        assert answer.status_code == 200, answer.text
        evaluation_ok(realm, reg, blinded, answer.json())
        unlocked = realm.unlock(token, reg.version, reg.tag(realm.realm_id))
        assert unlocked.status_code == 200, unlocked.text
        index = reg.index_of(realm.realm_id)
        assert unb64(unlocked.json()["encryption_share"]) == reg.encryption_shares[index]
    finally:
        assert realm.node.stop() == 0


def test_schemathesis_finds_no_server_error_at_the_realm_endpoints(realms: list[Realm]) -> None:
    """Property-based requests from the OpenAPI spec, realm endpoints included. As for
    /v1 (tests/test_vault.py), every check but `positive_data_acceptance`: a schema-valid
    base64 string is rarely a valid descriptor, scalar or group element."""
    import sys

    realm = realms[0]
    token = account([realm]).tokens[0]
    schemathesis = Path(sys.executable).parent / "schemathesis"
    proc = subprocess.run(
        [
            str(schemathesis),
            "run",
            realm.node.url + "/openapi.json",
            "-H",
            f"Authorization: Bearer {token}",
            "--include-path-regex",
            "^/realm/",
            "-n",
            "40",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--seed",
            "20261201",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "passed" in proc.stdout
    assert "server error" not in proc.stdout.lower()
    assert "/realm/v1/evaluate" in proc.stdout and "/v1/login" not in proc.stdout


def test_realm_settings_from_toml_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backvault.vault.config import SettingsError, load_settings

    config = tmp_path / "vault.toml"
    config.write_text("[vault]\nrealm = true\nrealm-unlock-window = 30\n")
    loaded = load_settings(str(config))
    assert loaded.realm is True and loaded.realm_unlock_window == 30.0
    assert load_settings().realm is False and load_settings().realm_unlock_window == 60.0
    monkeypatch.setenv("BACKVAULT_SERVER_REALM", "true")
    assert load_settings().realm is True
    monkeypatch.setenv("BACKVAULT_SERVER_REALM_UNLOCK_WINDOW", "0")
    with pytest.raises(SettingsError, match="realm_unlock_window"):
        load_settings()
