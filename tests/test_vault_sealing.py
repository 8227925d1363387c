"""Sealing at rest, in process with real keys: the versioned format (and the old one still
opening), key versions in files and in a real SoftHSM2 token (only those the vault
recorded, with their check values), the attributes an HSM key must have (and a weak,
public or imported key made here being refused), and the one registry of sealed
columns."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backvault.vault import schema
from backvault.vault.key_versions import DatabaseVersionRecords
from backvault.vault.sealed_columns import SEALED_COLUMNS
from backvault.vault.sealing import (
    FileSealer,
    Pkcs11Sealer,
    SealingError,
    key_version_of,
    sealed_header,
)
from backvault.vault.store import make_engine
from tests.servers import SOFTHSM_MODULE, SoftHsm, softhsm_in_this_process, softhsm_token

PURPOSE = b"record:alice:1"


def test_a_sealed_value_names_its_key_version_and_binds_it(tmp_path: Path) -> None:
    sealer = FileSealer(tmp_path / "keys" / "sealing.key")
    sealed = sealer.seal(b"secret", PURPOSE)
    assert sealed[:5] == sealed_header(1) == b"\x02\x00\x00\x00\x01"
    assert key_version_of(sealed) == 1
    assert sealer.open(sealed, PURPOSE) == b"secret"
    # The header is authenticated: naming another version, or altering it, does not open.
    sealer.create_version()
    relabelled = sealed_header(2) + sealed[5:]
    with pytest.raises(SealingError):
        sealer.open(relabelled, PURPOSE)
    with pytest.raises(SealingError):
        sealer.open(sealed, b"record:mallory:1")


def test_values_sealed_before_key_versions_existed_still_open(tmp_path: Path) -> None:
    """Format 1 (``0x01 || nonce || ciphertext``, associated data = purpose), as the vault
    wrote it until now, opens as key version 1 and moves to the current version."""
    path = tmp_path / "sealing.key"
    sealer = FileSealer(path)
    nonce = secrets.token_bytes(12)
    old = b"\x01" + nonce + AESGCM(path.read_bytes()).encrypt(nonce, b"old secret", PURPOSE)
    assert key_version_of(old) == 1
    assert sealer.open(old, PURPOSE) == b"old secret"
    assert sealer.create_version() == 2
    assert sealer.open(old, PURPOSE) == b"old secret"


def database_records(tmp_path: Path) -> DatabaseVersionRecords:
    """The key-version records in a vault database of its own (what a node and the
    rotation commands share)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'vault.db'}")
    schema.migrate(engine)
    return DatabaseVersionRecords(engine)


def test_key_files_hold_several_versions_and_the_newest_seals(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "sealing.key"
    records = database_records(tmp_path)
    node = FileSealer(path, records=records)
    assert (path.parent.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o600)
    first = node.seal(b"one", PURPOSE)

    # Another process: `vault rotate-sealing-key`, on the same database.
    rotator = FileSealer(path, records=database_records(tmp_path))
    assert rotator.create_version() == 2
    assert (path.parent / "sealing.key.v2").stat().st_mode & 0o777 == 0o600
    second = rotator.seal(b"two", PURPOSE)
    assert key_version_of(second) == 2

    # The serving node opens a value under a version it has not loaded yet (it looks
    # again), and then seals under the new version.
    assert node.open(second, PURPOSE) == b"two"
    assert key_version_of(node.seal(b"three", PURPOSE)) == 2
    assert node.open(first, PURPOSE) == b"one"

    with pytest.raises(SealingError, match="current sealing key"):
        rotator.destroy_version(2)
    rotator.destroy_version(1)
    assert not path.exists()
    with pytest.raises(SealingError, match="key version 1, which this vault does not hold"):
        FileSealer(path, records=records).open(first, PURPOSE)
    # Destroying version 1 does not make a restart create a new version 1.
    again = FileSealer(path, records=records)
    assert again.versions() == [2] and not path.exists()
    assert again.open(second, PURPOSE) == b"two"
    assert node.take_seal_counts() == {1: 1, 2: 1}


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sealing.key"
    FileSealer(path).create_version()
    os.chmod(path.with_name("sealing.key.v2"), 0o644)
    with pytest.raises(SealingError, match=r"sealing.key.v2 is readable by others; chmod 600"):
        FileSealer(path)


def write_key_file(path: Path, key: bytes) -> None:
    path.write_bytes(key)
    os.chmod(path, 0o600)


def test_planted_key_files_are_never_used(tmp_path: Path) -> None:
    """Someone who can write to the key folder adds ``sealing.key.v9`` holding a key they
    know, and ``sealing.key.v4294967295`` (the highest version a header can name), and
    later swaps the file of a version the vault made for one of theirs: the vault seals
    under none of them, says so, and the next rotation makes version 2; once version 2's
    key is swapped, it stops sealing rather than fall back to version 1."""
    path = tmp_path / "conf" / "sealing.key"
    sealer = FileSealer(path, records=database_records(tmp_path))
    known = b"K" * 32
    write_key_file(path.with_name("sealing.key.v9"), known)
    write_key_file(path.with_name(f"sealing.key.v{2**32 - 1}"), secrets.token_bytes(32))
    write_key_file(path.with_name("sealing.key.v\N{SUPERSCRIPT TWO}"), secrets.token_bytes(32))
    sealer.refresh()  # what every sweep does
    assert sealer.versions() == [1]
    assert sorted((key.version, key.reason) for key in sealer.ignored_keys()) == [
        (9, "unrecorded"),
        (2**32 - 1, "unrecorded"),
    ]
    sealed = sealer.seal(b"secret", PURPOSE)
    assert key_version_of(sealed) == 1
    with pytest.raises(InvalidTag):
        AESGCM(known).decrypt(sealed[5:17], sealed[17:], sealed[:5] + PURPOSE)

    assert sealer.create_version() == 2  # not 10, and not "no key version is left"
    assert key_version_of(sealer.seal(b"secret", PURPOSE)) == 2

    # The file of version 2 replaced by a key the attacker knows: not the recorded key.
    write_key_file(path.with_name("sealing.key.v2"), known)
    sealer.refresh()
    assert sealer.versions() == [1]
    assert ("sealing.key.v2", "check_value") in {
        (Path(key.where).name, key.reason) for key in sealer.ignored_keys()
    }
    # Nor does the vault fall back to version 1 (round two): it stops sealing.
    with pytest.raises(SealingError, match="refusing to seal: sealing key version 2 "):
        sealer.seal(b"secret", PURPOSE)
    with pytest.raises(SealingError, match="never falls back to an older version"):
        sealer.check()


def test_every_sealed_column_is_in_the_one_registry() -> None:
    declared = {
        f"{table.name}.{column.name}"
        for table in schema.metadata.tables.values()
        for column in table.columns
        if column.name.startswith("sealed_")
    }
    registered = [sealed.name for sealed in SEALED_COLUMNS]
    assert sorted(registered) == sorted(declared)
    assert len(set(registered)) == len(registered)


# --- HSM (SoftHSM2) ------------------------------------------------------------------------


@pytest.fixture
def blank_token(tmp_path: Path) -> Iterator[SoftHsm]:
    """A token without the key ceremony: the test makes the keys."""
    with softhsm_token(tmp_path / "hsm", ceremony=False) as token, softhsm_in_this_process(token):
        yield token


def _session(token: SoftHsm) -> object:
    import pkcs11

    found = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label=token.token_label)
    try:
        return found.open(user_pin=token.pin, rw=True)
    except pkcs11.UserAlreadyLoggedIn:  # a sealer of this process is logged in
        return found.open(rw=True)


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


def _attributes(key: object) -> dict[str, bool]:
    from pkcs11 import Attribute

    return {name: bool(key[getattr(Attribute, name)]) for name in SAFE}  # type: ignore[index]


def test_the_hsm_key_ceremony_makes_a_key_for_encryption_only(tmp_path: Path) -> None:
    from pkcs11 import Attribute, ObjectClass

    # The token is made by `backvault vault init-hsm`, in another process.
    with softhsm_token(tmp_path / "hsm") as token, softhsm_in_this_process(token):
        session = _session(token)
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))  # type: ignore[attr-defined]
        assert [key[Attribute.LABEL] for key in keys] == ["backvault-sealing-v1"]
        assert _attributes(keys[0]) == SAFE
        assert keys[0][Attribute.ALWAYS_SENSITIVE] and keys[0][Attribute.NEVER_EXTRACTABLE]
        assert not keys[0][Attribute.COPYABLE]
        session.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("WRAP", True),
        ("UNWRAP", True),
        ("SIGN", True),
        ("VERIFY", True),
        ("DERIVE", True),
        ("MODIFIABLE", True),
        ("SENSITIVE", False),
        ("EXTRACTABLE", True),
        ("TOKEN", False),
        ("PRIVATE", False),
    ],
)
def test_a_weaker_hsm_key_is_refused_naming_the_attribute(
    blank_token: SoftHsm, attribute: str, value: bool
) -> None:
    from pkcs11 import Attribute, KeyType

    session = _session(blank_token)
    template = {getattr(Attribute, name): wanted for name, wanted in SAFE.items()}
    template[getattr(Attribute, attribute)] = value
    # TOKEN=false makes a session key, which other sessions of this process still see.
    session.generate_key(  # type: ignore[attr-defined]
        KeyType.AES, 256, label="backvault-sealing-v1", store=SAFE["TOKEN"], template=template
    )
    try:
        with pytest.raises(SealingError) as refused:
            Pkcs11Sealer(SOFTHSM_MODULE, blank_token.token_label, blank_token.pin, create=False)
        assert f"CKA_{attribute}={str(value).lower()}" in str(refused.value)
        assert "rotate-sealing-key" in str(refused.value)
    finally:
        session.close()  # type: ignore[attr-defined]


def test_a_weak_key_of_an_older_deployment_moves_to_a_safe_new_version(
    blank_token: SoftHsm,
) -> None:
    """A key made the way the vault made it until now (python-pkcs11's defaults: may also
    wrap, unwrap, sign and verify; modifiable) under the unversioned label: a node refuses
    it, the rotation accepts it to make a safe version 2, which a node then accepts."""
    from pkcs11 import Attribute, KeyType

    session = _session(blank_token)
    session.generate_key(KeyType.AES, 256, label="backvault-sealing", store=True)  # type: ignore[attr-defined]
    session.close()  # type: ignore[attr-defined]
    args = (SOFTHSM_MODULE, blank_token.token_label, blank_token.pin)
    with pytest.raises(SealingError, match="CKA_WRAP=true"):
        Pkcs11Sealer(*args, create=False)

    rotator = Pkcs11Sealer(*args, create=False, accept_weak_keys=True)
    old = rotator.seal(b"sealed long ago", PURPOSE)
    assert key_version_of(old) == 1
    assert rotator.create_version() == 2
    rotator.close()

    node = Pkcs11Sealer(*args, create=False)
    assert node.versions() == [1, 2] and node.current_version == 2
    new = node.seal(b"new", PURPOSE)
    assert key_version_of(new) == 2
    assert node.open(old, PURPOSE) == b"sealed long ago"
    node.check()
    session = _session(blank_token)
    fresh = session.get_key(label="backvault-sealing-v2")  # type: ignore[attr-defined]
    assert _attributes(fresh) == SAFE
    assert fresh[Attribute.PRIVATE]
    session.close()  # type: ignore[attr-defined]
    node.destroy_version(1)
    assert node.versions() == [2]
    with pytest.raises(SealingError, match="does not hold"):
        node.open(old, PURPOSE)
    assert node.open(new, PURPOSE) == b"new"
    node.close()


def _import_key(token: SoftHsm, label: str, value: bytes, **attributes: bool) -> None:
    """A key created from a value someone knows (C_CreateObject), with every attribute the
    vault asks of a generated key."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    template = {getattr(Attribute, name): wanted for name, wanted in SAFE.items()}
    template.update({getattr(Attribute, name): value for name, value in attributes.items()})
    template.update(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: value,
            Attribute.LABEL: label,
        }
    )
    session = _session(token)
    session.create_object(template)  # type: ignore[attr-defined]
    session.close()  # type: ignore[attr-defined]


def test_an_imported_hsm_key_does_not_seal_unless_cloned_keys_are_accepted(
    blank_token: SoftHsm, tmp_path: Path
) -> None:
    """A key imported with a known value (CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE
    false, all else as safe as a generated key) — a key ceremony done with another tool,
    say — is refused as the key that seals; an operator whose HSM cloning procedure
    clears those flags opts in with accept_cloned_keys."""
    known = b"K" * 32
    _import_key(blank_token, "backvault-sealing-v1", known)
    args = (SOFTHSM_MODULE, blank_token.token_label, blank_token.pin)
    with pytest.raises(SealingError) as refused:
        Pkcs11Sealer(*args, create=False, records=database_records(tmp_path))
    assert "CKA_ALWAYS_SENSITIVE=false" in str(refused.value)
    assert "pkcs11_accept_cloned_keys = true" in str(refused.value)

    accepted = Pkcs11Sealer(
        *args, create=False, accept_cloned_keys=True, records=database_records(tmp_path)
    )
    sealed = accepted.seal(b"secret", PURPOSE)
    # The rotation moves values to a key generated inside the HSM, which then seals.
    assert accepted.create_version() == 2
    accepted.close()
    node = Pkcs11Sealer(*args, create=False, records=database_records(tmp_path))
    assert node.current_version == 2 and node.open(sealed, PURPOSE) == b"secret"
    node.close()


@pytest.mark.parametrize("planted", ["imported, known value", "generated, CKA_PRIVATE=false"])
def test_a_key_planted_in_the_hsm_as_the_next_version_is_never_used(
    blank_token: SoftHsm, tmp_path: Path, planted: str
) -> None:
    from pkcs11 import Attribute, KeyType

    args = (SOFTHSM_MODULE, blank_token.token_label, blank_token.pin)
    node = Pkcs11Sealer(*args, create=True, records=database_records(tmp_path))
    if planted.startswith("imported"):
        _import_key(blank_token, "backvault-sealing-v2", b"K" * 32)
    else:
        session = _session(blank_token)
        template = {getattr(Attribute, name): wanted for name, wanted in SAFE.items()}
        template[Attribute.PRIVATE] = False
        session.generate_key(  # type: ignore[attr-defined]
            KeyType.AES, 256, label="backvault-sealing-v2", store=True, template=template
        )
        session.close()  # type: ignore[attr-defined]
    node.refresh()
    assert node.versions() == [1]
    assert [(key.version, key.reason) for key in node.ignored_keys()] == [(2, "unrecorded")]
    assert key_version_of(node.seal(b"secret", PURPOSE)) == 1
    # A rotation steps over the number the planted key took.
    assert node.create_version() == 3
    assert node.versions() == [1, 3]
    node.close()


# A node's sweep, in its own process: the vault's sealer looking at the token's keys again
# and again, until told to stop; it prints every error it met.
_LISTING_NODE = """
import pathlib, sys
from backvault.vault.sealing import Pkcs11Sealer
module, label, pin, stop = sys.argv[1:]
sealer = Pkcs11Sealer(module, label, pin, create=False)
print("ready", flush=True)
errors, looks = [], 0
while not pathlib.Path(stop).exists():
    try:
        sealer.refresh()
        looks += 1
    except Exception as exc:
        errors.append(repr(exc))
print(looks, errors, flush=True)
"""


def test_keys_made_while_a_node_looks_at_the_token_come_out_whole(tmp_path: Path) -> None:
    """SoftHSM2 makes a key one attribute write at a time; a process that read an
    attribute of a key caught part-way wrote defaults over it from its stale copy. A
    rotation's new key (or another application's) made while a node swept came out
    broken for every process: missing, FunctionFailed, MechanismInvalid (the CI flake).
    The node now looks only at keys whose length is set, which have every attribute."""
    import subprocess
    import sys

    from pkcs11 import Attribute, KeyType, MechanismFlag
    from pkcs11.mechanisms import GCMParams, Mechanism

    stop = tmp_path / "stop"
    with softhsm_token(tmp_path / "hsm") as token:
        command = [sys.executable, "-c", _LISTING_NODE, SOFTHSM_MODULE, token.token_label]
        node = subprocess.Popen(
            [*command, token.pin, str(stop)],
            env={**os.environ, **token.env},
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert node.stdout is not None
            assert node.stdout.readline().strip() == "ready"
            template = {getattr(Attribute, name): value for name, value in SAFE.items()}
            # Keys of another application, and keys labelled as the next versions (as a
            # rotation makes them): the node also looks those up by label.
            labels = [f"another-application-{index}" for index in range(52)]
            labels += [f"backvault-sealing-v{version}" for version in range(2, 10)]
            with softhsm_in_this_process(token):
                session = _session(token)
                for label in labels:
                    session.generate_key(  # type: ignore[attr-defined]
                        KeyType.AES,
                        256,
                        label=label,
                        store=True,
                        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                        template=template,
                    )
                session.close()  # type: ignore[attr-defined]
        finally:
            stop.touch()
            out, _ = node.communicate(timeout=60)
        looks, errors = out.split(" ", 1)
        assert errors.strip() == "[]"
        assert int(looks) > 0

        with softhsm_in_this_process(token):  # a fresh process's view: what is on disk
            session = _session(token)
            for label in labels:
                key = session.get_key(label=label)  # type: ignore[attr-defined]
                assert _attributes(key) == SAFE
                assert key[Attribute.LOCAL] and key[Attribute.VALUE_LEN] == 32
                nonce = secrets.token_bytes(12)
                sealed = key.encrypt(
                    b"x", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, b"", 128)
                )
                assert (
                    key.decrypt(
                        sealed,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, b"", 128),
                    )
                    == b"x"
                )
            session.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("bits", [128, 192])
def test_an_aes_key_of_another_length_labelled_as_a_version_is_reported_never_used(
    tmp_path: Path, bits: int
) -> None:
    """Someone with the PIN plants `backvault-sealing-v2` as a shorter AES key. A node
    looks for sealing keys by their length (AES-256), so it would not even see it: it is
    looked for separately, reported as ignored, and its version skipped by rotation."""
    from pkcs11 import Attribute, KeyType, MechanismFlag

    with softhsm_token(tmp_path / "hsm") as token, softhsm_in_this_process(token):
        session = _session(token)
        session.generate_key(  # type: ignore[attr-defined]
            KeyType.AES,
            bits,
            label="backvault-sealing-v2",
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={getattr(Attribute, name): value for name, value in SAFE.items()},
        )
        session.close()  # type: ignore[attr-defined]
        sealer = Pkcs11Sealer(SOFTHSM_MODULE, token.token_label, token.pin, create=False)
        try:
            assert sealer.versions() == [1]
            ignored = sealer.ignored_keys()
            assert [(key.version, key.reason) for key in ignored] == [(2, "not_aes256")]
            assert (
                ignored[0]
                .describe()
                .startswith(
                    "ignoring the sealing key labelled 'backvault-sealing-v2' for key version 2"
                )
            )
            assert key_version_of(sealer.seal(b"x", PURPOSE)) == 1
            assert sealer.create_version() == 3  # the number the planted key claims is skipped
            assert key_version_of(sealer.seal(b"y", PURPOSE)) == 3
        finally:
            sealer.close()


def _unwrapped_copy(token: SoftHsm, label: str) -> int:
    """A key copied onto the token by unwrapping it without naming its length (an HSM's
    cloning procedure): SoftHSM2 stores CKA_VALUE_LEN 0. Returns the length stored."""
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    session: Any = _session(token)
    try:
        wrapping = session.generate_key(
            KeyType.AES, 256, store=False, template={Attribute.WRAP: True, Attribute.UNWRAP: True}
        )
        original = session.generate_key(
            KeyType.AES, 256, store=False, template={Attribute.EXTRACTABLE: True}
        )
        copy = wrapping.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            wrapping.wrap_key(original, mechanism=Mechanism.AES_KEY_WRAP),
            label=label,
            mechanism=Mechanism.AES_KEY_WRAP,
            store=True,
            # SoftHSM2 sets CKA_TOKEN from store= and refuses CKA_MODIFIABLE false here.
            template={
                getattr(Attribute, name): value
                for name, value in SAFE.items()
                if name not in ("TOKEN", "MODIFIABLE")
            },
        )
        return int(copy[Attribute.VALUE_LEN])
    finally:
        session.close()


def test_a_version_s_key_unwrapped_without_its_length_is_still_found(tmp_path: Path) -> None:
    """Searching by length alone (to keep off keys being made) hid such a copy: nodes
    found no key, and `init-hsm` quietly made a second `backvault-sealing-v1` beside it.
    The versions in use and the next ones are also looked up by their exact labels."""
    from pkcs11 import Attribute, ObjectClass

    with softhsm_token(tmp_path / "hsm", ceremony=False) as token, softhsm_in_this_process(token):
        assert _unwrapped_copy(token, "backvault-sealing-v1") == 0
        # What the rotation commands make (SoftHSM2's copies stay CKA_MODIFIABLE).
        args = (SOFTHSM_MODULE, token.token_label, token.pin)
        sealer = Pkcs11Sealer(*args, create=True, accept_weak_keys=True, accept_cloned_keys=True)
        try:
            assert not sealer.created and sealer.versions() == [1]
            assert sealer.open(sealer.seal(b"x", PURPOSE), PURPOSE) == b"x"
            # A key planted, unwrapped the same way, under the next version's label.
            assert _unwrapped_copy(token, "backvault-sealing-v2") == 0
            sealer.refresh()
            assert [(key.version, key.reason) for key in sealer.ignored_keys()] == [
                (2, "unrecorded")
            ]
            assert sealer.create_version() == 3
        finally:
            sealer.close()
        session = _session(token)
        labels = [
            key[Attribute.LABEL]
            for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})  # type: ignore[attr-defined]
        ]
        session.close()  # type: ignore[attr-defined]
        assert sorted(labels) == [f"backvault-sealing-v{v}" for v in (1, 2, 3)]
