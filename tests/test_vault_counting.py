"""Issue 12, point 2: a success forgives only the attempts its client proves were its own;
a rolling cap bounds wrong guesses across successes. Point 1's client side: the record
fingerprint, and records made before per-registration credential identifiers. Point 5:
an erased record leaves no sealed bytes in the database's files.

Against real vault processes and their SQLite files; the window test drives the service
with a clock of its own over a real database.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from backvault.opaque import (
    KE2,
    AuthenticationError,
    IdentityKSF,
    OpaqueConfig,
    RegistrationResponse,
    client,
    group,
    oprf,
)
from backvault.opaque import protocol as opaque_protocol
from backvault.opaque import server as opaque_server
from backvault.vault import schema
from backvault.vault.accounts import hash_token
from backvault.vault.outcomes import WrongPassword
from backvault.vault.records import legacy_credential_identifier
from backvault.vault.sealing import FileSealer
from backvault.vault.service import VaultService
from backvault.vault.store import make_engine
from backvault.vaultclient.http import VaultClient, VaultRefused
from tests.conftest import Cli
from tests.servers import VaultNode, make_node
from tests.test_vault_oracle import (
    attack_with_registration_starts,
    captured_ke2,
    captured_login,
    guess_opens,
    server_public_key,
)

CONFIG = OpaqueConfig(ksf=IdentityKSF())
SECRET = b"S" * 48
PASSWORD = b"correct horse battery staple"


def wrap(_export_key: bytes) -> bytes:
    return SECRET


@pytest.fixture
def node(tmp_path: Path) -> Iterator[VaultNode]:
    vault = make_node(
        tmp_path / "vault",
        f"sqlite:///{tmp_path / 'vault.db'}",
        "--sealing-key-file",
        str(tmp_path / "keys" / "sealing.key"),
        env={"BACKVAULT_SERVER_GUESS_CAP": "14"},
    ).start()
    yield vault
    assert vault.stop() == 0


def wrong_guesses(vc: VaultClient, count: int) -> list[str]:
    ids: list[str] = []
    for _ in range(count):
        with pytest.raises(VaultRefused) as refused:
            vc.login(b"a wrong guess", on_started=ids.append)
        assert refused.value.code == "wrong_password"
    return ids


def test_a_success_does_not_forgive_an_attackers_guesses(node: VaultNode) -> None:
    token = node.add_account("ana")
    with (
        VaultClient(node.url, token, CONFIG) as owner,
        VaultClient(node.url, token, CONFIG) as thief,
    ):
        owner.register(PASSWORD, wrap)
        # The thief holds a KE2 it can test one guess against offline, and never finishes.
        captured_ke2(node, token)
        wrong_guesses(thief, 4)
        # The owner's periodic check succeeds: the thief's five attempts stay counted.
        check = owner.login(PASSWORD)
        assert check.wrapped_secret == SECRET
        assert check.counted == 5 and check.attempts_left == 5 and check.forgiven == 0
        assert check.counted_since is not None and check.counted_since <= time.time()
        status = owner.status()
        assert status["attempts_used"] == 5 and status["counted_since"] == check.counted_since
        # So the thief has 5 guesses left in all, not a fresh 9 after each check.
        wrong_guesses(thief, 4)
        assert owner.login(PASSWORD).attempts_left == 1
        # (the pending captured login still counts; its last guess would erase the record)
        with pytest.raises(VaultRefused) as last:
            thief.login(b"a wrong guess")
        assert last.value.status in (403, 410)
        assert owner.status()["attempts_left"] == 0


def test_a_success_forgives_only_the_ids_its_client_was_given(node: VaultNode) -> None:
    token = node.add_account("ana")
    other_token = node.add_account("bea")
    with (
        VaultClient(node.url, token, CONFIG) as owner,
        VaultClient(node.url, other_token, CONFIG) as bea,
    ):
        owner.register(PASSWORD, wrap)
        bea.register(PASSWORD, wrap)
        mine = wrong_guesses(owner, 3)
        theirs = wrong_guesses(owner, 2)  # stands for attempts the client did not keep
        beas = wrong_guesses(bea, 2)
        result = owner.login(
            PASSWORD, earlier_login_ids=[*mine, *beas, "z" * 32, "not-a-real-login-id-at-all"]
        )
        assert result.forgiven == 3 and result.counted == 2 and result.attempts_left == 8
        # Presenting them again forgives nothing more; Bea's stay counted on her record.
        again = owner.login(PASSWORD, earlier_login_ids=[*mine, *theirs[:1]])
        assert again.forgiven == 1 and again.counted == 1
        assert bea.status()["attempts_used"] == 2
        events = [e for e in owner.audit() if e["event"] == "login_succeeded"]
        assert "forgave 3 earlier attempts" in events[-2]["detail"]


def test_the_rolling_cap_counts_wrong_guesses_across_successes(node: VaultNode) -> None:
    token = node.add_account("ana")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(PASSWORD, wrap)
        for _ in range(2):  # 2 x 6 wrong guesses, each time forgiven by a success
            ids = wrong_guesses(vc, 6)
            result = vc.login(PASSWORD, earlier_login_ids=ids)
            assert result.forgiven == 6
        status = vc.status()
        assert status["wrong_guesses_in_window"] == 12 and status["guess_cap"] == 14
        assert status["attempts_left"] == 2 and status["guess_cap_days"] == 365
        wrong_guesses(vc, 1)
        with pytest.raises(VaultRefused) as last:
            vc.login(b"a wrong guess")
        assert last.value.status == 410 and last.value.code == "record_erased"
        assert vc.status()["exists"] is False
        erased = [e for e in vc.audit() if e["event"] == "record_erased"]
        assert "14 wrong guesses within 365 days" in erased[-1]["detail"]


def test_guesses_leave_the_cap_when_they_leave_the_window(tmp_path: Path) -> None:
    now = [1_000_000.0]
    service = VaultService(
        make_engine(f"sqlite:///{tmp_path / 'v.db'}"),
        FileSealer(tmp_path / "sealing.key"),
        max_attempts=3,
        clock=lambda: now[0],
        guess_cap=4,
        guess_cap_days=10,
    )
    service.start()

    def attempt(password: bytes, earlier: list[str]) -> tuple[str, bool]:
        ke1, state = client.generate_ke1(password)
        started = service.login_start("ana", ke1.to_bytes(), "test")
        try:
            ke3 = client.generate_ke3(state, KE2.from_bytes(started.ke2), CONFIG).ke3.to_bytes()
        except AuthenticationError:
            ke3 = bytes(64)
        try:
            service.login_finish("ana", started.login_id, ke3, "test", earlier)
        except WrongPassword:
            return started.login_id, False
        return started.login_id, True

    def cycle() -> None:
        ids = [attempt(b"wrong", [])[0] for _ in range(2)]
        assert attempt(PASSWORD, ids)[1]

    request, reg_state = client.create_registration_request(PASSWORD)
    started = service.registration_start("ana", request.to_bytes())
    record, _ = client.finalize_registration_request(
        reg_state, RegistrationResponse.from_bytes(started.response), CONFIG
    )
    service.registration_finish("ana", started.registration_id, record.to_bytes(), SECRET, "t")
    cycle()
    status = service.status("ana")
    assert (status.wrong_guesses_in_window, status.attempts_left) == (2, 2)
    now[0] += 11 * 86400  # the two wrong guesses leave the 10-day window
    status = service.status("ana")
    assert (status.wrong_guesses_in_window, status.attempts_left) == (0, 3)
    service.sweep()  # forgiven and successful attempts out of the window are dropped
    with service.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.attempts)).scalar() == 0
    cycle()  # had they stayed in the window, the fourth wrong guess would have erased
    status = service.status("ana")
    assert status.exists and status.wrong_guesses_in_window == 2
    assert attempt(b"wrong", [])[1] is False
    with pytest.raises(WrongPassword) as last:
        ke1, _ = client.generate_ke1(b"wrong")
        login = service.login_start("ana", ke1.to_bytes(), "test")
        service.login_finish("ana", login.login_id, bytes(64), "test")
    assert last.value.erased
    assert not service.status("ana").exists


def test_password_check_refuses_a_record_this_device_did_not_register(
    cli: Cli, tmp_path: Path, node: VaultNode
) -> None:
    token = node.add_account("ana")
    cli.env.update(
        BACKVAULT_REPO=str(tmp_path / "repo"),
        BACKVAULT_VAULT_URL=node.url,
        BACKVAULT_ACCOUNT="ana",
        BACKVAULT_VAULT_TOKEN=token,
    )
    env = {"BACKVAULT_PASSWORD": PASSWORD.decode()}
    cli.ok("init", "--password", env=env)
    assert cli.ok("--json", "password", "check", env=env).json()["record_is_ours"] is True
    # Someone holding the token registers a record of its own.
    with VaultClient(node.url, token, CONFIG) as thief:
        thief.register(b"the thief's password", wrap)
        before = thief.status()
        refused = cli.run("password", "check", env=env)
        assert refused.code == 14, refused.err
        assert "did not register" in refused.err and "revoke" in refused.err
        after = thief.status()
        assert after["attempts_used"] == before["attempts_used"] == 0  # no attempt spent
        assert [e["event"] for e in thief.audit()][-1] == "record_replaced"
    # A new password registers a record this device knows again.
    cli.ok(
        "password",
        "change",
        env={"BACKVAULT_KEY": "", **env, "BACKVAULT_NEW_PASSWORD": "another fine passphrase 7"},
    )
    good = cli.ok("password", "check", env={"BACKVAULT_PASSWORD": "another fine passphrase 7"})
    assert "right" in good.out


def test_password_check_reports_guesses_the_user_did_not_make(
    cli: Cli, tmp_path: Path, node: VaultNode
) -> None:
    token = node.add_account("ana")
    cli.env.update(
        BACKVAULT_REPO=str(tmp_path / "repo"),
        BACKVAULT_VAULT_URL=node.url,
        BACKVAULT_ACCOUNT="ana",
        BACKVAULT_VAULT_TOKEN=token,
    )
    env = {"BACKVAULT_PASSWORD": PASSWORD.decode()}
    cli.ok("init", "--password", env=env)
    assert cli.run("password", "check", env={"BACKVAULT_PASSWORD": "my own typo"}).code == 10
    with VaultClient(node.url, token, CONFIG) as thief:
        wrong_guesses(thief, 3)
    check = cli.ok("--json", "password", "check", env=env)
    doc = check.json()
    assert doc["forgiven"] == 1 and doc["others_counted"] == 3 and doc["attempts_left"] == 7
    text = cli.ok("password", "check", env=env)
    assert "3 wrong guesses you did not make since" in text.err
    assert "password change" in text.err


@dataclass
class LegacyVault:
    db: Path
    record: bytes
    key_file: Path
    token: str
    oprf_seed: bytes


def make_legacy_vault(
    tmp_path: Path, wrap_for: Callable[[bytes], bytes] = lambda _export_key: SECRET
) -> LegacyVault:
    """A database as the vault before per-registration credential identifiers left it:
    schema version 1, one record whose OPRF key derives from the account name."""
    db = tmp_path / "legacy.db"
    key_file = tmp_path / "keys" / "sealing.key"
    engine = make_engine(f"sqlite:///{db}")
    sealer = FileSealer(key_file)
    keys = opaque_server.generate_server_key_pair()
    seed = opaque_server.generate_oprf_seed()
    with engine.begin() as conn:
        schema.metadata.create_all(conn, tables=[schema.schema_version])
        schema.MIGRATIONS[0](conn)
        conn.execute(schema.schema_version.insert().values(version=1))
        token = "bvt_made-by-version-1-" + "a" * 20
        conn.execute(
            sa.text("INSERT INTO accounts (name, token_hash, created_at) VALUES ('ana', :h, 0)"),
            {"h": hash_token(token)},
        )
        conn.execute(
            schema.vault_keys.insert().values(
                id=1,
                sealed_oprf_seed=sealer.seal(seed, b"vault:oprf-seed"),
                sealed_server_private_key=sealer.seal(
                    keys.private_key, b"vault:server-private-key"
                ),
                sealed_fake_record_seed=sealer.seal(b"f" * 32, b"vault:fake-seed"),
                created_at=time.time(),
            )
        )
        request, state = client.create_registration_request(PASSWORD)
        response = opaque_server.create_registration_response(
            request, keys.public_key, legacy_credential_identifier("ana"), seed
        )
        record, export_key = client.finalize_registration_request(state, response, CONFIG)
        conn.execute(
            sa.text(
                "INSERT INTO records (account, generation, sealed_payload, attempts_used, "
                "max_attempts, created_at, updated_at) VALUES ('ana', 1, :p, 0, 10, 0, 0)"
            ),
            {"p": sealer.seal(record.to_bytes() + wrap_for(export_key), b"record:ana:1")},
        )
    engine.dispose()
    return LegacyVault(db, record.to_bytes(), key_file, token, seed)


def test_a_legacy_record_keeps_its_key_for_login_only(tmp_path: Path) -> None:
    from backvault.opaque import RegistrationRecord

    legacy = make_legacy_vault(tmp_path)
    db, record, key_file, token = legacy.db, legacy.record, legacy.key_file, legacy.token
    node = make_node(
        tmp_path / "vault",
        f"sqlite:///{db}",
        "--sealing-key-file",
        str(key_file),
        env={"BACKVAULT_SERVER_MAX_PENDING_REGISTRATIONS": "1000"},
    ).start()
    try:
        with VaultClient(node.url, token, CONFIG) as vc:
            status = vc.status()
            assert status["legacy_record"] is True
            assert status["fingerprint"] == RegistrationRecord.from_bytes(record).fingerprint()
            assert vc.login(PASSWORD).wrapped_secret == SECRET  # the old key still logs in
            # ... but nothing else evaluates under it.
            ke2 = captured_ke2(node, token)
            assert attack_with_registration_starts(node, token, ke2) == []
            vc.register(PASSWORD, wrap)  # what `password change` does
            assert vc.status()["legacy_record"] is False
            assert vc.login(PASSWORD).wrapped_secret == SECRET
    finally:
        node.stop()


def test_a_legacy_record_moves_to_a_fresh_key_at_the_first_successful_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the upgrade, a token holder collected OPRF evaluations of its guesses under
    the account-derived key (the old registration endpoint gave them freely). The owner's
    first login after the upgrade must make them useless, without fresh guesses for anyone."""
    from backvault.device.settings import VaultSettings
    from backvault.vaultclient.slots import PasswordSlots, wrap_slot_secret

    monkeypatch.setenv("BACKVAULT_CONFIG_DIR", str(tmp_path / "device"))
    slot_secret = secrets.token_bytes(32)
    legacy = make_legacy_vault(
        tmp_path, lambda export_key: wrap_slot_secret(export_key, slot_secret, "ana")
    )
    legacy_key = opaque_protocol.derive_oprf_key(
        legacy.oprf_seed, legacy_credential_identifier("ana")
    )
    harvested = []
    for guess in [b"guess-1", b"guess-2", PASSWORD]:  # what the old endpoint answered
        blind = group.random_scalar()
        harvested.append((guess, blind, oprf.blind_evaluate(legacy_key, oprf.blind(guess, blind))))
    node = make_node(
        tmp_path / "vault",
        f"sqlite:///{legacy.db}",
        "--sealing-key-file",
        str(legacy.key_file),
    ).start()
    try:
        server_key = server_public_key(node, legacy.token)

        def cracked(ke2: KE2) -> list[bytes]:
            return [g for g, b, e in harvested if guess_opens(g, b, e, ke2, server_key)]

        assert cracked(captured_ke2(node, legacy.token)) == [PASSWORD]  # the threat
        slots = PasswordSlots(VaultSettings(node.url, "ana", legacy.token), CONFIG)
        recovery = slots.recover(PASSWORD)
        assert recovery.secret == slot_secret and recovery.upgraded is True
        with VaultClient(node.url, legacy.token, CONFIG) as vc:
            status = vc.status()
            assert status["legacy_record"] is False
            assert status["attempts_used"] == 1  # the token holder's attempt stays counted
            assert "count kept" in vc.audit()[-1]["detail"]
        assert slots.check_record().ours is True
        assert cracked(captured_ke2(node, legacy.token)) == []  # the harvest is useless now
        again = slots.recover(PASSWORD)
        assert again.secret == slot_secret and again.upgraded is None
    finally:
        node.stop()


def sealed_bytes_in(db: Path) -> list[bytes]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT sealed_payload FROM records").fetchall()
        rows += conn.execute("SELECT sealed_state FROM logins").fetchall()
    return [bytes(r[0]) for r in rows]


def raw_files(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))


@pytest.mark.parametrize("how", ["erased at the limit", "deleted", "replaced"])
def test_an_erased_record_leaves_no_sealed_bytes_in_the_files(
    node: VaultNode, tmp_path: Path, how: str
) -> None:
    db = tmp_path / "vault.db"
    token = node.add_account("ana")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(PASSWORD, wrap, max_attempts=2)
        for _ in range(3):
            vc.login(PASSWORD)  # the record's row is rewritten several times
        login_id, _ = captured_login(node, token)  # its sealed state is in the files too
        secrets_before = sealed_bytes_in(db)
        assert len(secrets_before) == 2
        assert all(s in raw_files(db) for s in secrets_before)
        if how == "deleted":
            vc.delete_record()
        elif how == "replaced":
            vc.register(b"another password", wrap)
        else:
            with pytest.raises(VaultRefused):
                vc.login(b"wrong")
            with pytest.raises(VaultRefused) as erased:
                vc.login_finish(login_id, bytes(64))
            assert erased.value.status == 410
        raw = raw_files(db)
        for sealed in secrets_before:
            assert sealed not in raw
            assert sealed[13:45] not in raw  # not even a piece of the ciphertext
        assert (tmp_path / "vault.db-wal").stat().st_size == 0


def test_no_uncounted_path_in_the_http_api(node: VaultNode) -> None:
    """Every route that reads a blinded element is one of the two known ones."""
    spec = httpx.get(node.url + "/openapi.json").json()
    takes_elements = {
        path
        for path, methods in spec["paths"].items()
        for op in methods.values()
        if "requestBody" in op
        and any(
            name in ("registration_request", "ke1")
            for name in spec["components"]["schemas"][
                op["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
            ]["properties"]
        )
    }
    assert takes_elements == {"/v1/registration/start", "/v1/login/start"}


def test_the_database_holds_no_login_id(node: VaultNode, tmp_path: Path) -> None:
    """A reader of the database cannot finish, spoil or claim someone's pending login."""
    token = node.add_account("ana")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(PASSWORD, wrap)
        login_id, _ = captured_login(node, token)
        with pytest.raises(VaultRefused):
            vc.login(b"a wrong guess")
    raw = raw_files(tmp_path / "vault.db")
    assert login_id.encode() not in raw
    with sqlite3.connect(tmp_path / "vault.db") as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM logins UNION SELECT id FROM attempts")]
    assert ids and login_id not in ids
    with VaultClient(node.url, token, CONFIG) as vc, pytest.raises(VaultRefused) as refused:
        vc.login_finish(ids[0], bytes(64))  # a key from the database is not a login id
    assert refused.value.status == 404


def test_account_names_end_where_they_seem_to() -> None:
    from backvault.vault.accounts import check_account_name
    from backvault.vault.outcomes import BadRequest

    for name in ("alice\n", "alice\nbob", "\nalice", "alice "):
        with pytest.raises(BadRequest):
            check_account_name(name)
    assert check_account_name("alice") == "alice"


def test_an_erased_records_sealed_payload_does_not_fit_a_later_record(tmp_path: Path) -> None:
    """Someone who can write the database (not the key) puts back the sealed payload of an
    erased record, from an old backup, into the row of the account's next record."""
    from backvault.vault.sealing import SealingError

    service = VaultService(
        make_engine(f"sqlite:///{tmp_path / 'v.db'}"), FileSealer(tmp_path / "sealing.key")
    )
    service.start()

    def register(password: bytes) -> None:
        request, state = client.create_registration_request(password)
        started = service.registration_start("ana", request.to_bytes())
        record, _ = client.finalize_registration_request(
            state, RegistrationResponse.from_bytes(started.response), CONFIG
        )
        service.registration_finish("ana", started.registration_id, record.to_bytes(), SECRET, "t")

    def row() -> tuple[bytes, int]:
        with service.engine.connect() as conn:
            found = conn.execute(
                sa.select(schema.records.c.sealed_payload, schema.records.c.generation)
            ).one()
        return bytes(found[0]), int(found[1])

    register(PASSWORD)
    old_payload, old_generation = row()
    service.delete_record("ana", "t")
    register(b"a new password")
    _, generation = row()
    assert generation != old_generation
    with service.engine.begin() as conn:
        conn.execute(schema.records.update().values(sealed_payload=old_payload))
    ke1, _ = client.generate_ke1(PASSWORD)
    with pytest.raises(SealingError):  # the old payload does not open as the new record's
        service.login_start("ana", ke1.to_bytes(), "t")


def test_the_legacy_move_keeps_the_count_of_the_record_logged_into_or_nothing(
    tmp_path: Path,
) -> None:
    """Round two of the red team: the owner's client logs in to a legacy record, then (before
    it registers the record again with keep_count) a token holder deletes or replaces the
    record, so that the owner's same password would be registered with a fresh count."""
    legacy = make_legacy_vault(tmp_path)
    node = make_node(
        tmp_path / "vault", f"sqlite:///{legacy.db}", "--sealing-key-file", str(legacy.key_file)
    ).start()
    try:
        with (
            VaultClient(node.url, legacy.token, CONFIG) as owner,
            VaultClient(node.url, legacy.token, CONFIG) as thief,
        ):
            wrong_guesses(thief, 4)
            logged_in = owner.login(PASSWORD)
            assert logged_in.legacy_record and logged_in.counted == 4
            thief.register(b"the thief's own password", wrap)  # between login and move
            with pytest.raises(VaultRefused) as changed:
                owner.register(PASSWORD, wrap, keep_count=True, replaces=logged_in.fingerprint)
            assert changed.value.status == 409 and changed.value.code == "record_changed"
            thief.delete_record()
            with pytest.raises(VaultRefused) as gone:
                owner.register(PASSWORD, wrap, keep_count=True, replaces=logged_in.fingerprint)
            assert gone.value.code == "record_changed"
            assert owner.status()["exists"] is False  # nothing was registered
            with pytest.raises(VaultRefused):
                owner.register(PASSWORD, wrap, keep_count=True)  # keep_count needs replaces
    finally:
        node.stop()


def test_the_cap_is_the_accounts_not_the_records(node: VaultNode) -> None:
    """Erasing, deleting or replacing a record does not reset the cap (14 here): the same
    password registered again gets only what is left of it."""
    token = node.add_account("ana")
    with (
        VaultClient(node.url, token, CONFIG) as owner,
        VaultClient(node.url, token, CONFIG) as thief,
    ):
        owner.register(PASSWORD, wrap)
        wrong_guesses(thief, 9)
        thief.delete_record()
        owner.register(PASSWORD, wrap)  # the owner turns the password on again
        status = owner.status()
        assert status["wrong_guesses_in_window"] == 9 and status["attempts_left"] == 5
        wrong_guesses(thief, 4)
        with pytest.raises(VaultRefused) as erased:
            thief.login(b"a wrong guess")
        assert erased.value.status == 410  # 14 in all on this password, not 19
        with pytest.raises(VaultRefused) as refused:
            owner.register(PASSWORD, wrap)
        assert refused.value.status == 423 and refused.value.code == "guess_cap_reached"
        assert "64-digit key" in refused.value.message


def test_a_vault_that_accepts_an_unverified_login_is_not_believed(
    node: VaultNode, tmp_path: Path
) -> None:
    """Whoever answers for the vault says "success" to a login the client could not
    verify (its KE3 is all zeros): the client must not use what it sends."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    token = node.add_account("ana")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(PASSWORD, wrap)

    class LyingVault(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/login/finish":
                answer = {
                    "wrapped_secret": base64.b64encode(b"x" * 61).decode(),
                    "attempts_left": 10,
                    "forgiven": 0,
                    "counted": 0,
                    "counted_since": None,
                    "legacy_record": True,
                    "max_attempts": 10,
                    "fingerprint": "00" * 32,
                }
                data, status = json.dumps(answer).encode(), 200
            else:
                real = httpx.post(
                    node.url + self.path,
                    content=body,
                    headers={
                        "Authorization": self.headers["Authorization"],
                        "Content-Type": "application/json",
                    },
                )
                data, status = real.content, real.status_code
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), LyingVault)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with VaultClient(url, token, CONFIG) as lied_to, pytest.raises(VaultRefused) as caught:
            lied_to.login(b"not the password")
        assert caught.value.code == "vault_misbehaved"
    finally:
        server.shutdown()


def test_the_token_api_shows_networks_and_filters_events(node: VaultNode) -> None:
    token = node.add_account("ana")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(PASSWORD, wrap)
        wrong_guesses(vc, 1)
        for _ in range(30):  # uncounted events that could push the failures out of view
            vc.registration_start(client.create_registration_request(b"x")[0].to_bytes())
    answer = httpx.get(
        node.url + "/v1/audit",
        params=[("limit", "5"), ("event", "login_failed"), ("event", "login_started")],
        headers={"Authorization": f"Bearer {token}"},
    ).json()["events"]
    assert [e["event"] for e in answer] == ["login_started", "login_failed"]
    assert {e["client"] for e in answer} == {"127.0.0.0/24"}
