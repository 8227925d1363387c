"""Several vault nodes on one PostgreSQL, with records sealed by a SoftHSM2 token: the
guess limit is exact under concurrency, logins move between nodes, and a crash between
start and finish still counts."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from backvault.opaque import KE2, IdentityKSF, OpaqueConfig, client
from backvault.vaultclient.http import VaultClient, VaultRefused
from tests.servers import (
    Postgres,
    SoftHsm,
    VaultNode,
    make_node,
    postgres_cluster,
    softhsm_in_this_process,
    softhsm_token,
)

CONFIG = OpaqueConfig(ksf=IdentityKSF())
SECRET = b"K" * 40


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def hsm(tmp_path: Path) -> Iterator[SoftHsm]:
    with softhsm_token(tmp_path / "hsm") as token:
        yield token


def hsm_node(tmp: Path, db: str, hsm: SoftHsm, **env: str) -> VaultNode:
    return make_node(
        tmp,
        db,
        "--sealing",
        "pkcs11",
        "--pkcs11-token-label",
        hsm.token_label,
        "--pkcs11-pin-file",
        str(hsm.pin_file),
        env={**hsm.env, **env},
    )


@pytest.fixture
def cluster(tmp_path: Path, pg: Postgres, hsm: SoftHsm) -> Iterator[list[VaultNode]]:
    db = pg.new_database("v" + secrets.token_hex(4))
    nodes = [hsm_node(tmp_path / f"node{i}", db, hsm) for i in range(3)]
    # Started together: migrations and key creation must not race. A node that fails to
    # start fails the fixture (an exception in a thread would only be a warning).
    with ThreadPoolExecutor(len(nodes)) as pool:
        started = [pool.submit(n.start) for n in nodes]
    try:
        for future in started:
            future.result()
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    yield nodes
    for n in nodes:
        n.stop()


def test_200_concurrent_wrong_guesses_over_three_nodes_count_exactly_10(
    cluster: list[VaultNode],
) -> None:
    token = cluster[0].add_account("target")
    with VaultClient(cluster[1].url, token, CONFIG) as vc:
        vc.register(b"the real password", lambda _k: SECRET)
    ke1s = [client.generate_ke1(b"guess %d" % i) for i in range(200)]
    barrier = threading.Barrier(200)
    http = [
        httpx.Client(
            base_url=n.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            limits=httpx.Limits(max_connections=100),
        )
        for n in cluster
    ]

    def start(i: int) -> tuple[int, dict[str, str]]:
        body = {"ke1": base64.b64encode(ke1s[i][0].to_bytes()).decode()}
        barrier.wait()
        response = http[i % 3].post("/v1/login/start", json=body)
        return response.status_code, response.json()

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(start, range(200)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(423) == 190
    # Every counted attempt now fails; the last one erases the record.
    outcomes = []
    for i, (status, doc) in enumerate(results):
        if status != 200:
            continue
        try:
            ke3 = client.generate_ke3(
                ke1s[i][1], KE2.from_bytes(base64.b64decode(doc["ke2"])), CONFIG
            ).ke3
            ke3_bytes = ke3.to_bytes()
        except Exception:
            ke3_bytes = bytes(64)
        response = http[(i + 1) % 3].post(  # finish on another node
            "/v1/login/finish",
            json={"login_id": doc["login_id"], "ke3": base64.b64encode(ke3_bytes).decode()},
        )
        outcomes.append(response.status_code)
    assert outcomes == [403] * 9 + [410]
    with VaultClient(cluster[2].url, token, CONFIG) as vc:
        assert vc.status()["exists"] is False
        events = [e["event"] for e in vc.audit()]
    assert events.count("login_started") == 10 and events.count("login_refused") == 190
    assert events.count("record_erased") == 1
    for h in http:
        h.close()


def test_login_started_on_one_node_finishes_on_another(cluster: list[VaultNode]) -> None:
    token = cluster[0].add_account("roamer")
    with VaultClient(cluster[0].url, token, CONFIG) as vc:
        vc.register(b"pw", lambda _k: SECRET)
    ke1, state = client.generate_ke1(b"pw")
    with (
        VaultClient(cluster[1].url, token, CONFIG) as a,
        VaultClient(cluster[2].url, token, CONFIG) as b,
    ):
        login_id, ke2 = a.login_start(ke1.to_bytes())
        ke3 = client.generate_ke3(state, KE2.from_bytes(ke2), CONFIG).ke3
        assert b.login_finish(login_id, ke3.to_bytes()).wrapped_secret == SECRET
        assert b.status()["attempts_used"] == 0


def test_a_vault_killed_between_start_and_finish_still_counts(cluster: list[VaultNode]) -> None:
    token = cluster[0].add_account("crashy")
    with VaultClient(cluster[0].url, token, CONFIG) as vc:
        vc.register(b"pw", lambda _k: SECRET)
    ke1, state = client.generate_ke1(b"pw")
    with VaultClient(cluster[0].url, token, CONFIG) as vc:
        login_id, ke2 = vc.login_start(ke1.to_bytes())
    cluster[0].kill()  # kill -9 right after KE2 left
    with VaultClient(cluster[1].url, token, CONFIG) as other:
        assert other.status()["attempts_used"] == 1
        ke3 = client.generate_ke3(state, KE2.from_bytes(ke2), CONFIG).ke3
        assert other.login_finish(login_id, ke3.to_bytes()).wrapped_secret == SECRET
    cluster[0].start()
    with VaultClient(cluster[0].url, token, CONFIG) as vc:
        assert vc.status()["attempts_used"] == 0


def test_attempts_that_never_finish_expire_and_erase_the_record(
    tmp_path: Path, pg: Postgres, hsm: SoftHsm
) -> None:
    db = pg.new_database("v" + secrets.token_hex(4))
    node = hsm_node(
        tmp_path / "n", db, hsm, BACKVAULT_SERVER_LOGIN_TTL="1", BACKVAULT_SERVER_SWEEP_EVERY="0.3"
    ).start()
    try:
        token = node.add_account("silent")
        with VaultClient(node.url, token, CONFIG) as vc:
            vc.register(b"pw", lambda _k: SECRET, max_attempts=3)
            for _ in range(3):
                vc.login_start(client.generate_ke1(b"guess")[0].to_bytes())
            with pytest.raises(VaultRefused) as refused:
                vc.login_start(client.generate_ke1(b"guess")[0].to_bytes())
            assert refused.value.status == 423
            # No client ever sends KE3; the sweeper erases the record once they expire.
            deadline = time.time() + 10
            while time.time() < deadline and node.log.read_text().count("record_erased") == 0:
                time.sleep(0.2)
            events = [e["event"] for e in vc.audit()]
            assert events.count("login_expired") == 3 and "record_erased" in events
            assert vc.status()["exists"] is False
    finally:
        node.stop()


def test_postgres_dump_holds_no_secret_in_clear(tmp_path: Path, pg: Postgres, hsm: SoftHsm) -> None:
    from backvault.vault.sealing import Pkcs11Sealer

    db = pg.new_database("v" + secrets.token_hex(4))
    node = hsm_node(tmp_path / "n", db, hsm).start()
    try:
        with VaultClient(node.url, node.add_account("dumped"), CONFIG) as vc:
            export_key = vc.register(b"pw", lambda _k: SECRET).export_key
            vc.login(b"pw")
        dump = pg.dump_database(db)
        with softhsm_in_this_process(hsm):  # an earlier test may have pointed it elsewhere
            sealer = Pkcs11Sealer(
                "/usr/lib/softhsm/libsofthsm2.so", hsm.token_label, hsm.pin, create=False
            )
        import sqlalchemy as sa

        engine = sa.create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            keys = conn.execute(
                sa.text("SELECT sealed_oprf_seed, sealed_server_private_key FROM vault_keys")
            ).one()
            record = conn.execute(sa.text("SELECT sealed_payload, generation FROM records")).one()
        engine.dispose()
        secrets_in_clear = [
            sealer.open(bytes(keys[0]), b"vault:oprf-seed"),
            sealer.open(bytes(keys[1]), b"vault:server-private-key"),
            sealer.open(bytes(record[0]), f"record:dumped:{record[1]}".encode())[:192],
            SECRET,
            export_key,
        ]
        sealer.close()
        for secret in secrets_in_clear:
            assert secret not in dump
            assert secret.hex().encode() not in dump.lower()
            assert base64.b64encode(secret) not in dump
    finally:
        node.stop()
