"""Attacks on threshold realms (docs/realms.md, "The bound", "Who can do what", "Rollback";
issue 14, tests 2, 4 and 6), each performed against real `backvault vault serve --realm`
processes on SQLite:

- an attacker holding the account's tokens, picking which t realms to ask each round, with
  one realm's database put back from a backup after every round: the wrong guesses it can
  make equal the bound exactly (3 realms, t = 2, G_r = 5: 10), and 7 without the rollback;
- an attacker holding one realm's database file and its sealing key cannot tell the right
  password from a wrong one offline;
- a tag recorded in a successful recovery, replayed after a re-registration, releases
  nothing and forgives nothing;
- with two of three realms down, a recovery stops in phase 1, names both, spends nothing.

A JWT minted for one realm and presented to another is refused: tests/test_realm_server.py
(test_a_realms_jwt_audience_must_be_its_realm_id) and tests/test_realms_client_real.py
(test_the_token_of_one_realm_is_not_accepted_by_another) cover it.

The attackers speak the protocol through RealmClient and backvault.realms.protocol, not
through RealmSet's policy: they choose the realms themselves. Argon2id is the cheap
TestOnlyStretching (the registration used it too, so the attacker's derivations match).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backvault.opaque import group, voprf
from backvault.realms import bounds, protocol, shamir
from backvault.realms.descriptor import SUITE, Descriptor, decode
from backvault.vault.key_versions import DatabaseVersionRecords
from backvault.vault.sealed_columns import realm_share_purpose
from backvault.vault.sealing import FileSealer
from backvault.vault.store import make_engine
from backvault.vaultclient.errors import RealmRefused, RealmsDisagree, RealmWrongPassword
from backvault.vaultclient.realms import RealmClient, RealmSet
from tests.test_realm_server import UNLOCK_WINDOW, Realm, b64, hkdf, lp, mac, start_realm

CHEAP = protocol.TestOnlyStretching()
PASSWORD = b"correct horse battery staple"
THRESHOLD = 2
ALLOWED = 5  # G_r, the default for 3 realms and t = 2
ONE = group.scalar_from_public_int(1)


@pytest.fixture(scope="module")
def realms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Realm]]:
    tmp = tmp_path_factory.mktemp("attacked-realms")
    started: list[Realm] = []
    try:
        for name in ("a", "b", "c"):
            started.append(start_realm(tmp / name))
        yield started
    finally:
        for realm in started:
            realm.node.stop()


@dataclass
class Account:
    name: str
    clients: list[RealmClient]  # one per realm, with this account's token there

    def realm_set(self) -> contextlib.nullcontext[RealmSet]:
        """The client's RealmSet over these clients, left open: the attacker goes on with
        the same clients afterwards."""
        return contextlib.nullcontext(RealmSet(self.clients, self.name, test_stretching=CHEAP))


def new_account(realms: list[Realm]) -> Account:
    """A built-in account of the same name at every realm (its own token at each)."""
    name = "victim-" + secrets.token_hex(4)
    return Account(
        name,
        [
            RealmClient(
                realm.node.url,
                realm.node.add_account(name),
                realm.realm_id,
                timeout=30,
            )
            for realm in realms
        ],
    )


def counts(realms: list[Realm], account: str) -> list[int]:
    """Each realm's attempt counter, read from its database (not from its answers)."""
    found = []
    for realm in realms:
        row = realm.row(account)
        found.append(-1 if row is None else int(row["attempts"]))
    return found


def attempt_rows(realms: list[Realm], account: str) -> list[list[tuple[str, bool]]]:
    return [[(r["id"], bool(r["forgiven"])) for r in realm.attempts(account)] for realm in realms]


def wait_for_tombstones(realms: list[Realm], account: str) -> None:
    """Until every realm that spent its evaluations has swept them (its unlock window over)."""
    deadline = time.time() + UNLOCK_WINDOW + 30
    while time.time() < deadline:
        rows = [realm.row(account) for realm in realms]
        if all(row is not None and row["state"] == "erased" for row in rows):
            return
        time.sleep(0.2)
    raise AssertionError(f"not all realms erased the registration: {rows}")


# --- 1. rollback ---------------------------------------------------------------------------


class SqliteBackup:
    """A realm operator's backup of its database: taken with the realm stopped (a cold
    copy of the SQLite file and any WAL), put back the same way, as a restore does."""

    def __init__(self, realm: Realm, where: Path) -> None:
        assert realm.db is not None
        self.realm = realm
        self.db: Path = realm.db
        self.where = where
        where.mkdir(parents=True)
        self._cold(lambda: self._copy(self.db.parent, self.where))

    def _files(self, folder: Path) -> list[Path]:
        return [folder / (self.db.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]

    def _copy(self, source: Path, target: Path) -> None:
        for path in self._files(target):
            path.unlink(missing_ok=True)
        for path in self._files(source):
            if path.exists():
                shutil.copy2(path, target / path.name)

    def _cold(self, action: Any) -> None:
        assert self.realm.node.stop() == 0
        action()
        self.realm.node.start()

    def restore(self) -> None:
        self._cold(lambda: self._copy(self.where, self.db.parent))


@dataclass
class Round:
    valid: int  # evaluations that verified against pk_j
    refused: dict[str, str]  # realm URL -> error code


def attacker_round(clients: list[RealmClient], d: Descriptor, guess: bytes) -> Round:
    """One wrong guess by an attacker with the tokens: phase 1 at every realm (uncounted),
    then the same blinded element to the realms with the most attempts left, one after
    another — all of them if need be — until t have evaluated. Not the client's code: the
    attacker decides whom to ask."""
    left = {c.url: c.registration().attempts_left for c in clients}
    order = sorted(clients, key=lambda c: -left[c.url])
    recovery = protocol.begin_recovery(guess, d, test_stretching=CHEAP)
    good: dict[int, bytes] = {}
    refused: dict[str, str] = {}
    for client in order:
        if len(good) == d.threshold:
            break
        try:
            answer = client.evaluate(d.version, recovery.blinded_element)
        except RealmRefused as exc:
            refused[client.url] = exc.code
            continue
        protocol.check_evaluation(
            d, client.pinned_id, recovery.blinded_element, answer.evaluated_element, answer.proof
        )
        good[d.entry(client.pinned_id).index] = answer.evaluated_element
    if len(good) == d.threshold:
        assert protocol.unlock_key(recovery, good) is None  # a wrong guess, told apart
    return Round(len(good), refused)


def guess_until_refused(
    account: Account, d: Descriptor, after_each_round: Any = None
) -> tuple[int, Round]:
    """Wrong guesses until a round gets fewer than t valid evaluations: (the guesses made,
    that last round)."""
    for made in range(101):
        outcome = attacker_round(account.clients, d, b"wrong guess %d" % made)
        if after_each_round is not None:
            after_each_round()
        if outcome.valid < d.threshold:
            return made, outcome
    raise AssertionError("more than 100 guesses: no bound at all")


def assert_the_secret_is_gone(realms: list[Realm], account: Account, d: Descriptor) -> None:
    """After the bound: once the unlock windows are over, n - t + 1 realms hold a tombstone,
    so the registration is erased (docs/realms.md, "The bound"), the owner's own client
    stops in phase 1, and the true password gets fewer than t evaluations."""
    spent = [
        r
        for r, c in zip(realms, account.clients, strict=True)
        if c.registration().attempts_left == 0
    ]
    wait_for_tombstones(spent, account.name)
    with account.realm_set() as rs:
        assert rs.erased(d.threshold)
        with pytest.raises(RealmsDisagree, match="nothing was attempted"):
            rs.recover(PASSWORD)
    true_guess = attacker_round(account.clients, d, PASSWORD)
    assert true_guess.valid < d.threshold
    assert set(true_guess.refused.values()) == {"no_attempts_left"}


def test_rollback_of_one_realm_after_every_round_gives_exactly_the_bound(tmp_path: Path) -> None:
    """Issue 14, test 4: 3 realms, t = 2, G_r = 5, realm a's database put back from a backup
    (taken right after registration) after every round. The attacker always has a at full
    count, so each guess costs one attempt at b or c: 5 + 5 = 10 guesses, the bound's
    "1 realm rolled back" column — and not one more."""
    realms = [start_realm(tmp_path / name) for name in ("a", "b", "c")]
    try:
        account = new_account(realms)
        with account.realm_set() as rs:
            secret = secrets.token_bytes(32)
            d = rs.register(PASSWORD, secret, THRESHOLD, allowed_guesses=ALLOWED).descriptor
        assert d.allowed_guesses == bounds.default_allowed_guesses(THRESHOLD, 3) == ALLOWED
        rolled_back = realms[0]
        backup = SqliteBackup(rolled_back, tmp_path / "backup-of-a")

        made, last = guess_until_refused(account, d, after_each_round=backup.restore)

        assert made == bounds.guesses_left([None, ALLOWED, ALLOWED], THRESHOLD) == 10
        # The last round: a evaluated (and was rolled back), b and c refused.
        assert last.valid == 1
        assert last.refused == {
            realms[1].node.url: "no_attempts_left",
            realms[2].node.url: "no_attempts_left",
        }
        assert counts(realms[1:], account.name) == [ALLOWED, ALLOWED]
        # b and c each served G_r evaluations, durably counted, and not one more.
        assert [len(realm.attempts(account.name)) for realm in realms[1:]] == [ALLOWED] * 2
        assert counts(realms[:1], account.name) == [0]  # the rollback hides a's share
        for realm in realms[1:]:
            row = realm.row(account.name)
            assert row is not None and row["sealed_key_share"] is None  # erased at once
        assert_the_secret_is_gone(realms, account, d)
        # The rolled-back realm still evaluates (it holds its key share): the true
        # password's round just now cost one attempt there, and got nothing from it alone.
        assert counts(realms[:1], account.name) == [1]
    finally:
        for realm in realms:
            realm.node.stop()


def test_without_rollback_the_attacker_gets_the_owners_bound(realms: list[Realm]) -> None:
    """The same attacker, no realm rolled back: ⌊3·5 / 2⌋ = 7 guesses."""
    account = new_account(realms)
    with account.realm_set() as rs:
        d = rs.register(PASSWORD, secrets.token_bytes(32), THRESHOLD, allowed_guesses=ALLOWED)
    d = d.descriptor
    made, last = guess_until_refused(account, d)
    assert made == bounds.guesses_left([ALLOWED] * 3, THRESHOLD) == 7
    # 14 attempts in 7 rounds; the 8th round spent the 15th at the one realm that had one
    # left, and the two others refused.
    assert last.valid == 1
    assert sorted(last.refused.values()) == ["no_attempts_left", "no_attempts_left"]
    assert counts(realms, account.name) == [ALLOWED] * 3
    assert_the_secret_is_gone(realms, account, d)


# --- 2. one realm's database and sealing key -----------------------------------------------


@dataclass
class StolenRealm:
    """What a thief of one realm's SQLite file and sealing-key file holds, unsealed with the
    project's own sealing code (as the vault itself would)."""

    realm_id: bytes
    descriptor: Descriptor
    key_share: bytes  # k_j
    encryption_share: bytes  # e_j
    tag_hash: bytes
    share_mac: bytes
    ciphertext: bytes

    @property
    def index(self) -> int:
        return self.descriptor.entry(self.realm_id).index


def steal(realm: Realm, account: str, where: Path) -> StolenRealm:
    assert realm.db is not None
    where.mkdir(parents=True)
    copy = where / "stolen.db"
    with sqlite3.connect(realm.db) as live, sqlite3.connect(copy) as target:
        live.backup(target)  # a consistent copy of the live database
    key_file = realm.db.parent / "keys" / "sealing.key"
    engine = make_engine(f"sqlite:///{copy}")
    try:
        sealer = FileSealer(key_file, create=False, records=DatabaseVersionRecords(engine))
        with engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT * FROM realm_registrations WHERE account = ?", (account,)
            ).one()
        descriptor = decode(bytes(row.descriptor))
        stolen = StolenRealm(
            realm.realm_id,
            descriptor,
            sealer.open(
                bytes(row.sealed_key_share),
                realm_share_purpose("key_share", account, row.version),
            ),
            sealer.open(
                bytes(row.sealed_encryption_share),
                realm_share_purpose("encryption_share", account, row.version),
            ),
            bytes(row.tag_hash),
            bytes(row.share_mac),
            bytes(row.ciphertext),
        )
        sealer.close()
        return stolen
    finally:
        engine.dispose()


def unlock_derivations(oprf_output: bytes, version: bytes) -> tuple[bytes, bytes]:
    derived = hkdf(oprf_output, version, b"backvault-realms-v1 unlock" + lp(SUITE), 64)
    return derived[:32], derived[32:]


def opens(ciphertext: bytes, key_material: bytes, d: Descriptor) -> bool:
    key = hkdf(key_material, d.version, b"backvault-realms-v1 encryption" + lp(SUITE), 32)
    try:
        AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], d.hash)
    except InvalidTag:
        return False
    return True


def offline_checks(stolen: StolenRealm, password: bytes) -> dict[str, bool]:
    """Every test of ``password`` the thief of one realm can run: each check's outcome."""
    d = stolen.descriptor
    access_key, encryption_seed = protocol.stretch(
        password, d.version, d.user_id, test_stretching=CHEAP
    )
    # The realm's evaluation k_j·H(access_key), and the same scaled by the Lagrange
    # coefficient of every quorum the realm is in (as if the other share were zero):
    # candidates for k·H(access_key), hashed as Finalize does into candidates for U.
    partners = [e.index for e in d.realms if e.index != stolen.index]
    scalings = {"k_j": stolen.key_share}
    for others in itertools.combinations(partners, d.threshold - 1):
        weight = shamir.lagrange_at_zero([stolen.index, *others])[stolen.index]
        scalings[f"λ{others}·k_j"] = group.scalar_mul(weight, stolen.key_share)
    checks: dict[str, bool] = {}
    for name, scalar in scalings.items():
        commitment, unlock_key = unlock_derivations(voprf.evaluate(scalar, access_key), d.version)
        checks[f"commitment from {name}"] = hmac.compare_digest(commitment, d.commitment)
        tag = mac(unlock_key, b"backvault-realms-v1 tag", d.version, stolen.realm_id)
        checks[f"tag_hash from {name}"] = hmac.compare_digest(
            hashlib.sha256(tag).digest(), stolen.tag_hash
        )
        share_mac = mac(
            unlock_key,
            b"backvault-realms-v1 share",
            d.version,
            stolen.realm_id,
            bytes([stolen.index]),
            stolen.encryption_share,
            stolen.ciphertext,
        )
        checks[f"share_mac from {name}"] = hmac.compare_digest(share_mac, stolen.share_mac)
    # The ciphertext, under keys from the password's seed alone, and with e_j (and each
    # Lagrange-weighted e_j) in place of e.
    checks["AEAD with encryption_seed"] = opens(stolen.ciphertext, encryption_seed, d)
    checks["AEAD with encryption_seed ‖ e_j"] = opens(
        stolen.ciphertext, encryption_seed + stolen.encryption_share, d
    )
    for others in itertools.combinations(partners, d.threshold - 1):
        weight = shamir.lagrange_at_zero([stolen.index, *others])[stolen.index]
        weighted = group.scalar_mul(weight, stolen.encryption_share)
        checks[f"AEAD with encryption_seed ‖ λ{others}·e_j"] = opens(
            stolen.ciphertext, encryption_seed + weighted, d
        )
    return checks


def test_one_realms_database_and_sealing_key_do_not_test_a_guess(
    realms: list[Realm], tmp_path: Path
) -> None:
    """Issue 14, test 6 (first half). The thief of realm a's SQLite file AND its sealing key
    unseals k_a and e_a with the vault's own sealing code, and runs every check it can on
    the right password and on a wrong one: the commitment, the tag hash, the share MAC
    (with unlock keys from k_a·H(access_key), plain and Lagrange-weighted) and the AEAD
    (keys from encryption_seed alone, and with e_a or λ·e_a). Every check fails, for the
    right password exactly as for the wrong one: the material does not tell them apart.

    Why that is no accident: k and e are Shamir-shared with degree t - 1 = 1. For any k,
    f(x) = k + a·x with a uniformly random passes through (x_a, k_a) for exactly one a, so
    one share is uniform and independent of k (and of e): every value the thief derives
    from k_a or e_a — k_a·H(access_key) included — is distributed the same whatever the
    password is. Every password-dependent comparison available (commitment, tag_hash,
    share_mac, the AEAD tag) goes through U = k·H(access_key) or through e, i.e. needs t
    shares. This test demonstrates that on real data; it is not a proof.

    The control: with realm b's database and key as well (t = 2 realms), the same thief
    does tell the right password from the wrong one — so the checks above are real ones."""
    account = new_account(realms)
    secret = secrets.token_bytes(32)
    wrong = b"Tr0ub4dor&3"
    with account.realm_set() as rs:
        rs.register(PASSWORD, secret, THRESHOLD, allowed_guesses=ALLOWED)
    stolen = steal(realms[0], account.name, tmp_path / "a")
    d = stolen.descriptor
    # The thief really holds the realm's share: it matches pk_a in D.
    assert shamir.public_share(stolen.key_share) == d.entry(stolen.realm_id).public_share

    right_checks = offline_checks(stolen, PASSWORD)
    wrong_checks = offline_checks(stolen, wrong)
    assert len(right_checks) == 3 * 3 + 4  # k_j and λ_j for the quorums {a,b}, {a,c}; 4 AEADs
    assert right_checks == wrong_checks
    assert not any(right_checks.values()), right_checks

    # Control: two realms' material (a quorum) does distinguish.
    second = steal(realms[1], account.name, tmp_path / "b")
    key_shares = {stolen.index: stolen.key_share, second.index: second.key_share}
    encryption_shares = {
        stolen.index: stolen.encryption_share,
        second.index: second.encryption_share,
    }
    k = shamir.combine_scalars(key_shares)
    e = shamir.combine_scalars(encryption_shares)
    for password, expected in ((PASSWORD, True), (wrong, False)):
        access_key, seed = protocol.stretch(password, d.version, d.user_id, test_stretching=CHEAP)
        commitment, _ = unlock_derivations(voprf.evaluate(k, access_key), d.version)
        assert hmac.compare_digest(commitment, d.commitment) is expected
        assert opens(stolen.ciphertext, seed + e, d) is expected
    # Nothing was evaluated at any realm: all of it happened offline.
    assert counts(realms, account.name) == [0, 0, 0]


# --- 3. a replayed tag ---------------------------------------------------------------------


class RecordingRealmClient(RealmClient):
    """A RealmClient that keeps what it sends in phase 3: what a network observer, a
    realm's log or a compromised device could have kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent_tags: list[tuple[bytes, bytes]] = []  # (version, tag)

    def unlock(self, version: bytes, tag: bytes, attempt_ids: Any) -> Any:
        self.sent_tags.append((version, tag))
        return super().unlock(version, tag, attempt_ids)


def test_a_tag_replayed_after_re_registration_opens_and_forgives_nothing(
    realms: list[Realm],
) -> None:
    """Issue 14, test 6 (second half). Record the tags a successful recovery sends; the
    password changes (a new registration, a new version); the old tags, replayed with the
    old version or the new one, are refused (409 version_mismatch, 403 wrong_tag), release
    no share, and forgive none of the attempts they present."""
    name = "victim-" + secrets.token_hex(4)
    clients = [
        RecordingRealmClient(r.node.url, r.node.add_account(name), r.realm_id, timeout=30)
        for r in realms
    ]
    with RealmSet(clients, name, test_stretching=CHEAP) as rs:
        old_secret, new_secret = secrets.token_bytes(32), secrets.token_bytes(32)
        old = rs.register(PASSWORD, old_secret, THRESHOLD, allowed_guesses=ALLOWED).descriptor
        assert rs.recover(PASSWORD).secret == old_secret
        recorded = {c.url: c.sent_tags[-1] for c in clients}
        assert all(version == old.version for version, _ in recorded.values())

        new_password = b"a new password after a leak"
        new = rs.register(new_password, new_secret, THRESHOLD, allowed_guesses=ALLOWED).descriptor
        assert new.version != old.version
        # Someone (the attacker with the tokens) spends attempts on the new registration.
        made: dict[bytes, list[bytes]] = {}
        with pytest.raises(RealmWrongPassword):
            rs.recover(
                b"attacker's guess",
                on_attempt=lambda realm_id, attempt: made.setdefault(realm_id, []).append(attempt),
            )
        before_counts = counts(realms, name)
        before_rows = attempt_rows(realms, name)
        assert sum(before_counts) == THRESHOLD

        for realm, client in zip(realms, clients, strict=True):
            _, old_tag = recorded[client.url]
            ids = made.get(realm.realm_id, [])
            for version, code, status in (
                (old.version, "version_mismatch", 409),
                (new.version, "wrong_tag", 403),
            ):
                with pytest.raises(RealmRefused) as refused:
                    client.unlock(version, old_tag, ids)
                assert (refused.value.code, refused.value.status) == (code, status)
                # The raw answer, too: an error and nothing else.
                raw = realm.call(
                    "POST",
                    "/unlock",
                    client._http.headers["Authorization"].removeprefix("Bearer "),
                    json={
                        "version": b64(version),
                        "tag": b64(old_tag),
                        "attempt_ids": [b64(i) for i in ids],
                    },
                )
                assert raw.status_code == status
                assert set(raw.json()) <= {"error", "message", "version"}

        assert counts(realms, name) == before_counts  # nothing forgiven
        assert attempt_rows(realms, name) == before_rows
        # The old password is just a wrong guess now; the new one works.
        with pytest.raises(RealmWrongPassword):
            rs.recover(PASSWORD)
        assert rs.recover(new_password).secret == new_secret


# --- 5. two realms down --------------------------------------------------------------------


def test_two_realms_down_stops_before_any_attempt_and_names_both(realms: list[Realm]) -> None:
    """Issue 14, test 2 (second half): with two of three realms down, phase 1 finds fewer
    than t agreeing descriptors; the recovery raises one clear error naming both realms,
    and no realm's counter moves (checked in every realm's database)."""
    account = new_account(realms)
    with account.realm_set() as rs:
        secret = secrets.token_bytes(32)
        rs.register(PASSWORD, secret, THRESHOLD, allowed_guesses=ALLOWED)
        with pytest.raises(RealmWrongPassword):
            rs.recover(b"one wrong guess first, so the counts are not all zero")
        before_counts = counts(realms, account.name)
        before_rows = attempt_rows(realms, account.name)
        assert sorted(before_counts) == [0, 1, 1]

        down = realms[1:]
        for realm in down:
            realm.node.kill()
        try:
            with pytest.raises(RealmsDisagree) as caught:
                rs.recover(PASSWORD)
            message = str(caught.value)
            assert "nothing was attempted" in message and "\n" not in message
            for realm in down:
                assert realm.node.url in message
                assert "cannot reach" in caught.value.problems[realm.node.url]
            # The realm that is up answered phase 1 and nothing more.
            assert counts(realms[:1], account.name) == before_counts[:1]
        finally:
            for realm in down:
                realm.node.start()
        assert counts(realms, account.name) == before_counts
        assert attempt_rows(realms, account.name) == before_rows
        assert rs.recover(PASSWORD).secret == secret  # the realms are back, nothing lost
