"""The realm client (backvault.vaultclient.realms) against real `backvault vault serve
--realm` processes on loopback, each with its own SQLite database and sealing key: the whole
path of docs/realms.md as the client runs it — pinning, all-or-nothing registration (a
realm that refuses makes the others delete the new version), a degraded registration, a
recovery with a realm down, forgiveness, deletion and "erased".

The misbehaving realms (wrong proofs, bad MACs, garbage, 10 MB answers, stalls) are in
tests/test_realms_client.py, against tests/fake_realm.py: a real realm does not misbehave."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from backvault.realms.protocol import TestOnlyStretching
from backvault.vaultclient.errors import (
    RealmRegistrationFailed,
    RealmsDisagree,
    RealmWrongPassword,
)
from backvault.vaultclient.realms import RealmClient, RealmSet
from tests.test_realm_server import Realm, start_realm

CHEAP = TestOnlyStretching()
PASSWORD = b"correct horse battery staple"
STRICT_MAX_ATTEMPTS = 3  # the third realm allows fewer guesses than the others


@pytest.fixture(scope="module")
def realms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Realm]]:
    tmp = tmp_path_factory.mktemp("client-realms")
    started: list[Realm] = []
    try:
        started.append(start_realm(tmp / "a"))
        started.append(start_realm(tmp / "b"))
        started.append(
            start_realm(tmp / "c", env={"BACKVAULT_SERVER_MAX_ATTEMPTS": str(STRICT_MAX_ATTEMPTS)})
        )
        yield started
    finally:
        for realm in started:
            realm.node.stop()


def realm_set(realms: list[Realm], pinned: bool = True) -> RealmSet:
    """A new account at every realm (a built-in account of the same name, its own token at
    each) and the client's set of realms for it."""
    name = "user-" + secrets.token_hex(4)
    return RealmSet(
        [
            RealmClient(
                realm.node.url,
                realm.node.add_account(name),
                realm.realm_id if pinned else None,
                timeout=10,
            )
            for realm in realms
        ],
        name,
        test_stretching=CHEAP,
    )


def counts(rs: RealmSet) -> list[int]:
    return [answer.attempts for answer in rs.survey().answers.values()]


def test_register_pin_recover_and_forgive(realms: list[Realm]) -> None:
    with realm_set(realms, pinned=False) as rs:
        secret = secrets.token_bytes(32)
        outcome = rs.register(PASSWORD, secret, 2, allowed_guesses=STRICT_MAX_ATTEMPTS)
        assert outcome.pinned == {r.node.url: r.realm_id for r in realms}
        assert len(rs.agree(outcome.descriptor.version).agreeing) == 3
        assert rs.attempts_left().guesses == 4  # 3 realms with 3 guesses each, 2 realms per guess

        made: dict[bytes, list[bytes]] = {}
        with pytest.raises(RealmWrongPassword) as wrong:
            rs.recover(
                b"a wrong guess",
                on_attempt=lambda realm_id, attempt: made.setdefault(realm_id, []).append(attempt),
            )
        assert wrong.value.attempts_left == 3  # [2, 2, 3] left
        assert sorted(counts(rs)) == [0, 1, 1]

        got = rs.recover(PASSWORD, earlier_attempts=made)
        assert got.secret == secret and got.problems == {}
        assert counts(rs) == [0, 0, 0]  # this device's wrong try is forgiven too


def test_a_registration_one_realm_refuses_is_deleted_at_the_others(realms: list[Realm]) -> None:
    with realm_set(realms) as rs:
        # The third realm allows at most 3 guesses per registration: 5 is refused there.
        with pytest.raises(RealmRegistrationFailed) as caught:
            rs.register(PASSWORD, secrets.token_bytes(32), 2, allowed_guesses=5)
        assert list(caught.value.problems) == [realms[2].node.url]
        assert caught.value.not_cleaned == {}
        assert {a.state for a in rs.survey().answers.values()} == {"none"}

        # Degraded: two of three accepted, the third realm's payload is kept for later.
        secret = secrets.token_bytes(32)
        outcome = rs.register(PASSWORD, secret, 2, allowed_guesses=5, allow_degraded=True)
        assert [p.url for p in outcome.pending] == [realms[2].node.url]
        assert rs.recover(PASSWORD).secret == secret


def test_a_recovery_with_one_realm_down_names_it(realms: list[Realm]) -> None:
    with realm_set(realms) as rs:
        secret = secrets.token_bytes(32)
        version = rs.register(PASSWORD, secret, 2, allowed_guesses=3).descriptor.version
        down = realms[1]
        down.node.kill()
        try:
            left = rs.attempts_left()
            assert list(left.unreachable) == [down.node.url] and left.guesses == 3
            got = rs.recover(PASSWORD)
            assert got.secret == secret
            assert "cannot reach" in got.problems[down.node.url]
            assert not rs.erased(2)
        finally:
            down.node.start()
        # Deletion everywhere; with n - t + 1 = 2 realms holding nothing, it is erased.
        report = rs.delete(version)
        assert sorted(report.confirmed) == sorted(r.node.url for r in realms)
        assert report.failed == {}
        assert rs.erased(2)


def test_the_token_of_one_realm_is_not_accepted_by_another(realms: list[Realm]) -> None:
    """Built-in accounts have a token per realm: a set with the tokens swapped gets no
    answer it could agree on, and so spends nothing."""
    name = "user-" + secrets.token_hex(4)
    tokens = [realm.node.add_account(name) for realm in realms]

    def realm_set_with(shift: int) -> RealmSet:
        clients = [
            RealmClient(r.node.url, tokens[(i + shift) % 3], r.realm_id, timeout=10)
            for i, r in enumerate(realms)
        ]
        return RealmSet(clients, name, test_stretching=CHEAP)

    with realm_set_with(0) as rs, realm_set_with(1) as swapped:
        rs.register(PASSWORD, secrets.token_bytes(32), 2, allowed_guesses=3)
        with pytest.raises(RealmsDisagree, match="nothing was attempted") as caught:
            swapped.recover(PASSWORD)
        assert set(caught.value.problems) == {r.node.url for r in realms}
        for why in caught.value.problems.values():
            assert "(unauthorized)" in why or "(invalid_token)" in why, why
        assert counts(rs) == [0, 0, 0]
