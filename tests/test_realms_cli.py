"""The password through threshold realms, as a user meets it: the real `backvault` command
against three real `backvault vault serve --realm` processes (each its own SQLite database
and sealing key), 2 of 3 needed. Same commands and messages as with one vault: `init
--password`, a restore on a new device with the password, `password check`, `password
change` and `password disable` — with a realm down, and with two down (nothing spent)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Cli
from tests.test_realm_server import Realm, start_realm

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a different, much longer one 2026"


@pytest.fixture
def realms(tmp_path: Path) -> Iterator[list[Realm]]:
    started: list[Realm] = []
    try:
        for name in ("a", "b", "c"):
            started.append(start_realm(tmp_path / f"realm-{name}"))
        yield started
    finally:
        for realm in started:
            realm.node.stop()


def device_env(realms: list[Realm], tokens: list[str], repo: Path) -> dict[str, str]:
    return {
        "BACKVAULT_REPO": str(repo),
        "BACKVAULT_VAULT_REALMS": ",".join(realm.node.url for realm in realms),
        "BACKVAULT_VAULT_THRESHOLD": "2",
        "BACKVAULT_ACCOUNT": "ana",
        "BACKVAULT_VAULT_REALM_TOKENS": ",".join(tokens),
    }


def attempts(realm: Realm, token: str) -> int:
    return int(realm.registration(token)["attempts"])


def test_init_restore_check_change_and_disable_through_three_realms(
    realms: list[Realm], tmp_path: Path
) -> None:
    tokens = [realm.node.add_account("ana") for realm in realms]
    repo = tmp_path / "repo"
    phone = Cli(tmp_path / "phone")
    env = device_env(realms, tokens, repo)
    made = phone.ok("--json", "init", "--password", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    created = made.json()
    assert created["password_key_id"] and len(created["recovery_key"]) == 64
    versions = {
        realm.registration(token)["descriptor"] for realm, token in zip(realms, tokens, strict=True)
    }
    assert len(versions) == 1  # the same descriptor at every realm
    source = tmp_path / "chat"
    source.mkdir()
    (source / "msgstore.db").write_bytes(b"messages " * 5000)
    phone.ok("backup", str(source), env=env)

    # A new phone: no key cache, no pins; the password through the realms.
    new_phone = Cli(tmp_path / "new-phone")
    wrong = new_phone.run("snapshots", env={**env, "BACKVAULT_PASSWORD": "not it at all"})
    assert wrong.code == 10, wrong.err
    assert "wrong password" in wrong.err and "attempts left" in wrong.err
    spent = [attempts(realm, token) for realm, token in zip(realms, tokens, strict=True)]
    assert sum(spent) == 2  # one guess = two realms' evaluations

    # One realm down: the restore still works, and the missing realm is not needed.
    realms[0].node.kill()
    target = tmp_path / "restored"
    restore = new_phone.ok(
        "restore", "latest", "--target", str(target), env={**env, "BACKVAULT_PASSWORD": PASSWORD}
    )
    assert f"realm {realms[0].node.url} did not do its part" in restore.err  # named
    restored = next(target.rglob("msgstore.db"))
    assert restored.read_bytes() == (source / "msgstore.db").read_bytes()
    # The device's own wrong try was forgiven at the realms that counted it and answered.
    for realm, token in zip(realms[1:], tokens[1:], strict=True):
        assert attempts(realm, token) == 0

    # Two realms down: a clear error, and no attempt spent anywhere.
    realms[1].node.kill()
    before = attempts(realms[2], tokens[2])
    third = Cli(tmp_path / "third-phone")
    down = third.run("snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    assert down.code == 13, down.err
    assert "nothing was attempted" in down.err and realms[0].node.url in down.err
    assert attempts(realms[2], tokens[2]) == before
    realms[0].node.start()
    realms[1].node.start()

    # password check (counted, forgiven on success), change, then disable.
    checked = new_phone.ok(
        "--json", "password", "check", env={**env, "BACKVAULT_PASSWORD": PASSWORD}
    )
    assert checked.json()["ok"] is True
    key = created["recovery_key"]
    changed = new_phone.ok(
        "--json",
        "password",
        "change",
        key=key,
        env={**env, "BACKVAULT_NEW_PASSWORD": NEW_PASSWORD},
    ).json()
    assert changed["removed"] == [created["password_key_id"]]
    after = {
        realm.registration(token)["descriptor"] for realm, token in zip(realms, tokens, strict=True)
    }
    assert len(after) == 1 and after != versions  # a new registration everywhere
    old = Cli(tmp_path / "fourth-phone").run(
        "snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD}
    )
    assert old.code == 10  # the old password opens nothing now
    fresh = Cli(tmp_path / "fifth-phone")
    assert json.loads(
        fresh.ok("--json", "snapshots", env={**env, "BACKVAULT_PASSWORD": NEW_PASSWORD}).out
    )
    phone.ok("password", "disable", key=key, env=env)
    for realm, token in zip(realms, tokens, strict=True):
        assert realm.registration(token)["state"] == "none"


def test_a_degraded_change_is_delivered_later_and_the_old_password_does_not_come_back(
    realms: list[Realm], tmp_path: Path
) -> None:
    """Issue 14, test 7: `password change` with a realm down fails whole without
    --allow-degraded (the old password still works); with it, t realms take the new
    registration and the device delivers the third realm's part once it is back. Then that
    realm and a realm rolled back to before the change: the old password opens nothing,
    the new one works on a new device."""
    tokens = [realm.node.add_account("ana") for realm in realms]
    repo = tmp_path / "repo"
    phone = Cli(tmp_path / "phone")
    env = device_env(realms, tokens, repo)
    key = phone.ok("--json", "init", "--password", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    key = key.json()["recovery_key"]
    # A copy of realm a's database from before the change (what a restore from backup is):
    # SQLite's backup API, which reads through the write-ahead log (the file alone may lack
    # the newest rows).
    assert realms[0].db is not None
    before_change = tmp_path / "realm-a-backup.db"
    with (
        contextlib.closing(sqlite3.connect(realms[0].db)) as live,
        contextlib.closing(sqlite3.connect(before_change)) as copy,
    ):
        live.backup(copy)

    realms[2].node.kill()
    change = ["password", "change"]
    refused = phone.run(*change, key=key, env={**env, "BACKVAULT_NEW_PASSWORD": NEW_PASSWORD})
    assert refused.code == 13 and realms[2].node.url in refused.err, refused.err
    assert "nothing was registered, the current registration is untouched" in refused.err
    assert (
        Cli(tmp_path / "check").run("snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD}).code
        == 0
    )

    done = phone.run(
        *change, "--allow-degraded", key=key, env={**env, "BACKVAULT_NEW_PASSWORD": NEW_PASSWORD}
    )
    assert done.code == 0, done.err
    assert f"the realm {realms[2].node.url} did not take the new registration" in done.err
    new_descriptor = realms[1].registration(tokens[1])["descriptor"]
    assert realms[0].registration(tokens[0])["descriptor"] == new_descriptor

    realms[2].node.start()
    assert realms[2].registration(tokens[2])["descriptor"] != new_descriptor  # stale
    delivered = phone.ok("snapshots", env=env)  # the device's cached key opens it
    assert f"the realm {realms[2].node.url} now holds its part" in delivered.err
    assert realms[2].registration(tokens[2])["descriptor"] == new_descriptor

    # Realm a rolled back to before the change: it holds the old registration again.
    realms[0].node.stop()
    for suffix in ("-wal", "-shm"):
        Path(str(realms[0].db) + suffix).unlink(missing_ok=True)
    realms[0].db.write_bytes(before_change.read_bytes())
    realms[0].node.start()
    assert realms[0].registration(tokens[0])["descriptor"] != new_descriptor
    old = Cli(tmp_path / "old").run("snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    assert old.code == 10, old.err
    new = Cli(tmp_path / "new").run("snapshots", env={**env, "BACKVAULT_PASSWORD": NEW_PASSWORD})
    assert new.code == 0, new.err


def test_the_last_attempt_still_opens_then_the_password_is_erased_and_the_key_remains(
    realms: list[Realm], tmp_path: Path
) -> None:
    """Issue 14, test 5, from the command line: 2 guesses per realm (3 realms, 2 needed:
    3 guesses in all); two wrong ones, then the right one on the last attempt restores and
    warns that the password is used up; afterwards the right password is told the key is
    erased (no attempt spent), and the 64-digit key still opens the repository."""
    tokens = [realm.node.add_account("ana") for realm in realms]
    repo = tmp_path / "repo"
    env = device_env(realms, tokens, repo)
    made = Cli(tmp_path / "phone").ok(
        "--json",
        "init",
        "--password",
        "--max-attempts",
        "2",
        env={**env, "BACKVAULT_PASSWORD": PASSWORD},
    )
    key = made.json()["recovery_key"]
    new_phone = Cli(tmp_path / "new-phone")
    first = new_phone.run("snapshots", env={**env, "BACKVAULT_PASSWORD": "wrong one"})
    assert first.code == 10 and "2 attempts left" in first.err, first.err
    second = new_phone.run("snapshots", env={**env, "BACKVAULT_PASSWORD": "wrong two"})
    assert second.code == 10 and "1 attempt left" in second.err, second.err
    last = new_phone.run("snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    assert last.code == 0, last.err
    assert "that was the last attempt the realms allowed" in last.err
    before = [attempts(realm, token) for realm, token in zip(realms, tokens, strict=True)]
    again = Cli(tmp_path / "third").run("snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    assert again.code == 10 and "erased this key" in again.err, again.err
    assert [attempts(r, t) for r, t in zip(realms, tokens, strict=True)] == before
    Cli(tmp_path / "fourth").ok("snapshots", key=key, env=env)


def test_wrong_tries_counted_by_a_realm_that_was_down_at_the_restore_are_forgiven_later(
    realms: list[Realm], tmp_path: Path
) -> None:
    """The device forgets its wrong tries only at the realms that forgave them (answered
    phase 3); a realm that was down keeps them, and the next success presents them there."""
    tokens = [realm.node.add_account("ana") for realm in realms]
    env = device_env(realms, tokens, tmp_path / "repo")
    Cli(tmp_path / "phone").ok("init", "--password", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    phone = Cli(tmp_path / "new-phone")
    for guess in ("wrong one", "wrong two"):  # 2 guesses x 2 realms: every realm counts one
        assert phone.run("snapshots", env={**env, "BACKVAULT_PASSWORD": guess}).code == 10
    counted = [attempts(r, t) for r, t in zip(realms, tokens, strict=True)]
    down = next(i for i, c in enumerate(counted) if c)  # a realm that counted a wrong try
    realms[down].node.kill()
    phone.ok("snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    realms[down].node.start()
    assert attempts(realms[down], tokens[down]) == counted[down]  # still counted there
    phone.ok("password", "check", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    assert attempts(realms[down], tokens[down]) == 0


def test_a_password_changed_on_another_device_opens_on_this_one_with_a_warning(
    realms: list[Realm], tmp_path: Path
) -> None:
    """This device registered the password; another of the owner's devices changed it.
    Here the new password still opens the repository (the realms' registration is not the
    one this device made: it says so, as with one vault), and the old one opens nothing."""
    tokens = [realm.node.add_account("ana") for realm in realms]
    env = device_env(realms, tokens, tmp_path / "repo")
    phone = Cli(tmp_path / "phone")
    made = phone.ok("--json", "init", "--password", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    key = made.json()["recovery_key"]
    tablet = Cli(tmp_path / "tablet")
    tablet.ok("password", "change", key=key, env={**env, "BACKVAULT_NEW_PASSWORD": NEW_PASSWORD})
    phone.ok("forget-device", env=env)  # the phone's key cache is gone, its records stay
    old = phone.run("snapshots", env={**env, "BACKVAULT_PASSWORD": PASSWORD})
    assert old.code == 10, old.err
    opened = phone.run("snapshots", env={**env, "BACKVAULT_PASSWORD": NEW_PASSWORD})
    assert opened.code == 0, opened.err
    assert "did not register" in opened.err


def test_moving_from_one_vault_to_realms_deletes_the_vaults_record(
    realms: list[Realm], tmp_path: Path
) -> None:
    """A repository whose password the single vault kept: with vault.realms set (and the
    vault still configured), `password change` registers at the realms, removes the old
    password slot and deletes the vault's OPAQUE record; the realms then open it."""
    tokens = [realm.node.add_account("ana") for realm in realms]
    vault = realms[0].node  # a realm serves the single vault's OPAQUE API too
    single = {
        "BACKVAULT_REPO": str(tmp_path / "repo"),
        "BACKVAULT_VAULT_URL": vault.url,
        "BACKVAULT_ACCOUNT": "ana",
        "BACKVAULT_VAULT_TOKEN": tokens[0],
    }
    phone = Cli(tmp_path / "phone")
    made = phone.ok("--json", "init", "--password", env={**single, "BACKVAULT_PASSWORD": PASSWORD})
    record = httpx.get(
        vault.url + "/v1/record", headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=30
    )
    assert record.json()["exists"] is True
    both = {**single, **device_env(realms, tokens, tmp_path / "repo")}
    changed = phone.ok(
        "--json", "password", "change", env={**both, "BACKVAULT_NEW_PASSWORD": NEW_PASSWORD}
    ).json()
    assert changed["removed"] == [made.json()["password_key_id"]]
    record = httpx.get(
        vault.url + "/v1/record", headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=30
    )
    assert record.json()["exists"] is False
    opened = Cli(tmp_path / "new").run(
        "snapshots", env={**both, "BACKVAULT_PASSWORD": NEW_PASSWORD}
    )
    assert opened.code == 0, opened.err
