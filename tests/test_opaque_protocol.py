"""OPAQUE through the public (randomized) API: round trips, wrong passwords, tampering,
replays, malformed input."""

from __future__ import annotations

import hmac
from dataclasses import replace
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backvault.opaque import (
    KE1,
    KE2,
    KE3,
    Argon2idKSF,
    ClientAuthenticationError,
    EnvelopeRecoveryError,
    IdentityKSF,
    InvalidMessageError,
    OpaqueConfig,
    RegistrationRecord,
    RegistrationRequest,
    RegistrationResponse,
    ServerAuthenticationError,
    client,
    group,
    messages,
    server,
)

CONFIG = OpaqueConfig(ksf=IdentityKSF())
CRED_ID = b"account-42"


def register(password: bytes, config: OpaqueConfig = CONFIG):  # type: ignore[no-untyped-def]
    keys = server.generate_server_key_pair()
    seed = server.generate_oprf_seed()
    request, state = client.create_registration_request(password)
    response = server.create_registration_response(
        RegistrationRequest.from_bytes(request.to_bytes()), keys.public_key, CRED_ID, seed
    )
    record, export_key = client.finalize_registration_request(
        state, RegistrationResponse.from_bytes(response.to_bytes()), config
    )
    return keys, seed, RegistrationRecord.from_bytes(record.to_bytes()), export_key


def login(keys, seed, record, password, config=CONFIG):  # type: ignore[no-untyped-def]
    ke1, client_state = client.generate_ke1(password)
    ke2, server_state = server.generate_ke2(
        config, keys, record, CRED_ID, seed, KE1.from_bytes(ke1.to_bytes())
    )
    result = client.generate_ke3(client_state, KE2.from_bytes(ke2.to_bytes()), config)
    session_key = server.server_finish(server_state, KE3.from_bytes(result.ke3.to_bytes()))
    return result, session_key


def test_round_trip_gives_same_keys_on_both_sides() -> None:
    keys, seed, record, export_key = register(b"correct horse")
    result, session_key = login(keys, seed, record, b"correct horse")
    assert result.session_key == session_key
    assert result.export_key == export_key
    # A second login gives a fresh session key but the same export key.
    result2, session_key2 = login(keys, seed, record, b"correct horse")
    assert session_key2 != session_key
    assert result2.export_key == export_key


def test_round_trip_with_argon2id_and_identities() -> None:
    config = OpaqueConfig(
        ksf=Argon2idKSF(time_cost=1, memory_cost_kib=1024, parallelism=1),
        client_identity=b"alice",
        server_identity=b"vault.example",
    )
    keys, seed, record, export_key = register(b"pw", config)
    result, session_key = login(keys, seed, record, b"pw", config)
    assert result.export_key == export_key and result.session_key == session_key


def test_argon2id_and_identity_ksf_give_different_export_keys() -> None:
    slow = OpaqueConfig(ksf=Argon2idKSF(time_cost=1, memory_cost_kib=1024, parallelism=1))
    keys = server.generate_server_key_pair()
    seed = server.generate_oprf_seed()
    exports = []
    for config in (CONFIG, slow):
        request, state = client.create_registration_request(b"pw")
        response = server.create_registration_response(request, keys.public_key, CRED_ID, seed)
        _, export_key = client.finalize_registration_request(state, response, config)
        exports.append(export_key)
    assert exports[0] != exports[1]


def test_default_ksf_is_the_memory_constrained_argon2id_profile() -> None:
    ksf = OpaqueConfig().ksf
    assert isinstance(ksf, Argon2idKSF)
    assert (ksf.time_cost, ksf.memory_cost_kib, ksf.parallelism) == (3, 65536, 4)
    assert ksf.salt == bytes(16)


def test_wrong_password_fails_at_the_client_and_the_server_refuses_ke3() -> None:
    keys, seed, record, _ = register(b"right")
    ke1, client_state = client.generate_ke1(b"wrong")
    ke2, server_state = server.generate_ke2(CONFIG, keys, record, CRED_ID, seed, ke1)
    with pytest.raises(EnvelopeRecoveryError):
        client.generate_ke3(client_state, ke2, CONFIG)
    # Whatever a client that ignores the failure sends, the server refuses it.
    with pytest.raises(ClientAuthenticationError):
        server.server_finish(server_state, KE3(bytes(64)))


def test_wrong_context_fails() -> None:
    keys, seed, record, _ = register(b"pw")
    ke1, client_state = client.generate_ke1(b"pw")
    ke2, _ = server.generate_ke2(CONFIG, keys, record, CRED_ID, seed, ke1)
    other = replace(CONFIG, context=b"another deployment")
    with pytest.raises(ServerAuthenticationError):
        client.generate_ke3(client_state, ke2, other)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("offset", [40, 70, 100, 200, 224, 260, 319], ids=lambda o: f"byte{o}")
def test_tampered_ke2_is_rejected(offset: int) -> None:
    # Offsets past the evaluated element: masking nonce, masked response, server nonce,
    # server MAC. (Flipping a bit of an element mostly makes it fail to parse.)
    keys, seed, record, _ = register(b"pw")
    ke1, client_state = client.generate_ke1(b"pw")
    ke2, _ = server.generate_ke2(CONFIG, keys, record, CRED_ID, seed, ke1)
    try:
        tampered = KE2.from_bytes(flip(ke2.to_bytes(), offset))
    except InvalidMessageError:
        return  # the parse already refused it
    with pytest.raises((EnvelopeRecoveryError, ServerAuthenticationError)):
        client.generate_ke3(client_state, tampered, CONFIG)


@pytest.mark.parametrize("offset", [0, 31, 32, 63])
def test_tampered_ke3_is_rejected(offset: int) -> None:
    keys, seed, record, _ = register(b"pw")
    ke1, client_state = client.generate_ke1(b"pw")
    ke2, server_state = server.generate_ke2(CONFIG, keys, record, CRED_ID, seed, ke1)
    ke3 = client.generate_ke3(client_state, ke2, CONFIG).ke3
    with pytest.raises(ClientAuthenticationError):
        server.server_finish(server_state, KE3(flip(ke3.to_bytes(), offset)))


def test_ke3_replayed_on_another_session_is_rejected() -> None:
    keys, seed, record, _ = register(b"pw")
    ke1, client_state = client.generate_ke1(b"pw")
    ke2, first_state = server.generate_ke2(CONFIG, keys, record, CRED_ID, seed, ke1)
    recorded_ke3 = client.generate_ke3(client_state, ke2, CONFIG).ke3
    assert server.server_finish(first_state, recorded_ke3)
    # An attacker replays the recorded KE1 and KE3: the server's new nonce and keyshare
    # change the transcript, so the old KE3 does not verify.
    _, second_state = server.generate_ke2(CONFIG, keys, record, CRED_ID, seed, ke1)
    with pytest.raises(ClientAuthenticationError):
        server.server_finish(second_state, recorded_ke3)


def test_fake_ke2_looks_real_and_never_logs_in() -> None:
    keys = server.generate_server_key_pair()
    seed = server.generate_oprf_seed()
    ke1, client_state = client.generate_ke1(b"anything")
    ke2, state = server.generate_fake_ke2(CONFIG, keys, b"nobody", seed, ke1)
    assert len(ke2.to_bytes()) == messages.KE2.size() == 320
    with pytest.raises(EnvelopeRecoveryError):
        client.generate_ke3(client_state, ke2, CONFIG)
    with pytest.raises(ClientAuthenticationError):
        server.server_finish(state, KE3(bytes(64)))


def test_a_stable_fake_record_is_the_same_per_identifier_and_never_logs_in() -> None:
    """RFC 9807 Section 10.9: the fake record of an identifier does not change between
    logins (a fresh one each time would tell that the account has no record)."""
    keys = server.generate_server_key_pair()
    seed, fake_seed = server.generate_oprf_seed(), bytes(range(32))
    first = server.stable_fake_record(fake_seed, b"backvault-fake:nobody")
    assert (
        first.to_bytes()
        == server.stable_fake_record(fake_seed, b"backvault-fake:nobody").to_bytes()
    )
    assert (
        first.to_bytes() != server.stable_fake_record(fake_seed, b"backvault-fake:other").to_bytes()
    )
    assert (
        first.to_bytes()
        != server.stable_fake_record(bytes(32), b"backvault-fake:nobody").to_bytes()
    )
    ke1, client_state = client.generate_ke1(b"anything")
    ke2, state = server.generate_stable_fake_ke2(
        CONFIG, keys, fake_seed, b"backvault-fake:nobody", seed, ke1
    )
    assert len(ke2.to_bytes()) == messages.KE2.size()
    with pytest.raises(EnvelopeRecoveryError):
        client.generate_ke3(client_state, ke2, CONFIG)
    with pytest.raises(ClientAuthenticationError):
        server.server_finish(state, KE3(bytes(64)))


def test_macs_are_compared_in_constant_time() -> None:
    keys, seed, record, _ = register(b"pw")
    ke1, client_state = client.generate_ke1(b"pw")
    ke2, server_state = server.generate_ke2(CONFIG, keys, record, CRED_ID, seed, ke1)
    with mock.patch(
        "backvault.opaque.protocol.hmac.compare_digest", wraps=hmac.compare_digest
    ) as spy:
        ke3 = client.generate_ke3(client_state, ke2, CONFIG).ke3
        server.server_finish(server_state, ke3)
    # envelope tag, server MAC, client MAC
    assert spy.call_count == 3


# --- malformed input -----------------------------------------------------------------

VALID_ELEMENT = group.scalar_mult_base(group.random_scalar())
NON_CANONICAL = bytes([0xED] + [0xFF] * 30 + [0x7F])  # p itself: not reduced
ORDER_BYTES = group.GROUP_ORDER.to_bytes(32, "little")


@pytest.mark.parametrize("cls", messages.ALL_MESSAGES, ids=lambda c: c.__name__)
def test_wrong_length_is_rejected(cls: type[messages.Message]) -> None:
    for size in (0, cls.size() - 1, cls.size() + 1):
        with pytest.raises(InvalidMessageError):
            cls.from_bytes(bytes(size))


@pytest.mark.parametrize(
    "bad",
    [bytes(32), NON_CANONICAL, b"\xff" * 32, flip(VALID_ELEMENT, 0)],
    ids=["identity", "non-canonical", "all-ff", "off-curve-or-noncanonical"],
)
def test_bad_elements_are_rejected(bad: bytes) -> None:
    if bad == flip(VALID_ELEMENT, 0) and group_is_valid(bad):
        pytest.skip("this bit flip happened to land on another valid element")
    with pytest.raises(InvalidMessageError):
        RegistrationRequest.from_bytes(bad)
    with pytest.raises(InvalidMessageError):
        RegistrationResponse.from_bytes(VALID_ELEMENT + bad)
    with pytest.raises(InvalidMessageError):
        KE1.from_bytes(VALID_ELEMENT + bytes(32) + bad)


def group_is_valid(data: bytes) -> bool:
    try:
        group.deserialize_element(data)
        return True
    except InvalidMessageError:
        return False


@pytest.mark.parametrize("bad", [bytes(32), ORDER_BYTES, b"\xff" * 32])
def test_bad_scalars_are_rejected(bad: bytes) -> None:
    with pytest.raises(InvalidMessageError):
        group.deserialize_scalar(bad)
    with pytest.raises(InvalidMessageError):
        server.server_key_pair_from_private_key(bad)
    with pytest.raises(InvalidMessageError):
        client_blind_with(bad)


def client_blind_with(scalar: bytes) -> None:
    from backvault.opaque import oprf

    oprf.blind(b"pw", scalar)


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(InvalidMessageError):
        KE3.from_bytes("not bytes")  # type: ignore[arg-type]


def test_messages_do_not_print_their_contents() -> None:
    ke3 = KE3(b"\xab" * 64)
    assert "ab" not in repr(ke3)


# --- hypothesis round trips of every message type ------------------------------------

elements = st.builds(lambda _: group.scalar_mult_base(group.random_scalar()), st.integers())


def message_strategy(cls: type[messages.Message]) -> st.SearchStrategy[messages.Message]:
    parts = {}
    for name, kind in cls.LAYOUT:
        if kind == messages.ELEMENT:
            parts[name] = elements
        elif isinstance(kind, int):
            parts[name] = st.binary(min_size=kind, max_size=kind)
        else:
            parts[name] = message_strategy(kind)
    return st.builds(cls, **parts)


@pytest.mark.parametrize("cls", messages.ALL_MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(cls: type[messages.Message], data: st.DataObject) -> None:
    message = data.draw(message_strategy(cls))
    encoded = message.to_bytes()
    assert len(encoded) == cls.size()
    assert cls.from_bytes(encoded) == message


@pytest.mark.parametrize("cls", messages.ALL_MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=400))
def test_parsers_only_raise_invalid_message(cls: type[messages.Message], blob: bytes) -> None:
    try:
        parsed = cls.from_bytes(blob)
    except InvalidMessageError:
        return
    assert parsed.to_bytes() == blob
