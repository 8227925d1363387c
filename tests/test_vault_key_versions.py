"""Only key versions the vault made seal, on real vault processes with a real SoftHSM2
token and real key files: keys planted in the HSM (an imported key of known value, a
generated key anyone can use without the PIN, a huge version number) or in the key folder
are ignored — logged and counted — and nothing is sealed under them; rotation goes on; an
imported key is refused as the current one unless the operator opts in; `init-hsm`
records the key it makes; a deployment from before versions were recorded upgrades
without a hitch. Also: the service's secret-holding objects have redacted reprs."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backvault.opaque import IdentityKSF, OpaqueConfig
from backvault.vault import schema
from backvault.vault.sealed_columns import SEALED_COLUMNS
from backvault.vaultclient.http import VaultClient
from tests.servers import (
    SOFTHSM_MODULE,
    SoftHsm,
    VaultNode,
    free_port,
    make_node,
    softhsm_in_this_process,
    softhsm_token,
)
from tests.test_vault_rotation import admin, current_version, sealed_versions, wait_for_version

CONFIG = OpaqueConfig(ksf=IdentityKSF())
SECRET = b"S" * 48
FAST_SWEEP = {"BACKVAULT_SERVER_SWEEP_EVERY": "0.2"}
KNOWN_KEY = b"K" * 32  # the value an attacker chose
HUGE = 2**32 - 1  # the highest version a sealed value's header can name

SAFE = {
    "ENCRYPT": True,
    "DECRYPT": True,
    "WRAP": False,
    "UNWRAP": False,
    "SIGN": False,
    "VERIFY": False,
    "DERIVE": False,
    "MODIFIABLE": False,
    "SENSITIVE": True,
    "EXTRACTABLE": False,
    "TOKEN": True,
    "PRIVATE": True,
}


@pytest.fixture
def hsm(tmp_path: Path) -> Iterator[SoftHsm]:
    with softhsm_token(tmp_path / "hsm") as token:
        yield token


def hsm_node(tmp: Path, db: str, token: SoftHsm, env: dict[str, str] | None = None) -> VaultNode:
    return make_node(
        tmp,
        db,
        "--sealing",
        "pkcs11",
        "--pkcs11-token-label",
        token.token_label,
        "--pkcs11-pin-file",
        str(token.pin_file),
        env={**token.env, **FAST_SWEEP, **(env or {})},
    )


def metric(node: VaultNode, name: str) -> float | None:
    for line in httpx.get(node.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def ignored_keys(node: VaultNode) -> float:
    return metric(node, 'backvault_vault_sealing_keys_ignored{reason="unrecorded"}') or 0.0


def wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.time() + 30
    while not done():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_for_a_sweep_to_see_the_planted_key(node: VaultNode) -> None:
    """A sweep has looked at the key store: it either ignored the planted key (the fix)
    or switched to it (the attack)."""
    wait_until(
        lambda: ignored_keys(node) >= 1 or current_version(node) != 1,
        "a sweep to look at the planted key",
    )


def register_and_login(node: VaultNode, token: str, password: bytes) -> None:
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(password, lambda _k: SECRET)
        assert vc.login(password).wrapped_secret == SECRET


def sealed_values(db: Path) -> list[tuple[bytes, bytes]]:
    """Every sealed value in an SQLite vault database, with its purpose."""
    found = []
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        for sealed in SEALED_COLUMNS:
            for row in conn.execute(f"SELECT * FROM {sealed.table.name}"):
                found.append((bytes(row[sealed.column_name]), sealed.purpose(_Row(row))))
    return found


class _Row:
    def __init__(self, row: sqlite3.Row) -> None:
        self._row = row

    def __getattr__(self, name: str) -> object:
        return self._row[name]


def opens_with_known_key(sealed: bytes, purpose: bytes) -> bool:
    try:
        AESGCM(KNOWN_KEY).decrypt(sealed[5:17], sealed[17:], sealed[:5] + purpose)
    except InvalidTag:
        return False
    return True


def log_lines(node: VaultNode, level: str, text: str) -> list[str]:
    return [
        line
        for line in node.log.read_text().splitlines()
        if f'"level": "{level}"' in line and text in line
    ]


def pkcs11_session(token: SoftHsm, pin: bool = True) -> object:
    import pkcs11

    from backvault.vault.sealing import pkcs11_attribute_mapper

    found = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label=token.token_label)
    mapper = pkcs11_attribute_mapper()
    if pin:
        return found.open(user_pin=token.pin, rw=True, attribute_mapper=mapper)
    return found.open(rw=True, attribute_mapper=mapper)


def plant_imported_key(token: SoftHsm, label: str) -> None:
    """With the PIN for a moment: a key of known value, with every attribute the vault
    checks set as a generated key has them."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    template = {getattr(Attribute, name): wanted for name, wanted in SAFE.items()}
    template.update(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: KNOWN_KEY,
            Attribute.LABEL: label,
        }
    )
    with softhsm_in_this_process(token), pkcs11_session(token) as session:  # type: ignore[attr-defined]
        session.create_object(template)


def plant_generated_key(token: SoftHsm, label: str, **changes: object) -> None:
    from pkcs11 import Attribute, KeyType

    template = {getattr(Attribute, name): wanted for name, wanted in {**SAFE, **changes}.items()}
    with softhsm_in_this_process(token), pkcs11_session(token) as session:  # type: ignore[attr-defined]
        session.generate_key(KeyType.AES, 256, label=label, store=True, template=template)


def opens_without_the_pin(token: SoftHsm, label: str, sealed: bytes, purpose: bytes) -> bool:
    """Whoever can open a session on the token, without logging in, tries the key."""
    import pkcs11
    from pkcs11.mechanisms import GCMParams, Mechanism

    with softhsm_in_this_process(token), pkcs11_session(token, pin=False) as public:  # type: ignore[attr-defined]
        try:
            key = public.get_key(label=label)
            key.decrypt(
                sealed[17:],
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(sealed[5:17], sealed[:5] + purpose, 128),
            )
        except pkcs11.PKCS11Error:
            return False
    return True


# --- planted keys ------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["imported, known value", "generated, CKA_PRIVATE=false"])
def test_a_key_planted_in_the_hsm_as_the_next_version_is_never_used(
    tmp_path: Path, hsm: SoftHsm, planted: str
) -> None:
    """The red team's attacks: with the HSM PIN for a moment, add `backvault-sealing-v2` —
    imported with a value the attacker knows, or generated with CKA_PRIVATE false so that
    anyone who can open a session uses it without the PIN. Nodes switched to it at their
    next sweep; a database copy (or a PIN-less session) then opened every new record."""
    db = tmp_path / "vault.db"
    node = hsm_node(tmp_path / "n", f"sqlite:///{db}", hsm).start()
    try:
        token = node.add_account("alice")
        if planted.startswith("imported"):
            plant_imported_key(hsm, "backvault-sealing-v2")
        else:
            plant_generated_key(hsm, "backvault-sealing-v2", PRIVATE=False)
        wait_for_a_sweep_to_see_the_planted_key(node)
        assert current_version(node) == 1
        assert ignored_keys(node) == 1
        register_and_login(node, token, b"the owner's password")
    finally:
        node.stop()

    values = sealed_values(db)
    assert {int.from_bytes(sealed[1:5], "big") for sealed, _ in values} == {1}
    for sealed, purpose in values:
        assert not opens_with_known_key(sealed, purpose)
        assert not opens_without_the_pin(hsm, "backvault-sealing-v2", sealed, purpose)
        assert not opens_without_the_pin(hsm, "backvault-sealing-v1", sealed, purpose)
    assert log_lines(
        node,
        "error",
        "ignoring the sealing key labelled 'backvault-sealing-v2' for key version 2: this "
        "vault never made that version",
    )


def test_a_planted_huge_version_neither_seals_nor_blocks_rotation(
    tmp_path: Path, hsm: SoftHsm
) -> None:
    """`backvault-sealing-v4294967295` (safe attributes, generated): nodes switched to it,
    and `rotate-sealing-key` then failed with "no key version is left"."""
    db = tmp_path / "vault.db"
    node = hsm_node(tmp_path / "n", f"sqlite:///{db}", hsm).start()
    try:
        register_and_login(node, node.add_account("bob"), b"pw-bob")
        plant_generated_key(hsm, f"backvault-sealing-v{HUGE}")
        wait_for_a_sweep_to_see_the_planted_key(node)
        assert current_version(node) == 1

        rotated = admin(node, "rotate-sealing-key")
        assert rotated.returncode == 0, rotated.stderr
        created = re.search(
            r"created sealing key version 2 \(check value ([0-9a-f]{16})\)", rotated.stdout
        )
        assert created, rotated.stdout
        check_value = created.group(1)
        wait_for_version(node, 2)
        assert set(sealed_versions(f"sqlite:///{db}")) == {2}
        # The switch is logged with the check value, and shown in /metrics.
        assert log_lines(
            node,
            "warning",
            f"the current sealing key version changed from 1 to 2 (check value {check_value})",
        )
        info = f'backvault_vault_sealing_key_current_info{{check_value="{check_value}",key_version="2"}}'
        assert metric(node, info) == 1
        assert metric(node, "backvault_vault_sealing_key_changes_total") == 1

        listing = admin(node, "sealing-keys")
        assert listing.returncode == 0, listing.stderr
        rows = [line.split() for line in listing.stdout.splitlines()[1:]]
        assert [row[:2] for row in rows] == [["1", "old"], ["2", "current"], [str(HUGE), "ignored"]]
        assert rows[2][4:] == ["-", "unrecorded"]
        assert rows[1][4] == check_value
        assert f"labelled 'backvault-sealing-v{HUGE}'" in listing.stderr
        with VaultClient(node.url, node.add_account("cy"), CONFIG) as vc:
            vc.register(b"pw-cy", lambda _k: SECRET)
        assert set(sealed_versions(f"sqlite:///{db}")) == {2}
    finally:
        node.stop()


def test_a_planted_key_file_is_never_used_and_rotation_goes_on(tmp_path: Path) -> None:
    """Someone who can write to the key folder adds `sealing.key.v9` holding a key they
    know: the node switched to it at its next sweep."""
    db = tmp_path / "vault.db"
    node = make_node(tmp_path / "n", f"sqlite:///{db}", env=FAST_SWEEP).start()
    try:
        register_and_login(node, node.add_account("dee"), b"pw-dee")
        planted = node.sealing_key.with_name("sealing.key.v9")
        planted.write_bytes(KNOWN_KEY)
        os.chmod(planted, 0o600)
        wait_for_a_sweep_to_see_the_planted_key(node)
        assert current_version(node) == 1
        register_and_login(node, node.add_account("eli"), b"pw-eli")
        assert set(sealed_versions(f"sqlite:///{db}")) == {1}
        assert not any(opens_with_known_key(*value) for value in sealed_values(db))

        rotated = admin(node, "rotate-sealing-key")
        assert rotated.returncode == 0, rotated.stderr
        assert "created sealing key version 2 " in rotated.stdout
        wait_for_version(node, 2)
        assert node.sealing_key.with_name("sealing.key.v2").exists()
        assert set(sealed_versions(f"sqlite:///{db}")) == {2}
        assert ignored_keys(node) == 1
    finally:
        node.stop()
    assert log_lines(node, "error", f"ignoring the sealing key {planted} for key version 9")


# --- what the vault accepts as its key ---------------------------------------------------


def test_an_imported_key_is_refused_as_the_current_key_unless_the_operator_opts_in(
    tmp_path: Path,
) -> None:
    """A key ceremony done with another tool that imported a key (its value known to
    whoever typed it in): nodes used to seal under it with a warning."""
    with softhsm_token(tmp_path / "hsm", ceremony=False) as token:
        plant_imported_key(token, "backvault-sealing-v1")
        node = hsm_node(tmp_path / "n", f"sqlite:///{tmp_path / 'vault.db'}", token)

        def serve() -> subprocess.CompletedProcess[str]:
            command = node.command("serve", "--listen", f"127.0.0.1:{free_port()}", *node.args)
            return subprocess.run(command, env=node.env, capture_output=True, text=True, timeout=60)

        refused = serve()
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "backvault: sealing: the HSM sealing key version 1 has CKA_ALWAYS_SENSITIVE=false"
        )
        assert "rotate-sealing-key" in last and "pkcs11_accept_cloned_keys = true" in last

        node.env["BACKVAULT_SERVER_PKCS11_ACCEPT_CLONED_KEYS"] = "true"
        node.start()
        try:
            register_and_login(node, node.add_account("fay"), b"pw-fay")
        finally:
            node.stop()
        assert log_lines(node, "warning", "CKA_ALWAYS_SENSITIVE=false")


DERIVATION_DATA = b"D" * 32  # what the attacker derives the key from


def plant_derived_key(token: SoftHsm, label: str) -> None:
    """With the PIN for a moment: a public base key allowed to derive (left in the token),
    and derived from it a key with every attribute the vault checked as a generated key has
    them — CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE true — but CKA_LOCAL false."""
    from pkcs11 import Attribute, KeyType, Mechanism

    # SoftHSM2 takes the attributes in order: CKA_MODIFIABLE=false goes last.
    template = {getattr(Attribute, name): wanted for name, wanted in SAFE.items()}
    template[Attribute.LABEL] = label
    template[Attribute.MODIFIABLE] = template.pop(Attribute.MODIFIABLE)
    with softhsm_in_this_process(token), pkcs11_session(token) as session:  # type: ignore[attr-defined]
        base = session.generate_key(
            KeyType.AES,
            256,
            label="attacker-base",
            store=True,
            template={
                Attribute.DERIVE: True,
                Attribute.PRIVATE: False,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
        base.derive_key(
            KeyType.AES,
            256,
            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
            mechanism_param=DERIVATION_DATA,
            template=template,
        )


def derive_without_the_pin(token: SoftHsm) -> bytes:
    """Anyone who can open a session on the token, without logging in, derives the key
    again from the public base key — readable this time."""
    from pkcs11 import Attribute, KeyType, Mechanism

    with softhsm_in_this_process(token), pkcs11_session(token, pin=False) as public:  # type: ignore[attr-defined]
        base = public.get_key(label="attacker-base")
        copy = base.derive_key(
            KeyType.AES,
            256,
            store=False,
            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
            mechanism_param=DERIVATION_DATA,
            template={
                Attribute.PRIVATE: False,
                Attribute.SENSITIVE: False,
                Attribute.EXTRACTABLE: True,
                Attribute.VALUE_LEN: 32,
            },
        )
        return bytes(copy[Attribute.VALUE])


def serve_once(node: VaultNode) -> subprocess.CompletedProcess[str]:
    command = node.command("serve", "--listen", f"127.0.0.1:{free_port()}", *node.args)
    return subprocess.run(command, env=node.env, capture_output=True, text=True, timeout=60)


def test_a_derived_key_is_refused_as_the_current_key_unless_the_operator_opts_in(
    tmp_path: Path,
) -> None:
    """Round two: a key derived in the token from a public base key the attacker left
    there has CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE true, so the vault sealed
    under it; anyone who can open a session without the PIN derived it again, readable,
    and opened every record in a database copy. CKA_LOCAL (false for any key not generated
    in the token) now refuses it as the current key; as an older version it only warns."""
    with softhsm_token(tmp_path / "hsm", ceremony=False) as token:
        plant_derived_key(token, "backvault-sealing-v1")
        db = tmp_path / "vault.db"
        node = hsm_node(tmp_path / "n", f"sqlite:///{db}", token)

        refused = serve_once(node)
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "backvault: sealing: the HSM sealing key version 1 has CKA_LOCAL=false"
        ), last
        assert "pkcs11_accept_cloned_keys = true" in last

        # The operator opts in: the key works, and the attack shows why it should not.
        node.env["BACKVAULT_SERVER_PKCS11_ACCEPT_CLONED_KEYS"] = "true"
        node.start()
        try:
            register_and_login(node, node.add_account("kim"), b"pw-kim")
        finally:
            node.stop()
        value = derive_without_the_pin(token)
        sealed, purpose = sealed_values(db)[0]
        assert AESGCM(value).decrypt(sealed[5:17], sealed[17:], sealed[:5] + purpose)

        # A rotation moves every value to a key generated in the token; the derived one,
        # now an older version, is warned about but no longer stops the vault.
        rotated = admin(node, "rotate-sealing-key")
        assert rotated.returncode == 0, rotated.stderr
        del node.env["BACKVAULT_SERVER_PKCS11_ACCEPT_CLONED_KEYS"]
        node.start()
        try:
            assert current_version(node) == 2
            register_and_login(node, node.add_account("lee"), b"pw-lee")
        finally:
            node.stop()
        assert log_lines(node, "warning", "version 1 has CKA_LOCAL=false")
        for sealed, purpose in sealed_values(db):
            assert sealed[:5] == bytes([2, 0, 0, 0, 2])
            with pytest.raises(InvalidTag):
                AESGCM(value).decrypt(sealed[5:17], sealed[17:], sealed[:5] + purpose)


def test_keys_the_vault_makes_allow_only_aes_gcm_and_a_current_key_allowing_more_is_refused(
    tmp_path: Path, hsm: SoftHsm
) -> None:
    """Round two: CKA_ALLOWED_MECHANISMS. `init-hsm` and rotations make keys the token
    lets only CKM_AES_GCM use (SoftHSM2 enforces it: CKM_AES_ECB is refused); a current
    key that allows another mechanism is refused."""
    import pkcs11
    from pkcs11 import Attribute, Mechanism

    with softhsm_in_this_process(hsm), pkcs11_session(hsm) as session:  # type: ignore[attr-defined]
        made = session.get_key(label="backvault-sealing-v1")
        assert list(made[Attribute.ALLOWED_MECHANISMS]) == [Mechanism.AES_GCM]
        assert made[Attribute.LOCAL] is True
        with pytest.raises(pkcs11.MechanismInvalid):
            made.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)

    with softhsm_token(tmp_path / "other", ceremony=False) as token:
        plant_generated_key(
            token,
            "backvault-sealing-v1",
            ALLOWED_MECHANISMS=[Mechanism.AES_GCM, Mechanism.AES_ECB],
        )
        node = hsm_node(tmp_path / "n", f"sqlite:///{tmp_path / 'vault.db'}", token)
        refused = serve_once(node)
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "backvault: sealing: the HSM sealing key version 1 allows mechanisms other than "
            "CKM_AES_GCM (CKM_AES_ECB)"
        ), last


def test_init_hsm_records_its_key_so_a_key_planted_before_the_first_start_is_ignored(
    tmp_path: Path,
) -> None:
    with softhsm_token(tmp_path / "hsm", ceremony=False) as token:
        db = tmp_path / "vault.db"
        node = hsm_node(tmp_path / "n", f"sqlite:///{db}", token)
        made = admin(node, "init-hsm")
        assert made.returncode == 0, made.stderr
        check = re.search(r"version 1, check value ([0-9a-f]{16})$", made.stdout.strip())
        assert check, made.stdout
        plant_imported_key(token, "backvault-sealing-v2")
        node.start()
        try:
            assert current_version(node) == 1
            info = f'backvault_vault_sealing_key_current_info{{check_value="{check.group(1)}",key_version="1"}}'
            assert metric(node, info) == 1
            assert ignored_keys(node) == 1
        finally:
            node.stop()

        # A database that records no key, facing a token with two: which is the vault's?
        other = hsm_node(tmp_path / "other", f"sqlite:///{tmp_path / 'other.db'}", token)
        refused = admin(other, "add-account", "gus")
        assert refused.returncode == 1
        assert "holds several sealing keys (versions 1 (check value " in refused.stderr
        assert "this database records none" in refused.stderr


# --- round two: version records written into the database -------------------------------


def unvouched_keys(node: VaultNode) -> float:
    return metric(node, 'backvault_vault_sealing_keys_ignored{reason="unvouched"}') or 0.0


Encrypt = Callable[[bytes, bytes, bytes], bytes]  # (nonce, plaintext, associated data)


def attacker_check_value(encrypt: Encrypt) -> bytes:
    """The check value of the planted key, computed as the vault does (sealing.py)."""
    import hashlib

    from backvault.vault.sealing import (
        CHECK_VALUE_ASSOCIATED_DATA,
        CHECK_VALUE_BLOCK,
        CHECK_VALUE_NONCE,
    )

    encrypted = encrypt(CHECK_VALUE_NONCE, CHECK_VALUE_BLOCK, CHECK_VALUE_ASSOCIATED_DATA)
    return hashlib.sha256(CHECK_VALUE_ASSOCIATED_DATA + b"\0" + encrypted).digest()


def attacker_vouch(encrypt: Encrypt, voucher: int, version: int, check_value: bytes) -> bytes:
    """A vouch made with the planted key (the only key the attacker can use)."""
    from backvault.vault.sealing import sealed_header, vouch_purpose

    header, nonce = sealed_header(voucher), os.urandom(12)
    return header + nonce + encrypt(nonce, b"", header + vouch_purpose(version, check_value))


class PlantedStore:
    """Where the attacker plants a key of version 2, and how they use it."""

    def node(self, tmp: Path, db: Path) -> VaultNode:
        return make_node(tmp / "n", f"sqlite:///{db}", env=FAST_SWEEP)

    def plant(self, node: VaultNode) -> Encrypt:
        planted = node.sealing_key.with_name("sealing.key.v2")
        planted.write_bytes(KNOWN_KEY)
        os.chmod(planted, 0o600)
        return lambda nonce, data, aad: AESGCM(KNOWN_KEY).encrypt(nonce, data, aad)

    def where(self, node: VaultNode) -> str:
        return str(node.sealing_key.with_name("sealing.key.v2"))


class PlantedHsm(PlantedStore):
    """With the PIN for a moment: a key generated in the token with every attribute the
    vault checks (CKA_LOCAL, CKA_ALLOWED_MECHANISMS included), used while the PIN lasts."""

    def __init__(self, token: SoftHsm) -> None:
        self.token = token

    def node(self, tmp: Path, db: Path) -> VaultNode:
        return hsm_node(tmp / "n", f"sqlite:///{db}", self.token)

    def plant(self, node: VaultNode) -> Encrypt:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        plant_generated_key(
            self.token, "backvault-sealing-v2", ALLOWED_MECHANISMS=[Mechanism.AES_GCM]
        )
        made: dict[tuple[bytes, bytes, bytes], bytes] = {}

        def encrypt(nonce: bytes, data: bytes, aad: bytes) -> bytes:
            if (nonce, data, aad) not in made:
                with softhsm_in_this_process(self.token), pkcs11_session(self.token) as session:  # type: ignore[attr-defined]
                    key = session.get_key(label="backvault-sealing-v2")
                    made[nonce, data, aad] = bytes(
                        key.encrypt(
                            data,
                            mechanism=Mechanism.AES_GCM,
                            mechanism_param=GCMParams(nonce, aad, 128),
                        )
                    )
            return made[nonce, data, aad]

        return encrypt

    def where(self, node: VaultNode) -> str:
        return "labelled 'backvault-sealing-v2'"


@pytest.fixture(params=["key files", "SoftHSM2"])
def planted_store(request: pytest.FixtureRequest, hsm: SoftHsm) -> PlantedStore:
    return PlantedStore() if request.param == "key files" else PlantedHsm(hsm)


def write_version_record(db: Path, version: int, check_value: bytes, vouch: bytes | None) -> None:
    """Database write access, no key: the record the attacker adds for the planted key."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO sealing_key_versions (key_version, check_value, origin, recorded_at) "
            "VALUES (?, ?, 'created', ?)",
            (version, check_value.hex(), time.time()),
        )
        if vouch is not None:
            conn.execute(
                "UPDATE sealing_key_versions SET vouch = ? WHERE key_version = ?",
                (vouch.hex(), version),
            )


@pytest.mark.parametrize("vouched", ["not vouched for", "vouched for by itself"])
def test_a_version_record_written_into_the_database_for_a_planted_key_is_ignored(
    tmp_path: Path, planted_store: PlantedStore, vouched: str
) -> None:
    """Round two: someone who once had the PIN for a moment (or could write to the key
    folder) plants `v2`, and with write access to the database adds its record with the
    planted key's check value — and a vouch made with that same key. Nodes sealed under the
    planted key at their next sweep. Now a version is used only when a version the node
    trusts vouches for it; the record is ignored, logged and counted, also after a restart,
    and the next rotation goes on from version 1."""
    db = tmp_path / "vault.db"
    node = planted_store.node(tmp_path, db).start()
    try:
        token = node.add_account("max")
        encrypt = planted_store.plant(node)
        check_value = attacker_check_value(encrypt)
        vouch = attacker_vouch(encrypt, 2, 2, check_value) if vouched.endswith("itself") else None
        write_version_record(db, 2, check_value, vouch)
        wait_until(
            lambda: unvouched_keys(node) >= 1 or current_version(node) != 1,
            "a sweep to look at the planted record",
        )
        assert current_version(node) == 1
        register_and_login(node, token, b"pw-max")
        assert set(sealed_versions(f"sqlite:///{db}")) == {1}
    finally:
        node.stop()
    assert log_lines(
        node,
        "error",
        f"ignoring the sealing key {planted_store.where(node)} for key version 2 (check value "
        f"{check_value[:8].hex()}): its record in the database is not vouched for",
    )
    assert not any(opens_with_known_key(*value) for value in sealed_values(db))

    node.start()  # a node starting afresh trusts what its sealed rows are sealed under
    try:
        assert current_version(node) == 1
        assert unvouched_keys(node) == 1
        rotated = admin(node, "rotate-sealing-key")
        assert rotated.returncode == 0, rotated.stderr
        assert "created sealing key version 3 " in rotated.stdout
        wait_for_version(node, 3)
        with VaultClient(node.url, token, CONFIG) as vc:
            assert vc.login(b"pw-max").wrapped_secret == SECRET
        listing = admin(node, "sealing-keys")
        rows = [line.split() for line in listing.stdout.splitlines()[1:]]
        assert [row[:2] for row in rows] == [["1", "old"], ["3", "current"], ["2", "ignored"]]
        assert rows[2][-1] == "unvouched"
    finally:
        node.stop()
    assert set(sealed_versions(f"sqlite:///{db}")) == {3}
    assert not any(opens_with_known_key(*value) for value in sealed_values(db))


def test_a_record_vouched_for_by_a_higher_version_is_ignored(tmp_path: Path) -> None:
    """Two planted keys, v2 and v3, whose records vouch for each other downwards (v3's key
    vouches for v2, v2's for v3): neither is vouched for by a version the node trusts."""
    db = tmp_path / "vault.db"
    node = make_node(tmp_path / "n", f"sqlite:///{db}", env=FAST_SWEEP).start()
    try:
        node.add_account("ned")
        checks = {}
        for version in (2, 3):
            planted = node.sealing_key.with_name(f"sealing.key.v{version}")
            planted.write_bytes(bytes([version]) * 32)
            os.chmod(planted, 0o600)
        encrypts: dict[int, Encrypt] = {
            version: (
                lambda nonce, data, aad, k=bytes([version]) * 32: AESGCM(k).encrypt(
                    nonce, data, aad
                )
            )
            for version in (2, 3)
        }
        checks = {version: attacker_check_value(encrypts[version]) for version in (2, 3)}
        write_version_record(db, 2, checks[2], attacker_vouch(encrypts[3], 3, 2, checks[2]))
        write_version_record(db, 3, checks[3], attacker_vouch(encrypts[2], 2, 3, checks[3]))
        wait_until(
            lambda: unvouched_keys(node) >= 2 or current_version(node) != 1,
            "a sweep to look at the planted records",
        )
        assert current_version(node) == 1
    finally:
        node.stop()


def test_init_hsm_vouches_for_its_key_and_prints_its_check_value(tmp_path: Path) -> None:
    """The first version of a database is trusted on first use, as `init-hsm` printed it;
    its record carries its own vouch, which marks the database as chained."""
    with softhsm_token(tmp_path / "hsm", ceremony=False) as token:
        db = tmp_path / "vault.db"
        node = hsm_node(tmp_path / "n", f"sqlite:///{db}", token)
        made = admin(node, "init-hsm")
        assert made.returncode == 0, made.stderr
        check = re.search(r"version 1, check value ([0-9a-f]{16})$", made.stdout.strip())
        assert check, made.stdout
        with sqlite3.connect(db) as conn:
            ((check_value, vouch),) = conn.execute(
                "SELECT check_value, vouch FROM sealing_key_versions"
            ).fetchall()
        assert check_value.startswith(check.group(1))
        assert bytes.fromhex(vouch)[:5] == bytes([2, 0, 0, 0, 1])


# --- upgrading ---------------------------------------------------------------------------


def as_left_by_the_previous_version(db: Path) -> None:
    """The database as the vault left it before it recorded key versions: without the
    table, at the schema version before the migration that adds it."""
    before = schema.MIGRATIONS.index(schema._v6_sealing_key_versions)
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE sealing_key_versions")
        conn.execute("UPDATE schema_version SET version = ?", (before,))


class KeyFiles:
    """The key-file store of a node, and a key file left in it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def node(self, db: Path) -> VaultNode:
        return make_node(self.tmp / "n", f"sqlite:///{db}", env=FAST_SWEEP)

    def leave_key(self, node: VaultNode, version: int) -> str:
        path = node.sealing_key.with_name(f"sealing.key.v{version}")
        path.write_bytes(os.urandom(32))
        os.chmod(path, 0o600)
        return str(path)

    def remove_key(self, node: VaultNode, version: int) -> None:
        node.sealing_key.with_name(f"sealing.key.v{version}").unlink()


class HsmKeys(KeyFiles):
    """A SoftHSM2 token whose version-1 key has the bare label older vaults gave it."""

    def __init__(self, tmp: Path, token: SoftHsm) -> None:
        super().__init__(tmp)
        self.token = token
        plant_generated_key(token, "backvault-sealing")

    def node(self, db: Path) -> VaultNode:
        return hsm_node(self.tmp / "n", f"sqlite:///{db}", self.token)

    def leave_key(self, node: VaultNode, version: int) -> str:
        plant_generated_key(self.token, f"backvault-sealing-v{version}")
        return f"labelled 'backvault-sealing-v{version}'"

    def remove_key(self, node: VaultNode, version: int) -> None:
        with softhsm_in_this_process(self.token), pkcs11_session(self.token) as session:  # type: ignore[attr-defined]
            session.get_key(label=f"backvault-sealing-v{version}").destroy()


@pytest.fixture(params=["key files", "SoftHSM2"])
def key_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyFiles]:
    if request.param == "key files":
        yield KeyFiles(tmp_path)
        return
    with softhsm_token(tmp_path / "hsm", ceremony=False) as token:
        yield HsmKeys(tmp_path, token)


def test_an_existing_deployment_upgrades_adopting_the_versions_it_seals_under(
    tmp_path: Path, key_store: KeyFiles
) -> None:
    """Values sealed under versions 1 and 2 (a rotation stopped half-way) and a key for
    version 3 that nothing is sealed under: after the upgrade every record still opens,
    versions 1 and 2 are adopted (logged with their check values), the key of version 3
    is ignored, and the next rotation makes version 4."""
    db = tmp_path / "vault.db"
    node = key_store.node(db).start()
    accounts = ("hal", "ida", "jon")
    try:
        tokens = {name: node.add_account(name) for name in accounts}
        for name in accounts:
            register_and_login(node, tokens[name], f"pw-{name}".encode())
    finally:
        node.stop()
    partial = admin(node, "rotate-sealing-key", "--batch-size", "2", "--max-batches", "1")
    assert partial.returncode == 0, partial.stderr
    assert set(sealed_versions(f"sqlite:///{db}")) == {1, 2}
    as_left_by_the_previous_version(db)
    leftover = key_store.leave_key(node, 3)

    node.start()
    try:
        assert current_version(node) == 2
        for name in accounts:
            with VaultClient(node.url, tokens[name], CONFIG) as vc:
                assert vc.login(f"pw-{name}".encode()).wrapped_secret == SECRET
        assert ignored_keys(node) == 1
        resumed = admin(node, "rotate-sealing-key")
        assert resumed.returncode == 0, resumed.stderr
        assert "created sealing key version 4 " in resumed.stdout
        wait_for_version(node, 4)
        assert set(sealed_versions(f"sqlite:///{db}")) == {4}
        refused = admin(node, "destroy-sealing-key", "3")
        assert refused.returncode == 1
        assert f"the vault does not use the key {leftover} for version 3" in refused.stderr
        key_store.remove_key(node, 3)  # the operator removes it
        wait_until(lambda: ignored_keys(node) == 0, "the node to stop reporting the key")
        for name in accounts:
            with VaultClient(node.url, tokens[name], CONFIG) as vc:
                assert vc.login(f"pw-{name}".encode()).wrapped_secret == SECRET
    finally:
        node.stop()
    adopted = log_lines(
        node, "warning", "recorded the sealing key versions this vault already seals under: 1 ("
    )
    assert len(adopted) == 1 and "), 2 (check value " in adopted[0]
    assert log_lines(node, "error", f"ignoring the sealing key {leftover} for key version 3")


def as_left_before_vouches(db: Path) -> None:
    """The database as the vault left it before versions were vouched for."""
    before = schema.MIGRATIONS.index(schema._v7_sealing_key_vouches)
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE sealing_key_versions DROP COLUMN vouch")
        conn.execute("UPDATE schema_version SET version = ?", (before,))


def test_a_deployment_from_before_vouches_chains_its_versions_once(
    tmp_path: Path, key_store: KeyFiles
) -> None:
    """Round two, upgrading: records of versions 1 and 2 (values under both, a rotation
    stopped half-way) without vouches. The first start after the upgrade chains them once
    (logged); every record opens; a later start does not chain again; rotation goes on."""
    db = tmp_path / "vault.db"
    node = key_store.node(db).start()
    try:
        tokens = {name: node.add_account(name) for name in ("oli", "pam")}
        for name, token in tokens.items():
            register_and_login(node, token, f"pw-{name}".encode())
    finally:
        node.stop()
    partial = admin(node, "rotate-sealing-key", "--batch-size", "1", "--max-batches", "1")
    assert partial.returncode == 0, partial.stderr
    assert set(sealed_versions(f"sqlite:///{db}")) == {1, 2}
    as_left_before_vouches(db)

    for _start in range(2):
        node.start()
        try:
            assert current_version(node) == 2
            assert unvouched_keys(node) == 0
            for name, token in tokens.items():
                with VaultClient(node.url, token, CONFIG) as vc:
                    assert vc.login(f"pw-{name}".encode()).wrapped_secret == SECRET
        finally:
            node.stop()
    chained = log_lines(node, "warning", "chained the sealing key versions recorded before")
    assert len(chained) == 1, chained
    assert ": 1 (check value " in chained[0] and "), 2 (check value " in chained[0]

    resumed = admin(node, "rotate-sealing-key")
    assert resumed.returncode == 0, resumed.stderr
    assert "created sealing key version 3 " in resumed.stdout
    assert set(sealed_versions(f"sqlite:///{db}")) == {3}
    node.start()
    try:
        assert current_version(node) == 3
    finally:
        node.stop()


# --- round two: the current version never goes down --------------------------------------


def ready(node: VaultNode) -> bool:
    return httpx.get(node.url + "/readyz").status_code == 200


@pytest.fixture(params=["key files", "SoftHSM2"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyFiles]:
    if request.param == "key files":
        yield KeyFiles(tmp_path)
        return
    with softhsm_token(tmp_path / "hsm") as token:
        yield HsmNodes(tmp_path, token)


class HsmNodes(KeyFiles):
    def __init__(self, tmp: Path, token: SoftHsm) -> None:
        super().__init__(tmp)
        self.token = token

    def node(self, db: Path) -> VaultNode:
        return hsm_node(self.tmp / "n", f"sqlite:///{db}", self.token)


def test_deleting_the_newest_version_record_does_not_make_nodes_seal_under_an_older_one(
    tmp_path: Path, any_store: KeyFiles
) -> None:
    """Round two: after a rotation to version 2, someone who can write to the database
    deletes version 2's record. Nodes fell back to sealing under version 1 — the version
    the operator is about to destroy (then those values are lost) or whose key leaked.
    Now a node refuses to seal under a version lower than one it sealed under (or stored
    values use): it logs an error naming version 2 and /readyz answers 503, also after a
    restart, until the record is back."""
    db = tmp_path / "vault.db"
    node = any_store.node(db).start()
    try:
        token = node.add_account("quinn")
        register_and_login(node, token, b"pw-quinn")
        rotated = admin(node, "rotate-sealing-key")
        assert rotated.returncode == 0, rotated.stderr
        wait_for_version(node, 2)
        assert set(sealed_versions(f"sqlite:///{db}")) == {2}

        with sqlite3.connect(db) as conn:
            saved = conn.execute(
                "SELECT * FROM sealing_key_versions WHERE key_version = 2"
            ).fetchone()
            conn.execute("DELETE FROM sealing_key_versions WHERE key_version = 2")
        wait_until(
            lambda: not ready(node) or current_version(node) == 1,
            "a sweep to see the record gone",
        )
        assert not ready(node)
        with VaultClient(node.url, token, CONFIG) as vc, pytest.raises(Exception) as refused:
            vc.login(b"pw-quinn")
        assert getattr(refused.value, "status", None) == 500, refused.value
        assert 1 not in sealed_versions(f"sqlite:///{db}")

        restore(db, saved)  # the operator puts the record back
        wait_until(lambda: ready(node), "the node to be ready again")
        assert current_version(node) == 2
        with VaultClient(node.url, token, CONFIG) as vc:
            assert vc.login(b"pw-quinn").wrapped_secret == SECRET
    finally:
        node.stop()
    refusal = "refusing to seal: sealing key version 2 \\u2014 the newest this node sealed under"
    assert log_lines(node, "error", refusal)
    assert log_lines(node, "warning", "sealing key version 2 is usable again: sealing resumes")

    # A node starting afresh knows version 2 from the sealed rows: it does not start.
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM sealing_key_versions WHERE key_version = 2")
    refused_start = serve_once(node)
    assert refused_start.returncode == 1
    last = refused_start.stderr.strip().splitlines()[-1]
    assert last.startswith("backvault: sealing: refusing to seal: sealing key version 2 "), last
    assert "never falls back to an older version (1)" in last
    restore(db, saved)
    node.start()
    try:
        assert current_version(node) == 2
        register_and_login(node, node.add_account("ray"), b"pw-ray")
    finally:
        node.stop()
    assert set(sealed_versions(f"sqlite:///{db}")) == {2}


def restore(db: Path, saved: tuple[object, ...]) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(
            f"INSERT INTO sealing_key_versions VALUES ({', '.join('?' * len(saved))})", saved
        )


# --- round two: reservations never finished --------------------------------------------


def test_reservations_never_finished_are_reported_and_hold_up_nothing(tmp_path: Path) -> None:
    """Round two: a rotation that crashed between reserving version 2 and recording its
    key left the reservation; someone who can write to the database adds one for version
    4294967295, dated years ahead. Nothing said so, and the planted one stopped every
    rotation ("no key version is left"). Now each is logged once, counted, listed by
    `vault sealing-keys` as unfinished, never used, and the next rotation makes version 3."""
    db = tmp_path / "vault.db"
    node = make_node(tmp_path / "n", f"sqlite:///{db}", env=FAST_SWEEP).start()
    try:
        token = node.add_account("sam")
        register_and_login(node, token, b"pw-sam")
        now = time.time()
        with sqlite3.connect(db) as conn:
            for version, at in ((2, now - 3600), (HUGE, now + 10 * 365 * 86400)):
                conn.execute(
                    "INSERT INTO sealing_key_versions (key_version, check_value, origin, "
                    "recorded_at) VALUES (?, NULL, 'created', ?)",
                    (version, at),
                )
        unfinished = 'backvault_vault_sealing_keys_ignored{reason="unfinished"}'
        wait_until(lambda: (metric(node, unfinished) or 0) >= 2, "the sweep to report them")
        assert current_version(node) == 1

        rotated = admin(node, "rotate-sealing-key")
        assert rotated.returncode == 0, rotated.stderr
        assert "created sealing key version 3 " in rotated.stdout
        wait_for_version(node, 3)
        with VaultClient(node.url, token, CONFIG) as vc:
            assert vc.login(b"pw-sam").wrapped_secret == SECRET

        listing = admin(node, "sealing-keys")
        assert listing.returncode == 0, listing.stderr
        rows = [line.split() for line in listing.stdout.splitlines()[1:]]
        assert ["2", "ignored", "0", "0", "-", "unfinished"] in rows
        assert [str(HUGE), "ignored", "0", "0", "-", "unfinished"] in rows
        assert [row[:2] for row in rows][:2] == [["1", "old"], ["3", "current"]]
    finally:
        node.stop()
    assert set(sealed_versions(f"sqlite:///{db}")) == {3}
    for version in (2, HUGE):
        reported = log_lines(node, "warning", f"sealing key version {version} was reserved (at ")
        assert len(reported) == 1, reported
        assert "never recorded its key" in reported[0]


# --- reprs -------------------------------------------------------------------------------


def test_the_services_key_holders_have_redacted_reprs() -> None:
    from backvault.opaque import client, server
    from backvault.vault.opaque_keys import OpaqueKeys
    from backvault.vault.records import OpenRecord

    seed, fake_seed = server.generate_oprf_seed(), os.urandom(32)
    pair = server.generate_server_key_pair()
    keys = OpaqueKeys(seed, pair, fake_seed)
    request, state = client.create_registration_request(b"pw")
    response = server.create_registration_response(request, pair.public_key, b"credential", seed)
    record, _ = client.finalize_registration_request(state, response, CONFIG)
    wrapped, credential = os.urandom(61), os.urandom(32)
    opened = OpenRecord(credential, record, wrapped)
    for obj, held in (
        (keys, [seed, fake_seed, pair.private_key]),
        (opened, [credential, wrapped, record.masking_key, record.envelope.to_bytes()]),
    ):
        for text in (repr(obj), str(obj)):
            for secret in held:
                for form in (secret.hex(), repr(secret)[2:-1]):
                    assert form[:16] not in text, f"{type(obj).__name__} shows a secret: {text}"


# --- round three: a trusted version made to disappear -----------------------------------


@pytest.mark.parametrize("hidden", ["marked destroyed", "check value changed"])
def test_a_planted_key_is_not_trusted_when_the_trusted_versions_records_disappear(
    tmp_path: Path, planted_store: PlantedStore, hidden: str
) -> None:
    """Round three: as in round two, `v2` is planted once and its record (with a vouch made
    by the planted key itself) written into the database — and version 1's record is marked
    destroyed (or given another check value). A running node forgot the versions it
    trusted as soon as none of them was usable any more and chose a new anchor, the lowest
    usable version: the planted one, under which it then sealed every new value; a node
    starting on that database did the same. Now a node that trusted versions before trusts
    only what a chain of vouches links to them (with none of them usable it takes no new
    version, and the planted key stays ignored), and a starting node anchors on nothing
    above a recorded version its sealed rows use but it cannot use."""
    db = tmp_path / "vault.db"
    node = planted_store.node(tmp_path, db).start()
    try:
        token = node.add_account("una")
        register_and_login(node, token, b"pw-una")
        other = node.add_account("vic")
        encrypt = planted_store.plant(node)
        check_value = attacker_check_value(encrypt)
        write_version_record(db, 2, check_value, attacker_vouch(encrypt, 2, 2, check_value))
        with sqlite3.connect(db) as conn:
            if hidden == "marked destroyed":
                conn.execute(
                    "UPDATE sealing_key_versions SET destroyed_at = ? WHERE key_version = 1",
                    (time.time(),),
                )
            else:
                conn.execute(
                    "UPDATE sealing_key_versions SET check_value = ? WHERE key_version = 1",
                    ((b"\1" * 32).hex(),),
                )
        wait_until(
            lambda: unvouched_keys(node) >= 1 or current_version(node) != 1,
            "a sweep to look at the records",
        )
        time.sleep(1)  # a few more sweeps
        with contextlib.suppress(Exception):  # refused: the fix
            register_and_login(node, other, b"pw-vic")
        seen = current_version(node)
    finally:
        node.stop()
    assert 2 not in sealed_versions(f"sqlite:///{db}")
    assert not any(opens_with_known_key(*value) for value in sealed_values(db))
    assert seen != 2

    # A node starting afresh on that database (the vault's own keys deleted too, so that
    # it would make new ones) found none of its sealed rows' versions usable and anchored
    # on the lowest usable recorded version — the planted one. Now nothing above a
    # recorded version stored values use, and cannot be used, anchors: it does not start.
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM vault_keys")
    refused = serve_once(node)
    assert refused.returncode == 1, refused.stderr
    assert "backvault: sealing: no key for the sealing key versions" in refused.stderr
    assert 2 not in sealed_versions(f"sqlite:///{db}")
