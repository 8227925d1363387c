"""The client's orchestration of threshold realms (backvault.vaultclient.realms) against
real HTTP servers on loopback: tests/fake_realm.py, a spec-following realm (docs/realms.md,
"Messages") run by uvicorn in its own process per realm, told per test how to misbehave.

Every test uses its own account, so the realms' state of one test does not reach another."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from backvault.realms.protocol import TestOnlyStretching
from backvault.vaultclient.errors import (
    RealmMisbehaved,
    RealmRegistrationFailed,
    RealmsDisagree,
    RealmUnreachable,
    RealmWrongPassword,
    TooFewRealms,
)
from backvault.vaultclient.realms import MAX_ANSWER, RealmClient, RealmSet
from tests.servers import free_port

FAKE_REALM = Path(__file__).with_name("fake_realm.py")
CHEAP = TestOnlyStretching()
PASSWORD = b"correct horse battery staple"
TIMEOUT = 2.0  # seconds; the stalling realm sleeps far longer


@dataclass
class FakeRealm:
    realm_id: bytes
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def behave(self, **how: str) -> None:
        httpx.post(self.url + "/_fake/behave", json=how, timeout=5).raise_for_status()

    def seen(self, account: str) -> list[str]:
        return list(httpx.get(f"{self.url}/_fake/seen/{account}", timeout=5).json())

    def token(self, account: str) -> str:
        return f"{account}@{self.realm_id.hex()}"


def start_realm() -> FakeRealm:
    realm_id, port = secrets.token_bytes(16), free_port()
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_REALM), str(port), realm_id.hex()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    realm = FakeRealm(realm_id, port, proc)
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake realm exited: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            httpx.get(realm.url + "/realm/v1/info", timeout=1).raise_for_status()
            return realm
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("fake realm did not start")


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeRealm]]:
    realms: list[FakeRealm] = []
    try:
        for _ in range(5):
            realms.append(start_realm())
        yield realms
    finally:
        for realm in realms:
            realm.proc.terminate()
        for realm in realms:
            try:
                realm.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                realm.proc.kill()
                realm.proc.wait()


@pytest.fixture
def realms(fakes: list[FakeRealm]) -> Iterator[list[FakeRealm]]:
    for realm in fakes:
        realm.behave()
    yield fakes
    for realm in fakes:
        realm.behave()


def account() -> str:
    return "user-" + secrets.token_hex(6)


def realm_set(fakes: list[FakeRealm], user: str, n: int = 3, pinned: bool = True) -> RealmSet:
    return RealmSet(
        [
            RealmClient(
                realm.url,
                realm.token(user),
                realm.realm_id if pinned else None,
                timeout=TIMEOUT,
            )
            for realm in fakes[:n]
        ],
        user,
        test_stretching=CHEAP,
    )


def registered(
    fakes: list[FakeRealm], n: int = 3, t: int = 2, allowed: int | None = None
) -> tuple[RealmSet, bytes, bytes]:
    """A fresh account registered at the first n realms: (its set, the secret, version)."""
    user = account()
    realms = realm_set(fakes, user, n)
    secret = secrets.token_bytes(32)
    outcome = realms.register(PASSWORD, secret, t, allowed_guesses=allowed)
    return realms, secret, outcome.descriptor.version


def counts(realms: RealmSet) -> dict[str, int]:
    survey = realms.survey()
    return {url: answer.attempts for url, answer in survey.answers.items()}


# --- registration and recovery ------------------------------------------------------------


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3)])
def test_register_pins_the_realms_and_recovers(realms: list[FakeRealm], n: int, t: int) -> None:
    user = account()
    with realm_set(realms, user, n, pinned=False) as unpinned:
        secret = secrets.token_bytes(32)
        outcome = unpinned.register(PASSWORD, secret, t)
        assert outcome.pending == [] and outcome.problems == {}
        assert outcome.pinned == {r.url: r.realm_id for r in realms[:n]}
        assert outcome.descriptor.allowed_guesses == {3: 5, 5: 3}[n]
        # Read back through phase 1 (as the caller must before removing an old key slot).
        survey = unpinned.agree(outcome.descriptor.version)
        assert len(survey.agreeing) == n
        got = unpinned.recover(PASSWORD)
        assert got.secret == secret and got.problems == {}
        # Exactly t realms were asked, all with the same blinded element.
        asked = [r.seen(user) for r in realms[:n]]
        assert sum(len(s) for s in asked) == t
        assert len({b for s in asked for b in s}) == 1
        # The successful recovery's own attempts are forgiven everywhere.
        assert set(counts(unpinned).values()) == {0}


def test_a_wrong_password_counts_and_a_right_one_forgives_the_devices_tries(
    realms: list[FakeRealm],
) -> None:
    rs, secret, _ = registered(realms)
    made: dict[bytes, list[bytes]] = {}

    def remember(realm_id: bytes, attempt_id: bytes) -> None:
        made.setdefault(realm_id, []).append(attempt_id)

    with pytest.raises(RealmWrongPassword) as wrong:
        rs.recover(b"not the password", on_attempt=remember)
    # Two realms with 4 left, one with 5: at most 6 more guesses (docs/realms.md, the bound).
    assert wrong.value.attempts_left == 6
    assert "wrong password" in str(wrong.value)
    assert sorted(counts(rs).values()) == [0, 1, 1]
    assert rs.attempts_left().guesses == 6
    # The second try goes to the realms with the most attempts left: the third one first.
    got = rs.recover(PASSWORD, earlier_attempts=made)
    assert got.secret == secret
    assert set(counts(rs).values()) == {0}


# --- phase 1: no attempt before t realms agree ------------------------------------------


def test_phase_1_stops_before_any_attempt_when_fewer_than_t_agree(
    realms: list[FakeRealm],
) -> None:
    rs, _, _ = registered(realms)
    realms[0].behave(registration="other_descriptor")
    realms[1].behave(registration="stall")
    with pytest.raises(RealmsDisagree) as caught:
        rs.recover(PASSWORD)
    problems = caught.value.problems
    assert "not enough realms agree" in problems[realms[0].url]
    assert "no answer within" in problems[realms[1].url]
    # The honest third realm alone is not enough, and the client cannot tell it is honest.
    assert "not enough realms agree" in problems[realms[2].url]
    assert "nothing was attempted" in str(caught.value)
    assert realms[0].url in str(caught.value) and "\n" not in str(caught.value)
    for realm in realms[:2]:
        realm.behave()
    assert set(counts(rs).values()) == {0}
    assert all(not r.seen(rs.user_id) for r in realms)


def test_phase_1_refuses_garbage_and_a_descriptor_of_other_realms(
    realms: list[FakeRealm],
) -> None:
    rs, secret, _ = registered(realms)
    realms[0].behave(registration="garbage")
    realms[1].behave(registration="huge")
    with pytest.raises(RealmsDisagree) as caught:
        rs.recover(PASSWORD)
    assert "not JSON" in caught.value.problems[realms[0].url]
    assert "more than" in caught.value.problems[realms[1].url]
    for realm in realms:
        realm.behave()
    # A set pinned to another realm at one URL does not accept the descriptor.
    impostor = RealmSet(
        [RealmClient(r.url, r.token(rs.user_id), r.realm_id, timeout=TIMEOUT) for r in realms[:2]]
        + [RealmClient(realms[3].url, realms[3].token(rs.user_id), realms[3].realm_id)],
        rs.user_id,
        test_stretching=CHEAP,
    )
    with pytest.raises(RealmsDisagree):
        impostor.recover(PASSWORD)
    # A device that remembers another registration version stops too.
    with pytest.raises(RealmsDisagree, match="another registration"):
        rs.recover(PASSWORD, expected_version=bytes(16))
    assert set(counts(rs).values()) == {0}
    assert rs.recover(PASSWORD).secret == secret


# --- phase 2: a bad evaluation is named and replaced --------------------------------------


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("wrong_evaluation", "proof does not verify"),
        ("wrong_proof", "proof does not verify"),
        ("garbage", "not JSON"),
        ("huge", f"more than {MAX_ANSWER} bytes"),
        ("stall", "no answer within"),
        ("refuse", "maintenance"),
        ("deep_json", "not JSON"),
        ("gzip_junk", "'gzip' encoding"),
    ],
)
def test_a_realm_that_evaluates_badly_is_named_and_replaced(
    realms: list[FakeRealm], how: str, named: str
) -> None:
    rs, secret, _ = registered(realms)
    realms[0].behave(evaluate=how)  # index 1, asked first when all have the same count
    got = rs.recover(PASSWORD)
    assert got.secret == secret
    assert list(got.problems) == [realms[0].url]
    assert named in got.problems[realms[0].url]
    # The replacement was asked with the same blinded element.
    asked = [b for r in realms[:3] for b in r.seen(rs.user_id)]
    assert len(asked) == 3 and len(set(asked)) == 1


def test_fewer_than_t_good_evaluations_fail_naming_every_bad_realm(
    realms: list[FakeRealm],
) -> None:
    rs, _, _ = registered(realms)
    realms[0].behave(evaluate="wrong_proof")
    realms[1].behave(evaluate="garbage")
    with pytest.raises(TooFewRealms, match="valid evaluation") as caught:
        rs.recover(PASSWORD)
    assert set(caught.value.problems) == {realms[0].url, realms[1].url}


# --- phase 3: a bad share is named, t good ones open ------------------------------------


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("bad_share_mac", "does not match its MAC"),
        ("bad_share", "does not match its MAC"),
        ("garbage", "not JSON"),
        ("huge", "more than"),
    ],
)
def test_a_realm_with_a_bad_share_is_named(realms: list[FakeRealm], how: str, named: str) -> None:
    rs, secret, _ = registered(realms)
    realms[1].behave(unlock=how)
    got = rs.recover(PASSWORD)
    assert got.secret == secret
    assert named in got.problems[realms[1].url]


# --- registration: all or nothing ---------------------------------------------------------


def test_a_registration_refused_by_one_realm_is_deleted_everywhere(
    realms: list[FakeRealm],
) -> None:
    rs, _, old = registered(realms)
    realms[2].behave(register="refuse")
    with pytest.raises(RealmRegistrationFailed) as caught:
        rs.register(b"a new password", secrets.token_bytes(32), 2)
    assert list(caught.value.problems) == [realms[2].url]
    assert "maintenance" in str(caught.value) and caught.value.not_cleaned == {}
    realms[2].behave()
    survey = rs.survey()
    # The new version is nowhere: the two realms that took it deleted it again; the third
    # still holds the old one (the others replaced theirs, by the spec's compare-and-swap).
    states = {url: a.state for url, a in survey.answers.items()}
    assert states == {realms[0].url: "none", realms[1].url: "none", realms[2].url: "registered"}
    held = survey.answers[realms[2].url].descriptor
    assert held is not None and held.version == old


def test_a_registration_with_an_unreachable_realm_sends_nothing(
    realms: list[FakeRealm],
) -> None:
    user = account()
    rs = realm_set(realms, user)
    realms[1].behave(registration="stall")
    with pytest.raises(RealmRegistrationFailed) as caught:
        rs.register(PASSWORD, secrets.token_bytes(32), 2)
    assert "no answer" in caught.value.problems[realms[1].url]
    realms[1].behave()
    assert {a.state for a in rs.survey().answers.values()} == {"none"}


def test_a_degraded_registration_keeps_the_missed_payloads_for_later(
    realms: list[FakeRealm],
) -> None:
    user = account()
    rs = realm_set(realms, user)
    secret = secrets.token_bytes(32)
    realms[2].behave(register="refuse")
    outcome = rs.register(PASSWORD, secret, 2, allow_degraded=True)
    assert outcome.accepted and sorted(outcome.accepted) == sorted(r.url for r in realms[:2])
    (pending,) = outcome.pending
    assert pending.url == realms[2].url and pending.expected_version is None
    assert "hidden" in repr(pending.payload)
    assert len(rs.agree(outcome.descriptor.version).agreeing) == 2
    assert rs.recover(PASSWORD).secret == secret
    realms[2].behave()
    rs.deliver(pending)
    assert len(rs.agree(outcome.descriptor.version).agreeing) == 3
    # Degraded needs t: with two realms refusing, nothing stays.
    realms[1].behave(register="refuse")
    realms[2].behave(register="stall")
    with pytest.raises(RealmRegistrationFailed, match="nor 2"):
        rs.register(PASSWORD, secrets.token_bytes(32), 2, allow_degraded=True)
    realms[1].behave()
    realms[2].behave()
    states = {url: a.state for url, a in rs.survey().answers.items()}
    assert states[realms[0].url] == "none"


def test_a_realm_with_another_id_than_pinned_is_refused(realms: list[FakeRealm]) -> None:
    user = account()
    client = RealmClient(realms[0].url, realms[0].token(user), realms[1].realm_id)
    with pytest.raises(RealmMisbehaved, match=f"not the pinned {realms[1].realm_id.hex()}"):
        client.info()


# --- deletion, attempts left, erased ------------------------------------------------------


def test_delete_reports_who_could_not_be_reached(realms: list[FakeRealm]) -> None:
    rs, _, version = registered(realms)
    realms[1].behave(delete="stall")
    report = rs.delete(version, tries=2, pause=0)
    assert sorted(report.confirmed) == sorted([realms[0].url, realms[2].url])
    assert list(report.failed) == [realms[1].url]
    assert "no answer" in report.failed[realms[1].url]
    realms[1].behave()
    # realms[1] still holds it, but with two of three gone no two realms can evaluate.
    assert rs.erased(2)
    states = sorted(a.state for a in rs.survey().answers.values())
    assert states == ["none", "none", "registered"]


def test_erased_only_when_n_minus_t_plus_1_realms_say_so(realms: list[FakeRealm]) -> None:
    rs, _, version = registered(realms, n=5, t=3)
    survey = rs.survey()
    assert not rs.erased(3, survey)
    rs.realms[0].delete(version)
    rs.realms[1].delete(version)
    assert not rs.erased(3)  # 2 gone: 3 realms could still evaluate
    rs.realms[2].delete(version)
    assert rs.erased(3)  # 3 = n - t + 1 gone


def test_attempts_left_counts_an_unreachable_realm_as_zero_and_names_it(
    realms: list[FakeRealm],
) -> None:
    rs, _, _ = registered(realms)
    assert rs.attempts_left().guesses == 7  # the spec's table: n=3, t=2, G_r=5
    realms[2].behave(registration="stall")
    left = rs.attempts_left()
    assert left.guesses == 5  # two realms with 5 each, t = 2
    assert left.per_realm[realms[2].url] == 0
    assert list(left.unreachable) == [realms[2].url]


def test_unreachable_realm_url(realms: list[FakeRealm]) -> None:
    port = free_port()  # nothing listens there
    client = RealmClient(f"http://127.0.0.1:{port}", "t", timeout=TIMEOUT)
    with pytest.raises(RealmUnreachable, match=f"realm http://127.0.0.1:{port}: cannot reach"):
        client.info()


def test_a_wrong_guess_that_leaves_fewer_than_t_realms_deletes_the_registration(
    realms: list[FakeRealm],
) -> None:
    rs, _, _ = registered(realms, allowed=1)
    with pytest.raises(RealmWrongPassword, match="deleted at 3 of 3 realms") as caught:
        rs.recover(b"wrong")
    assert caught.value.attempts_left == 0
    assert {a.state for a in rs.survey().answers.values()} == {"none"}


def test_a_realm_that_did_not_answer_is_not_taken_for_spent(realms: list[FakeRealm]) -> None:
    """A realm that does not answer may still have attempts: only realms known to be spent
    count towards deleting the registration."""
    rs, secret, version = registered(realms, allowed=2)
    realms[2].behave(registration="stall")
    with pytest.raises(RealmWrongPassword):
        rs.recover(b"wrong")  # at realms 1 and 2: one attempt left at each
    realms[2].behave()
    realms[0].behave(registration="stall")
    with pytest.raises(RealmWrongPassword) as caught:
        rs.recover(b"wrong again")  # at realms 3 and 2: realm 2 is spent
    # Realm 2 spent, realm 1 unknown (it has one left), realm 3 has one left: 2 = t realms
    # may still evaluate, so nothing is deleted.
    assert caught.value.code == "wrong_password"
    realms[0].behave()
    assert sorted(counts(rs).values()) == [1, 1, 2]
    got = rs.recover(PASSWORD)  # the last attempts at realms 1 and 3
    assert got.secret == secret and got.descriptor.version == version


def test_a_degraded_replacement_remembers_what_the_missed_realm_last_had(
    realms: list[FakeRealm],
) -> None:
    rs, _, old = registered(realms)
    realms[1].behave(registration="stall")
    secret = secrets.token_bytes(32)
    outcome = rs.register(b"new password", secret, 2, allow_degraded=True)
    (pending,) = outcome.pending
    assert pending.url == realms[1].url and pending.expected_version == old
    realms[1].behave()
    rs.deliver(pending)  # compare-and-swap with the old version it still holds
    assert len(rs.agree(outcome.descriptor.version).agreeing) == 3
    assert rs.recover(b"new password").secret == secret


def test_a_realm_claiming_more_attempts_than_its_descriptor_allows_is_held_to_it(
    realms: list[FakeRealm],
) -> None:
    """A realm cannot jump the queue of phase 2 (nor inflate the bound shown) by claiming
    more attempts than the G_r of the descriptor t realms agree on."""
    rs, _secret, _ = registered(realms)
    realms[2].behave(registration="inflate")
    survey = rs.survey()
    d = survey.descriptor
    assert d is not None
    assert survey.answers[realms[2].url].attempts_left == d.allowed_guesses
    assert rs.attempts_left(survey).guesses == rs.attempts_left(rs.survey()).guesses


def test_no_key_share_goes_to_a_realm_that_is_not_the_one_pinned(
    realms: list[FakeRealm],
) -> None:
    """A realm redeployed at a pinned URL (another id) is asked who it is before any share
    is sent: the registration stops with nothing registered anywhere."""
    user = account()
    clients = [
        RealmClient(realm.url, realm.token(user), realm.realm_id, timeout=TIMEOUT)
        for realm in realms[:3]
    ]
    clients[2].realm_id = secrets.token_bytes(16)  # the pin of a realm that was there before
    with RealmSet(clients, user, test_stretching=CHEAP) as rs:
        with pytest.raises(RealmRegistrationFailed, match="nothing was registered") as failed:
            rs.register(PASSWORD, secrets.token_bytes(32), 2)
        assert "not the pinned" in failed.value.problems[realms[2].url]
        assert {answer.state for answer in rs.survey().answers.values()} == {"none"}


def test_a_delivery_whose_answer_was_lost_is_not_sent_twice(realms: list[FakeRealm]) -> None:
    """A degraded registration's payload that reached its realm (the answer lost) is found
    there by phase 1 and not registered again."""
    user = account()
    with realm_set(realms, user) as rs:
        realms[2].behave(registration="refuse", register="refuse")
        outcome = rs.register(PASSWORD, secrets.token_bytes(32), 2, allow_degraded=True)
        (pending,) = outcome.pending
        realms[2].behave()
        rs.deliver(pending)
        survey = rs.survey()
        assert survey.answers[realms[2].url].descriptor == outcome.descriptor
        rs.deliver(pending)  # again: already there, nothing sent (a 409 would raise)
