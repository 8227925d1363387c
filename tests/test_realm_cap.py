"""The rolling guess cap of a realm cannot be laundered (docs/realms.md, "Registration" and
"Limits"), against a real `backvault vault serve --realm` process and its SQLite file.

The attack: a token holder at the cap registers its own keys under the victim's version
(compare-and-swap naming that version, or over the victim's erased tombstone), unlocks with
its own tag and presents the attempt ids of its guesses against the victim, so that they
are forgiven and leave the cap. The realm refuses a version the account used before
(409 version_reused), and forgives only attempts of the registration identity it made for
the registration unlocked, whatever its version.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from backvault.opaque import group, voprf
from backvault.vault import schema
from backvault.vault.store import make_engine
from tests.test_realm_server import (
    UNLOCK_WINDOW,
    Accounts,
    Realm,
    Registration,
    account,
    make_registration,
    start_realm,
    unb64,
)

# The cap must be at least the most a registration allows (the vault's settings): it
# bites across registrations, so each test spends guesses on two of them.
MAX_ATTEMPTS, GUESS_CAP = 5, 6


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    started = start_realm(
        tmp_path_factory.mktemp("realm-cap"),
        env={
            "BACKVAULT_SERVER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "BACKVAULT_SERVER_GUESS_CAP": str(GUESS_CAP),
        },
    )
    try:
        yield started
    finally:
        assert started.node.stop() == 0


BLINDED = voprf.blind(b"a wrong guess", group.random_scalar())


def guess(realm: Realm, token: str, reg: Registration, count: int) -> list[bytes]:
    made = []
    for _ in range(count):
        response = realm.evaluate(token, reg.version, BLINDED)
        assert response.status_code == 200, response.text
        made.append(unb64(response.json()["attempt_id"]))
    return made


def unforgiven(realm: Realm, name: str) -> int:
    return sum(1 for row in realm.attempts(name) if not row["forgiven"])


def capped(realm: Realm, token: str, reg: Registration) -> bool:
    response = realm.evaluate(token, reg.version, BLINDED)
    return response.status_code == 423 and response.json()["error"] == "guess_cap_reached"


def victim_and_thief(realm: Realm, allowed: int) -> tuple[Accounts, Registration, Registration]:
    """An account whose registration a token thief guesses against; the thief's own
    registration made under the victim's version."""
    who = account([realm])
    ids = [realm.realm_id, secrets.token_bytes(16)]
    victim = make_registration(ids, 2, allowed, b"the owner's password", who.name)
    thiefs = make_registration(ids, 2, allowed, b"thief", who.name, version=victim.version)
    assert realm.register(who.tokens[0], victim).status_code == 200
    return who, victim, thiefs


def test_re_registering_the_victims_version_to_launder_the_cap_is_refused(realm: Realm) -> None:
    who, victim, thiefs = victim_and_thief(realm, allowed=MAX_ATTEMPTS)
    token = who.tokens[0]
    stolen_ids = guess(realm, token, victim, MAX_ATTEMPTS - 1)

    # The thief's keys under the victim's version (compare-and-swap names it): refused.
    refused = realm.register(token, thiefs, victim.version)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "version_reused"
    held = realm.registration(token)
    assert unb64(held["descriptor"]) == victim.encoded and held["attempts"] == MAX_ATTEMPTS - 1
    # Its own tag is no tag of the registration held: nothing is forgiven.
    wrong = realm.unlock(token, victim.version, thiefs.tag(realm.realm_id), stolen_ids)
    assert wrong.status_code == 403 and wrong.json()["error"] == "wrong_tag"
    assert unforgiven(realm, who.name) == MAX_ATTEMPTS - 1

    # A replacement under a fresh version is still allowed (compare-and-swap as before)...
    fresh = make_registration(
        [realm.realm_id, secrets.token_bytes(16)], 2, MAX_ATTEMPTS, b"thief", who.name
    )
    assert realm.register(token, fresh, victim.version).status_code == 200
    # ...but the thief's tag for it forgives none of the guesses against the victim,
    unlocked = realm.unlock(token, fresh.version, fresh.tag(realm.realm_id), stolen_ids)
    assert unlocked.status_code == 200, unlocked.text
    assert unforgiven(realm, who.name) == MAX_ATTEMPTS - 1
    # so the cap across registrations holds: 2 more, not 5.
    guess(realm, token, fresh, GUESS_CAP - (MAX_ATTEMPTS - 1))
    assert capped(realm, token, fresh)
    assert realm.unlock(token, fresh.version, fresh.tag(realm.realm_id), stolen_ids).is_success
    assert capped(realm, token, fresh)
    # Neither over the fresh one nor after deleting it does the victim's version come back.
    again = realm.register(token, thiefs, fresh.version)
    assert again.status_code == 409 and again.json()["error"] == "version_reused"
    assert realm.delete(token, fresh.version).status_code == 204
    after_delete = realm.register(token, thiefs)
    assert after_delete.status_code == 409 and after_delete.json()["error"] == "version_reused"
    assert realm.registration(token)["state"] == "none"
    assert unforgiven(realm, who.name) == GUESS_CAP


def test_an_erased_registrations_version_cannot_be_registered_again(realm: Realm) -> None:
    who, victim, thiefs = victim_and_thief(realm, allowed=2)
    token = who.tokens[0]
    stolen_ids = guess(realm, token, victim, 2)  # G_r spent: the key share is erased
    deadline = time.monotonic() + UNLOCK_WINDOW + 30
    while realm.registration(token)["state"] != "erased":
        assert time.monotonic() < deadline, "no tombstone after the unlock window"
        time.sleep(0.3)
    # Over the tombstone, named by null or by its version: refused either way.
    for expected in (None, victim.version):
        refused = realm.register(token, thiefs, expected)
        assert refused.status_code == 409 and refused.json()["error"] == "version_reused"
    assert realm.registration(token)["state"] == "erased"
    assert unforgiven(realm, who.name) == 2
    gone = realm.unlock(token, victim.version, thiefs.tag(realm.realm_id), stolen_ids)
    assert gone.status_code == 410
    assert unforgiven(realm, who.name) == 2


def test_forgiveness_follows_the_registration_identity_not_the_version(realm: Realm) -> None:
    """Were the used-version record lost (here: deleted from the database by hand), a
    registration under the victim's version still cannot forgive the victim's attempts."""
    who, victim, thiefs = victim_and_thief(realm, allowed=MAX_ATTEMPTS)
    token = who.tokens[0]
    stolen_ids = guess(realm, token, victim, MAX_ATTEMPTS - 1)
    assert realm.db is not None
    with sqlite3.connect(realm.db) as conn:
        conn.execute("DELETE FROM realm_used_versions WHERE account = ?", (who.name,))
    assert realm.register(token, thiefs, victim.version).status_code == 200
    own_ids = guess(realm, token, thiefs, GUESS_CAP - (MAX_ATTEMPTS - 1))
    assert capped(realm, token, thiefs)
    rows = realm.attempts(who.name)
    assert len({row["registration"] for row in rows}) == 2  # same version, two identities
    assert {row["version"] for row in rows} == {victim.version.hex()}

    done = realm.unlock(token, thiefs.version, thiefs.tag(realm.realm_id), stolen_ids + own_ids)
    assert done.status_code == 200, done.text
    forgiven = {row["id"]: bool(row["forgiven"]) for row in realm.attempts(who.name)}
    assert forgiven == {
        **{hashlib.sha256(i).hexdigest(): False for i in stolen_ids},
        **{hashlib.sha256(i).hexdigest(): True for i in own_ids},
    }
    # Its own attempts left the cap; the victim's did not.
    guess(realm, token, thiefs, len(own_ids))
    assert capped(realm, token, thiefs)
    assert unforgiven(realm, who.name) == GUESS_CAP


def test_a_retried_registration_that_landed_still_hears_version_mismatch(realm: Realm) -> None:
    who = account([realm])
    token = who.tokens[0]
    ids = [realm.realm_id, secrets.token_bytes(16)]
    first = make_registration(ids, 2, 5, b"pw", who.name)
    second = make_registration(ids, 2, 5, b"pw2", who.name)
    assert realm.register(token, first).status_code == 200
    assert realm.register(token, second, first.version).status_code == 200
    retried = realm.register(token, second, first.version)
    assert retried.status_code == 409 and retried.json()["error"] == "version_mismatch"
    assert unb64(retried.json()["version"]) == second.version


def test_migration_9_gives_registrations_an_identity_and_records_used_versions(
    tmp_path: Path,
) -> None:
    """A database from before migration 9: the registration gets an identity, attempts made
    since it was (re)written are its own, older ones under the same version none, and every
    version seen is recorded as used."""
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    schema.migrate(engine)
    with engine.begin() as conn:  # back to version 8's tables
        conn.execute(sa.text("DROP TABLE realm_used_versions"))
        conn.execute(sa.text("ALTER TABLE realm_registrations DROP COLUMN registration"))
        conn.execute(sa.text("ALTER TABLE realm_attempts DROP COLUMN registration"))
        conn.execute(sa.text("UPDATE schema_version SET version = 8"))
        version, older = secrets.token_hex(16), secrets.token_hex(16)
        conn.execute(
            sa.text(
                "INSERT INTO realm_registrations (account, version, state, attempts, allowed,"
                " created_at, updated_at) VALUES ('ana', :v, 'erased', 0, 5, 100.0, 100.0)"
            ),
            {"v": version},
        )
        for attempt_id, at_version, started in (
            ("laundered", version, 50.0),  # before the row was written: an earlier one's
            ("own", version, 150.0),
            ("replaced", older, 20.0),
        ):
            conn.execute(
                sa.text(
                    "INSERT INTO realm_attempts (id, account, version, started_at, forgiven,"
                    " client) VALUES (:i, 'ana', :v, :s, 0, '')"
                ),
                {"i": attempt_id, "v": at_version, "s": started},
            )
    assert schema.migrate(engine) == 8
    with engine.connect() as conn:
        made = conn.execute(sa.text("SELECT registration FROM realm_registrations")).scalar_one()
        claimed = dict(conn.execute(sa.text("SELECT id, registration FROM realm_attempts")).all())
        used = dict(
            conn.execute(sa.text("SELECT version, registered_at FROM realm_used_versions")).all()
        )
    assert made and len(made) == 32
    assert claimed == {"laundered": None, "own": made, "replaced": None}
    assert used == {version: 50.0, older: 20.0}
    engine.dispose()
