"""Sealing-key rotation on real vault processes: `vault rotate-sealing-key` re-seals every
sealed value in batches while nodes keep serving (SQLite with a key file; PostgreSQL with
two nodes and a SoftHSM2 token), resumes after stopping half-way, and
`vault destroy-sealing-key` refuses while anything still uses a version."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from backvault.opaque import KE2, IdentityKSF, OpaqueConfig, client
from backvault.vault.sealed_columns import SEALED_COLUMNS
from backvault.vaultclient.http import VaultClient
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
SECRET = b"R" * 40
FAST_SWEEP = {"BACKVAULT_SERVER_SWEEP_EVERY": "0.2"}


def sealed_versions(url: str) -> Counter[int]:
    """Key versions named by every sealed value in the database, read from the raw bytes:
    format 2 is 0x02 || version (4 bytes); format 1 (0x01 || …) is version 1."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    found: Counter[int] = Counter()
    with engine.connect() as conn:
        for sealed in SEALED_COLUMNS:
            for (value,) in conn.execute(
                sa.text(f"SELECT {sealed.column_name} FROM {sealed.table.name}")
            ):
                value = bytes(value)
                found[1 if value[0] == 1 else int.from_bytes(value[1:5], "big")] += 1
    engine.dispose()
    return found


def admin(node: VaultNode, *args: str) -> subprocess.CompletedProcess[str]:
    """A `backvault vault …` command run by the operator against the node's settings."""
    command = node.command(args[0], *node.args, *args[1:])
    return subprocess.run(command, env=node.env, capture_output=True, text=True, timeout=300)


def current_version(node: VaultNode) -> float:
    for line in httpx.get(node.url + "/metrics").text.splitlines():
        if line.startswith("backvault_vault_sealing_key_current_version "):
            return float(line.split()[1])
    raise AssertionError("no current-version metric")


def wait_for_version(node: VaultNode, version: int) -> None:
    deadline = time.time() + 30
    while current_version(node) != version:
        assert time.time() < deadline, "the node did not switch to the new key version"
        time.sleep(0.1)


class Traffic:
    """Logins in a loop on some nodes (with the right password) until stopped."""

    def __init__(self, nodes: list[VaultNode], token: str) -> None:
        self.nodes, self.token = nodes, token
        self.done = threading.Event()
        self.ok = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            while not self.done.is_set():
                node = self.nodes[self.ok % len(self.nodes)]
                with VaultClient(node.url, self.token, CONFIG) as vc:
                    assert vc.login(b"pw-traffic").wrapped_secret == SECRET
                self.ok += 1
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.done.set()
        self.thread.join()


def test_rotation_reseals_everything_in_batches_while_a_node_serves(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'v' / 'data' / 'vault.db'}"
    node = make_node(tmp_path / "v", db, env=FAST_SWEEP).start()
    try:
        tokens = {name: node.add_account(name) for name in ("ann", "bob", "cy", "traffic")}
        for name, token in tokens.items():
            with VaultClient(node.url, token, CONFIG) as vc:
                vc.register(f"pw-{name}".encode(), lambda _k: SECRET)
        ke1, pending_state = client.generate_ke1(b"pw-ann")
        with VaultClient(node.url, tokens["ann"], CONFIG) as vc:
            pending_id, pending_ke2 = vc.login_start(ke1.to_bytes())  # a sealed login state
        before = sealed_versions(db)
        assert set(before) == {1} and before[1] == 3 + 4 + 1

        refused = admin(node, "destroy-sealing-key", "1")
        assert refused.returncode == 1
        assert "key version 1 is the current sealing key" in refused.stderr

        # Stopped after one committed batch, as a crash would leave it.
        partial = admin(node, "rotate-sealing-key", "--batch-size", "2", "--max-batches", "1")
        assert partial.returncode == 0, partial.stderr
        assert "created sealing key version 2" in partial.stdout
        assert "continue with `backvault vault rotate-sealing-key --resume`" in partial.stdout
        halfway = sealed_versions(db)
        assert halfway[2] >= 1 and halfway[1] >= 1
        refused = admin(node, "destroy-sealing-key", "1")
        assert refused.returncode == 1
        assert "values are still sealed under key version 1" in refused.stderr

        wait_for_version(node, 2)
        with Traffic([node], tokens["traffic"]) as traffic:
            resumed = admin(node, "rotate-sealing-key", "--resume", "--batch-size", "2")
            while traffic.ok < 3 and not traffic.errors:
                time.sleep(0.05)
        assert not traffic.errors, traffic.errors
        assert resumed.returncode == 0, resumed.stderr
        assert "every value is now sealed under key version 2" in resumed.stdout
        assert "`backvault vault destroy-sealing-key 1`" in resumed.stdout
        assert set(sealed_versions(db)) == {2}

        listing = admin(node, "sealing-keys")
        rows = [line.split() for line in listing.stdout.splitlines()[1:]]
        assert [row[:3] for row in rows] == [
            ["1", "old", "0"],
            ["2", "current", str(sum(sealed_versions(db).values()))],
        ]
        assert int(rows[0][3]) >= 8  # seals made under version 1, counted durably

        destroyed = admin(node, "destroy-sealing-key", "1")
        assert destroyed.returncode == 0, destroyed.stderr
        assert not node.sealing_key.exists()
        assert node.sealing_key.with_name("sealing.key.v2").exists()

        # The login begun before the rotation finishes; every record still opens.
        ke3 = client.generate_ke3(pending_state, KE2.from_bytes(pending_ke2), CONFIG).ke3
        with VaultClient(node.url, tokens["ann"], CONFIG) as vc:
            assert vc.login_finish(pending_id, ke3.to_bytes()).wrapped_secret == SECRET
    finally:
        node.stop()
    node.start()
    try:
        for name, token in tokens.items():
            with VaultClient(node.url, token, CONFIG) as vc:
                assert vc.login(f"pw-{name}".encode()).wrapped_secret == SECRET
    finally:
        node.stop()


@pytest.fixture
def pg() -> Iterator[Postgres]:
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def hsm(tmp_path: Path) -> Iterator[SoftHsm]:
    with softhsm_token(tmp_path / "hsm") as token:
        yield token


def test_rotation_on_postgres_with_an_hsm_and_two_busy_nodes(
    tmp_path: Path, pg: Postgres, hsm: SoftHsm
) -> None:
    db = pg.new_database("rotation")
    hsm_args = (
        "--sealing",
        "pkcs11",
        "--pkcs11-token-label",
        hsm.token_label,
        "--pkcs11-pin-file",
        str(hsm.pin_file),
    )
    nodes = [
        make_node(tmp_path / f"n{i}", db, *hsm_args, env={**hsm.env, **FAST_SWEEP}).start()
        for i in range(2)
    ]
    try:
        tokens = {name: nodes[0].add_account(name) for name in ("dee", "eli", "traffic")}
        for name, token in tokens.items():
            with VaultClient(nodes[1].url, token, CONFIG) as vc:
                vc.register(f"pw-{name}".encode(), lambda _k: SECRET)
        assert set(sealed_versions(db)) == {1}

        with Traffic(nodes, tokens["traffic"]) as traffic:
            rotated = admin(nodes[0], "rotate-sealing-key", "--batch-size", "1")
            while traffic.ok < 4 and not traffic.errors:
                time.sleep(0.05)
        assert not traffic.errors, traffic.errors
        assert rotated.returncode == 0, rotated.stderr
        assert "every value is now sealed under key version 2" in rotated.stdout
        assert set(sealed_versions(db)) == {2}
        for node in nodes:
            wait_for_version(node, 2)

        destroyed = admin(nodes[1], "destroy-sealing-key", "1")
        assert destroyed.returncode == 0, destroyed.stderr
        for i, (name, token) in enumerate(tokens.items()):
            with VaultClient(nodes[i % 2].url, token, CONFIG) as vc:
                assert vc.login(f"pw-{name}".encode()).wrapped_secret == SECRET
    finally:
        for node in nodes:
            node.stop()

    from pkcs11 import Attribute, ObjectClass

    with softhsm_in_this_process(hsm):
        import pkcs11

        token = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label=hsm.token_label)
        with token.open(user_pin=hsm.pin) as session:
            labels = [
                key[Attribute.LABEL]
                for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
            ]
    assert labels == ["backvault-sealing-v2"]
