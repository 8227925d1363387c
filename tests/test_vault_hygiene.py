"""The vault's own hygiene, on real vault processes: private database files from the
start, the sealing key kept out of the database's folder (and said so at first start),
audit retention and truncated client addresses, /readyz without sealing, the nonce-budget
warning, a weak HSM key refused at start, and /metrics."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backvault.opaque import IdentityKSF, OpaqueConfig
from backvault.vault.api.middleware import truncated_address
from backvault.vault.sealing import FileSealer
from backvault.vaultclient.http import VaultClient, VaultRefused
from tests.servers import (
    SoftHsm,
    VaultNode,
    free_port,
    make_node,
    softhsm_in_this_process,
    softhsm_token,
)

CONFIG = OpaqueConfig(ksf=IdentityKSF())
SECRET = b"S" * 48
DAY = 86400


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def data_node(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> VaultNode:
    """A node whose SQLite database sits in its data folder (the default layout)."""
    return make_node(tmp, f"sqlite:///{tmp / 'data' / 'vault.db'}", *extra, env=env)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """Files are created under the common umask 022: without care they would be 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def scrape(url: str, **headers: str) -> dict[str, float]:
    response = httpx.get(url, headers=headers)
    assert response.status_code == 200, response.text
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# --- files ------------------------------------------------------------------------------


def test_database_files_are_private_and_the_key_lives_elsewhere(tmp_path: Path) -> None:
    node = data_node(tmp_path / "v").start()
    data = tmp_path / "v" / "data"
    database = data / "vault.db"
    try:
        with VaultClient(node.url, node.add_account("ada"), CONFIG) as vc:
            vc.register(b"pw", lambda _k: SECRET)  # writes: the -wal and -shm files exist
            assert (data / "vault.db-wal").exists() and (data / "vault.db-shm").exists()
            for name in ("vault.db", "vault.db-wal", "vault.db-shm"):
                assert mode(data / name) == 0o600, name
            assert mode(data) == 0o700
    finally:
        node.stop()
    key = node.sealing_key
    assert key.exists() and key.parent != data
    assert (mode(key), mode(key.parent)) == (0o600, 0o700)
    assert not list(data.glob("sealing.key*"))
    # First start says where both are and that they are backed up apart, once.
    note = (
        f"first start: the database is {database} and the sealing key is {key}. Back them "
        "up separately"
    )
    assert node.log.read_text().count(note) == 2  # printed, and logged
    node.start()
    node.stop()
    assert node.log.read_text().count(note) == 2


def test_loose_permissions_are_tightened_at_start_and_logged(tmp_path: Path) -> None:
    node = data_node(tmp_path / "v").start()
    node.stop()
    data = tmp_path / "v" / "data"
    os.chmod(data, 0o755)
    os.chmod(data / "vault.db", 0o644)
    node.start()
    node.stop()
    assert mode(data) == 0o700 and mode(data / "vault.db") == 0o600
    log = node.log.read_text()
    assert f"{data / 'vault.db'} was mode 0644; now 0600" in log
    assert f"{data} was mode 0755; now 0700" in log


def test_a_key_in_the_database_folder_keeps_working_with_a_warning(tmp_path: Path) -> None:
    """A deployment made when the key's default place was the data folder."""
    data = tmp_path / "v" / "data"
    data.mkdir(parents=True, mode=0o700)
    FileSealer(data / "sealing.key")
    node = data_node(tmp_path / "v").start()
    try:
        with VaultClient(node.url, node.add_account("old"), CONFIG) as vc:
            vc.register(b"pw", lambda _k: SECRET)
            assert vc.login(b"pw").wrapped_secret == SECRET
    finally:
        node.stop()
    assert not node.sealing_key.exists()  # no second key was made
    db = sqlite3.connect(data / "vault.db")
    sealed = db.execute("SELECT sealed_oprf_seed FROM vault_keys").fetchone()[0]
    db.close()
    FileSealer(data / "sealing.key", create=False).open(sealed, b"vault:oprf-seed")
    assert (
        f"the sealing key {data / 'sealing.key'} is in the database's folder {data}: a backup "
        "of that folder holds both" in node.log.read_text()
    )


# --- audit ------------------------------------------------------------------------------


def test_audit_events_past_retention_are_deleted(tmp_path: Path) -> None:
    node = data_node(tmp_path / "v", env={"BACKVAULT_SERVER_AUDIT_RETENTION_DAYS": "400"})
    node.start()
    token = node.add_account("eve")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(b"pw", lambda _k: SECRET)
        with pytest.raises(VaultRefused):
            vc.login(b"a wrong guess")  # an attempt that stays counted, with its address
    node.stop()
    now = time.time()
    db = sqlite3.connect(tmp_path / "v" / "data" / "vault.db")
    db.execute("UPDATE audit SET at = ?", (now - 401 * DAY,))
    db.execute("UPDATE attempts SET started_at = ?", (now - 401 * DAY,))
    db.execute(
        "INSERT INTO audit (account, at, event, client, attempts_left, detail) "
        "VALUES ('eve', ?, 'login_started', '127.0.0.1', 9, 'recent enough')",
        (now - 399 * DAY,),
    )
    db.commit()
    db.close()
    node.start()
    try:
        with VaultClient(node.url, token, CONFIG) as vc:
            deadline = time.time() + 30
            while time.time() < deadline and len(vc.audit()) > 1:
                time.sleep(0.2)
            assert [e["detail"] for e in vc.audit()] == ["recent enough"]
    finally:
        node.stop()
    assert '"msg": "audit retention", "deleted": 4' in node.log.read_text()
    # The attempt still counts, but its client address went with the retention period.
    db = sqlite3.connect(tmp_path / "v" / "data" / "vault.db")
    assert db.execute("SELECT client, outcome FROM attempts").fetchall() == [("", "failed")]
    db.close()


def test_truncated_addresses_are_networks() -> None:
    assert truncated_address("203.0.113.77") == "203.0.113.0/24"
    assert truncated_address("2001:db8:abcd:12:1::7") == "2001:db8:abcd::/48"
    assert truncated_address("::ffff:203.0.113.77") == "203.0.113.0/24"
    assert truncated_address("unknown") == "unknown"


def test_the_vault_can_store_truncated_client_addresses(tmp_path: Path) -> None:
    node = data_node(tmp_path / "v", env={"BACKVAULT_SERVER_TRUNCATE_CLIENT_ADDRESSES": "true"})
    node.start()
    try:
        with VaultClient(node.url, node.add_account("tia"), CONFIG) as vc:
            vc.register(b"pw", lambda _k: SECRET)
            vc.login(b"pw")
            vc.login_start(_ke1())  # a pending login keeps its client too
            events = vc.audit()
    finally:
        node.stop()
    assert {e["client"] for e in events} == {"127.0.0.0/24"}
    raw = b"".join(
        p.read_bytes() for p in (tmp_path / "v" / "data").iterdir() if p.name.startswith("vault")
    )
    assert b"127.0.0.0/24" in raw and b"127.0.0.1" not in raw
    assert "127.0.0.1" not in "\n".join(
        line for line in node.log.read_text().splitlines() if '"client"' in line
    )


def _ke1() -> bytes:
    from backvault.opaque import client

    return client.generate_ke1(b"guess")[0].to_bytes()


# --- readiness, nonce budget ----------------------------------------------------------------


def test_readyz_seals_nothing(tmp_path: Path) -> None:
    node = data_node(tmp_path / "v").start()
    try:
        before = scrape(node.url + "/metrics")
        for _ in range(5):
            assert httpx.get(node.url + "/readyz").status_code == 200
        after = scrape(node.url + "/metrics")
    finally:
        node.stop()
    for operation in ("seal", "open"):
        series = f'backvault_vault_sealing_operations_total{{operation="{operation}",outcome="ok"}}'
        assert after[series] == before[series]
    assert (
        after[
            'backvault_vault_http_request_duration_seconds_count{method="GET",route="/readyz",status="2xx"}'
        ]
        >= 5
    )


def test_a_key_version_near_its_nonce_bound_warns(tmp_path: Path) -> None:
    env = {"BACKVAULT_SERVER_SWEEP_EVERY": "0.2"}
    node = data_node(tmp_path / "v", env=env).start()
    with VaultClient(node.url, node.add_account("nia"), CONFIG) as vc:
        vc.register(b"pw", lambda _k: SECRET)
    node.stop()
    db = sqlite3.connect(tmp_path / "v" / "data" / "vault.db")
    assert (
        db.execute("SELECT seals FROM sealing_key_usage WHERE key_version = 1").fetchone()[0] >= 4
    )
    db.execute("UPDATE sealing_key_usage SET seals = ? WHERE key_version = 1", (2**31,))
    db.commit()
    db.close()
    node.start()
    try:
        samples = scrape(node.url + "/metrics")
    finally:
        node.stop()
    assert samples['backvault_vault_sealing_key_seals{key_version="1"}'] >= 2**31
    assert samples["backvault_vault_sealing_key_current_version"] == 1
    assert "run `backvault vault rotate-sealing-key` soon" in node.log.read_text()


# --- HSM -----------------------------------------------------------------------------------


def test_a_weak_hsm_key_is_refused_until_rotated_to_a_safe_one(tmp_path: Path) -> None:
    """The key as `init-hsm` made it until now (python-pkcs11's defaults for AES: it may
    also wrap, unwrap, sign and verify, and is modifiable): `vault serve` refuses it in one
    line naming the attribute; the rotation it points to makes a safe version 2."""
    import pkcs11
    from pkcs11 import KeyType

    with softhsm_token(tmp_path / "hsm", ceremony=False) as token:
        with softhsm_in_this_process(token):
            session = _login(pkcs11, token)
            session.generate_key(KeyType.AES, 256, label="backvault-sealing", store=True)
            session.close()
        node = data_node(
            tmp_path / "v",
            "--sealing",
            "pkcs11",
            "--pkcs11-token-label",
            token.token_label,
            "--pkcs11-pin-file",
            str(token.pin_file),
            env=token.env,
        )

        def operator(*args: str) -> subprocess.CompletedProcess[str]:
            command = node.command(args[0], *node.args, *args[1:])
            return subprocess.run(command, env=node.env, capture_output=True, text=True)

        refused = operator("serve", "--listen", f"127.0.0.1:{free_port()}")
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1] == (
            "backvault: sealing: the HSM sealing key version 1 has CKA_WRAP=true; a sealing "
            "key must have CKA_WRAP=false. Make a new key version with safe attributes and "
            "move every value to it: `backvault vault rotate-sealing-key` (see the operator "
            "guide)"
        )
        rotated = operator("rotate-sealing-key")
        assert rotated.returncode == 0, rotated.stderr
        assert "created sealing key version 2" in rotated.stdout
        node.start()
        try:
            assert httpx.get(node.url + "/readyz").status_code == 200
        finally:
            node.stop()
        assert "the HSM sealing key version 1 has CKA_WRAP=true" in node.log.read_text()
        destroyed = operator("destroy-sealing-key", "1")
        assert destroyed.returncode == 0, destroyed.stderr


def _login(pkcs11: object, token: SoftHsm) -> object:
    found = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label=token.token_label)  # type: ignore[attr-defined]
    return found.open(user_pin=token.pin, rw=True)


# --- metrics -------------------------------------------------------------------------------


def test_metrics_count_logins_without_naming_anyone(tmp_path: Path) -> None:
    node = data_node(tmp_path / "v").start()
    account = "zoe.metrics-account"
    try:
        token = node.add_account(account)
        with VaultClient(node.url, token, CONFIG) as vc:
            vc.register(b"right password", lambda _k: SECRET)
            vc.login(b"right password")
            with pytest.raises(VaultRefused):
                vc.login(b"wrong password")
        httpx.get(node.url + f"/v1/{account}/probe")  # an unknown path naming the account
        response = httpx.get(node.url + "/metrics")
    finally:
        node.stop()
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples = scrape_text(text)
    events = "backvault_vault_audit_events_total"
    assert samples[f'{events}{{event="login_started"}}'] == 2
    assert samples[f'{events}{{event="login_succeeded"}}'] == 1
    assert samples[f'{events}{{event="login_failed"}}'] == 1
    assert samples[f'{events}{{event="login_refused"}}'] == 0
    assert samples[f'{events}{{event="record_erased"}}'] == 0
    latency = "backvault_vault_http_request_duration_seconds_count"
    assert samples[f'{latency}{{method="POST",route="/v1/login/start",status="2xx"}}'] == 2
    assert samples[f'{latency}{{method="POST",route="/v1/login/finish",status="2xx"}}'] == 1
    assert samples[f'{latency}{{method="POST",route="/v1/login/finish",status="4xx"}}'] == 1
    assert samples[f'{latency}{{method="GET",route="unmatched",status="4xx"}}'] == 1
    sealing = "backvault_vault_sealing_operations_total"
    assert samples[f'{sealing}{{operation="seal",outcome="ok"}}'] >= 3
    assert samples[f'{sealing}{{operation="open",outcome="ok"}}'] >= 3
    for private in (account, "zoe", token, "127.0.0.1", "probe", "password"):
        assert private not in text


def scrape_text(text: str) -> dict[str, float]:
    pattern = re.compile(r"^(\S+) (\S+)$")
    return {
        m.group(1): float(m.group(2))
        for line in text.splitlines()
        if (m := pattern.match(line)) and not line.startswith("#")
    }


def test_metrics_can_need_a_token_move_to_another_port_or_be_off(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("a-long-metrics-scrape-token\n")
    guarded = data_node(
        tmp_path / "a", env={"BACKVAULT_SERVER_METRICS_TOKEN_FILE": str(token_file)}
    ).start()
    try:
        refused = httpx.get(guarded.url + "/metrics")
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        wrong = httpx.get(guarded.url + "/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        scrape(guarded.url + "/metrics", Authorization="Bearer a-long-metrics-scrape-token")
    finally:
        guarded.stop()

    port = free_port()
    moved = data_node(
        tmp_path / "b", env={"BACKVAULT_SERVER_METRICS_LISTEN": f"127.0.0.1:{port}"}
    ).start()
    try:
        assert httpx.get(moved.url + "/metrics").status_code == 404
        assert "backvault_vault_audit_events_total" in "".join(
            scrape(f"http://127.0.0.1:{port}/metrics")
        )
    finally:
        moved.stop()

    off = data_node(tmp_path / "c", env={"BACKVAULT_SERVER_METRICS": "false"}).start()
    try:
        assert httpx.get(off.url + "/metrics").status_code == 404
    finally:
        off.stop()
