"""The Backup Key Vault as a real server process on loopback: flows, the exact guess
limit, fake answers, bad input, tokens, expiry and single use, sealing at rest."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backvault.opaque import IdentityKSF, OpaqueConfig, client
from backvault.vaultclient.http import VaultClient, VaultRefused
from tests.servers import VaultNode, make_node

CONFIG = OpaqueConfig(ksf=IdentityKSF())  # the KSF runs on the client only
SECRET = b"S" * 48


def wrap(_export_key: bytes) -> bytes:
    return SECRET


@pytest.fixture
def node(tmp_path: Path) -> Iterator[VaultNode]:
    vault = make_node(tmp_path / "vault", f"sqlite:///{tmp_path / 'vault.db'}").start()
    yield vault
    assert vault.stop() == 0, "graceful shutdown"


def vault_client(node: VaultNode, token: str) -> VaultClient:
    return VaultClient(node.url, token, CONFIG)


def test_register_login_and_the_guess_limit(node: VaultNode) -> None:
    token = node.add_account("alice")
    with vault_client(node, token) as vc:
        assert vc.status()["exists"] is False
        vc.register(b"correct horse", wrap)
        assert vc.status() == {
            **vc.status(),
            "exists": True,
            "attempts_used": 0,
            "attempts_left": 10,
            "max_attempts": 10,
        }
        result = vc.login(b"correct horse")
        assert result.wrapped_secret == SECRET
        lefts = []
        mine: list[str] = []
        for _ in range(9):
            with pytest.raises(VaultRefused) as refused:
                vc.login(b"wrong", on_started=mine.append)
            assert refused.value.status == 403 and refused.value.code == "wrong_password"
            lefts.append(refused.value.attempts_left)
        assert lefts == [9, 8, 7, 6, 5, 4, 3, 2, 1]
        # A successful login forgives the wrong tries its client proves were its own.
        success = vc.login(b"correct horse", earlier_login_ids=mine)
        assert success.wrapped_secret == SECRET and success.forgiven == 9
        assert success.attempts_left == 10 and success.counted == 0
        assert vc.status()["attempts_left"] == 10
        for _ in range(9):
            with pytest.raises(VaultRefused):
                vc.login(b"wrong")
        with pytest.raises(VaultRefused) as last:
            vc.login(b"wrong")
        assert last.value.status == 410 and last.value.code == "record_erased"
        assert vc.status()["exists"] is False
        # After erasure even the right password gets nothing (a fake answer, then 403).
        with pytest.raises(VaultRefused) as gone:
            vc.login(b"correct horse")
        assert gone.value.status == 403 and gone.value.attempts_left is None
        events = [e["event"] for e in vc.audit()]
        assert events.count("login_started") == 22 and events.count("login_failed") == 20
        assert events[-4:-2] == ["login_failed", "record_erased"]
        assert all(e["client"] in ("127.0.0.0/24", "vault") for e in vc.audit())


def test_unknown_account_gets_a_fake_ke2_of_the_same_shape(node: VaultNode) -> None:
    with vault_client(node, node.add_account("nobody-registered")) as vc:
        ke1, _ = client.generate_ke1(b"pw")
        login_id, ke2 = vc.login_start(ke1.to_bytes())
        assert len(ke2) == 320 and login_id
        # The same account gets a consistent fake record: same masked-response length,
        # evaluated element from the same OPRF key (stable per account).
        _, ke2_again = vc.login_start(ke1.to_bytes())
        assert ke2[:32] == ke2_again[:32]
        with pytest.raises(VaultRefused) as refused:
            vc.login_finish(login_id, bytes(64))
        assert refused.value.status == 403


def test_login_state_is_single_use_and_expires(tmp_path: Path) -> None:
    vault = make_node(
        tmp_path / "v", f"sqlite:///{tmp_path / 'v.db'}", env={"BACKVAULT_SERVER_LOGIN_TTL": "1"}
    ).start()
    try:
        with vault_client(vault, vault.add_account("bob")) as vc:
            vc.register(b"pw", wrap)
            ke1, state = client.generate_ke1(b"pw")
            login_id, ke2 = vc.login_start(ke1.to_bytes())
            from backvault.opaque import KE2

            ke3 = client.generate_ke3(state, KE2.from_bytes(ke2), CONFIG).ke3.to_bytes()
            assert vc.login_finish(login_id, ke3).wrapped_secret == SECRET
            with pytest.raises(VaultRefused) as again:
                vc.login_finish(login_id, ke3)
            assert again.value.status == 404
            ke1, state = client.generate_ke1(b"pw")
            login_id, ke2 = vc.login_start(ke1.to_bytes())
            time.sleep(1.5)
            ke3 = client.generate_ke3(state, KE2.from_bytes(ke2), CONFIG).ke3.to_bytes()
            with pytest.raises(VaultRefused) as late:
                vc.login_finish(login_id, ke3)
            assert late.value.status == 404 and "expired" in late.value.message
            assert vc.status()["attempts_used"] == 1  # the late attempt still counted
    finally:
        vault.stop()


def test_bad_tokens_and_bad_bodies_get_clear_4xx(node: VaultNode) -> None:
    token = node.add_account("carol")
    post = lambda path, **kw: httpx.post(node.url + path, timeout=10, **kw)  # noqa: E731
    ke1 = base64.b64encode(client.generate_ke1(b"x")[0].to_bytes()).decode()
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Bearer {token}x"},
    ):
        response = post("/v1/login/start", json={"ke1": ke1}, headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    auth = {"Authorization": f"Bearer {token}"}
    big = post(
        "/v1/login/start",
        content=b"{" + b" " * 100_000 + b"}",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"
    assert (
        post(
            "/v1/login/start",
            content=b"{not json",
            headers={**auth, "Content-Type": "application/json"},
        ).status_code
        == 422
    )
    assert post("/v1/login/start", json={"ke1": ke1, "extra": 1}, headers=auth).status_code == 422
    short_b64 = post("/v1/login/start", json={"ke1": "AAA"}, headers=auth)
    assert short_b64.status_code == 422 and short_b64.json()["message"].startswith("ke1:")
    wrong_size = post(
        "/v1/registration/start", json={"registration_request": "A" * 42 + "=="}, headers=auth
    )
    assert (
        wrong_size.status_code == 400
        and "expected 32 bytes, got 31" in wrong_size.json()["message"]
    )
    identity = base64.b64encode(bytes(96)).decode()
    malformed = post("/v1/login/start", json={"ke1": identity}, headers=auth)
    assert malformed.status_code == 400 and "identity" in malformed.json()["message"]
    zero_record = base64.b64encode(bytes(192)).decode()
    bad_record = post(
        "/v1/registration/finish",
        json={"registration_id": "r" * 32, "record": zero_record, "wrapped_secret": "AAAA"},
        headers=auth,
    )
    assert bad_record.status_code == 400 and "identity" in bad_record.json()["message"]


def test_delete_record(node: VaultNode) -> None:
    with vault_client(node, node.add_account("erin")) as vc:
        vc.register(b"pw", wrap)
        vc.delete_record()
        assert vc.status()["exists"] is False
        assert vc.audit()[-1]["event"] == "record_deleted"


def test_health_readiness_and_openapi(node: VaultNode) -> None:
    assert httpx.get(node.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(node.url + "/readyz").status_code == 200
    spec = httpx.get(node.url + "/openapi.json").json()
    assert {"/v1/login/start", "/v1/login/finish", "/v1/record", "/v1/audit"} <= set(spec["paths"])


def test_logs_are_json_and_hold_no_secrets(node: VaultNode) -> None:
    token = node.add_account("frank")
    with vault_client(node, token) as vc:
        vc.register(b"hunter2-password", wrap)
        vc.login(b"hunter2-password")
    node.stop()
    lines = [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]
    assert any(entry.get("event") == "login_succeeded" for entry in lines)
    text = node.log.read_text()
    for secret in (token, "hunter2", base64.b64encode(SECRET).decode(), SECRET.decode()):
        assert secret not in text


def test_database_dump_holds_no_secret_in_clear(node: VaultNode, tmp_path: Path) -> None:
    from backvault.vault.sealing import FileSealer

    with vault_client(node, node.add_account("gina")) as vc:
        export_key = vc.register(b"pw", wrap).export_key
        vc.login(b"pw")
    db = sqlite3.connect(tmp_path / "vault.db")
    dump = "\n".join(db.iterdump()).encode()
    raw = (tmp_path / "vault.db").read_bytes()
    sealer = FileSealer(node.sealing_key, create=False)
    row = db.execute(
        "SELECT sealed_oprf_seed, sealed_server_private_key FROM vault_keys"
    ).fetchone()
    oprf_seed = sealer.open(row[0], b"vault:oprf-seed")
    private_key = sealer.open(row[1], b"vault:server-private-key")
    record = db.execute("SELECT sealed_payload, generation FROM records").fetchone()
    payload = sealer.open(record[0], f"record:gina:{record[1]}".encode())
    for secret in (oprf_seed, private_key, payload[:192], SECRET, export_key):
        for blob in (dump, raw):
            assert secret not in blob
            assert secret.hex().encode() not in blob.lower()
            assert base64.b64encode(secret) not in blob


def test_schemathesis_finds_no_server_error_or_schema_violation(node: VaultNode) -> None:
    """Property-based requests from the OpenAPI spec. Every check runs except
    `positive_data_acceptance`: a schema-valid base64 string of the right length is rarely a
    valid group element, and the vault must reject those with 400."""
    import subprocess
    import sys
    from pathlib import Path as _Path

    token = node.add_account("fuzz")
    schemathesis = _Path(sys.executable).parent / "schemathesis"
    proc = subprocess.run(
        [
            str(schemathesis),
            "run",
            node.url + "/openapi.json",
            "-H",
            f"Authorization: Bearer {token}",
            "-n",
            "40",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--seed",
            "20261127",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "passed" in proc.stdout
    assert "server error" not in proc.stdout.lower()
