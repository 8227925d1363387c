"""Issue 12, point 1: no endpoint evaluates the OPRF under a key a live or earlier record
uses, except the counted login start.

Each test runs the attack as a holder of the account token would, against a real vault
process: capture one KE2 (whose masked response any password guess can be checked
against offline, given an OPRF evaluation under the record's key), then ask every other
endpoint for evaluations of blinded guesses and test each guess offline.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backvault.opaque import (
    KE2,
    IdentityKSF,
    OpaqueConfig,
    RegistrationResponse,
    client,
    group,
    oprf,
    protocol,
)
from backvault.opaque.messages import HASH_SIZE, MASKED_RESPONSE_SIZE, PUBLIC_KEY_SIZE
from backvault.vaultclient.http import VaultClient, VaultRefused
from tests.servers import VaultNode, make_node

CONFIG = OpaqueConfig(ksf=IdentityKSF())
SECRET = b"S" * 48
RIGHT = b"correct horse battery"
GUESSES = [f"guess-{i}".encode() for i in range(49)] + [RIGHT]


def wrap(_export_key: bytes) -> bytes:
    return SECRET


@pytest.fixture
def node(tmp_path: Path) -> Iterator[VaultNode]:
    # Many registrations in progress at once, so the attack is not stopped by that limit.
    vault = make_node(
        tmp_path / "vault",
        f"sqlite:///{tmp_path / 'vault.db'}",
        env={"BACKVAULT_SERVER_MAX_PENDING_REGISTRATIONS": "1000"},
    ).start()
    yield vault
    assert vault.stop() == 0


def post(node: VaultNode, token: str, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        node.url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def captured_login(node: VaultNode, token: str) -> tuple[str, KE2]:
    """One counted login start: the attacker keeps KE2 to test guesses against."""
    ke1, _ = client.generate_ke1(b"anything")
    answer = post(node, token, "/v1/login/start", {"ke1": b64(ke1.to_bytes())})
    assert answer.status_code == 200, answer.text
    return answer.json()["login_id"], KE2.from_bytes(base64.b64decode(answer.json()["ke2"]))


def captured_ke2(node: VaultNode, token: str) -> KE2:
    return captured_login(node, token)[1]


def guess_opens(guess: bytes, blind: bytes, evaluated: bytes, ke2: KE2, server_key: bytes) -> bool:
    """The offline test: the OPRF output for ``guess`` unmasks KE2's credential response
    to the vault's (public) server key exactly when the guess is the password."""
    oprf_output = oprf.finalize(guess, blind, evaluated)
    randomized = protocol.extract(b"", oprf_output + CONFIG.ksf.stretch(oprf_output))
    masking_key = protocol.expand(randomized, b"MaskingKey", HASH_SIZE)
    response = ke2.credential_response
    pad = protocol.expand(
        masking_key, response.masking_nonce + b"CredentialResponsePad", MASKED_RESPONSE_SIZE
    )
    unmasked = bytes(a ^ b for a, b in zip(pad, response.masked_response, strict=True))
    return unmasked[:PUBLIC_KEY_SIZE] == server_key


def via_registration_start(node: VaultNode, token: str, guess: bytes) -> tuple[bytes, bytes, bytes]:
    """(blind, evaluated element, server public key) from one registration start."""
    blind = group.random_scalar()
    blinded = oprf.blind(guess, blind)
    answer = post(node, token, "/v1/registration/start", {"registration_request": b64(blinded)})
    assert answer.status_code == 200, answer.text
    response = RegistrationResponse.from_bytes(
        base64.b64decode(answer.json()["registration_response"])
    )
    return blind, response.evaluated_message, response.server_public_key


def via_login_start(node: VaultNode, token: str, guess: bytes) -> tuple[bytes, bytes]:
    """(blind, evaluated element) from one login start."""
    blind = group.random_scalar()
    ke1, _ = protocol.generate_ke1(
        guess,
        blind=blind,
        client_nonce=bytes(32),
        client_keyshare_seed=b"k" * 32,
    )
    answer = post(node, token, "/v1/login/start", {"ke1": b64(ke1.to_bytes())})
    assert answer.status_code == 200, answer.text
    ke2 = KE2.from_bytes(base64.b64decode(answer.json()["ke2"]))
    return blind, ke2.credential_response.evaluated_message


def server_public_key(node: VaultNode, token: str) -> bytes:
    return via_registration_start(node, token, b"x")[2]


def attack_with_registration_starts(node: VaultNode, token: str, ke2: KE2) -> list[bytes]:
    found = []
    for guess in GUESSES:
        blind, evaluated, server_key = via_registration_start(node, token, guess)
        if guess_opens(guess, blind, evaluated, ke2, server_key):
            found.append(guess)
    return found


def test_registration_start_and_login_start_evaluate_under_different_keys(
    node: VaultNode,
) -> None:
    token = node.add_account("alice")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(RIGHT, wrap)
    blind = group.random_scalar()
    blinded = oprf.blind(RIGHT, blind)
    registration = post(
        node, token, "/v1/registration/start", {"registration_request": b64(blinded)}
    ).json()
    evaluated_by_registration = base64.b64decode(registration["registration_response"])[:32]
    ke1, _ = protocol.generate_ke1(
        RIGHT, blind=blind, client_nonce=bytes(32), client_keyshare_seed=b"k" * 32
    )
    assert ke1.credential_request.blinded_message == blinded
    login = post(node, token, "/v1/login/start", {"ke1": b64(ke1.to_bytes())}).json()
    evaluated_by_login = base64.b64decode(login["ke2"])[:32]
    assert evaluated_by_registration != evaluated_by_login
    # A second registration start evaluates under yet another fresh key.
    again = post(node, token, "/v1/registration/start", {"registration_request": b64(blinded)})
    assert base64.b64decode(again.json()["registration_response"])[:32] not in (
        evaluated_by_registration,
        evaluated_by_login,
    )


def test_one_counted_login_then_fifty_registration_starts_find_nothing(node: VaultNode) -> None:
    token = node.add_account("alice")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(RIGHT, wrap)
        ke2 = captured_ke2(node, token)
        # The check itself is sound: an evaluation under the record's key (a counted
        # login start) does reveal the right guess.
        server_key = server_public_key(node, token)
        blind, evaluated = via_login_start(node, token, RIGHT)
        assert guess_opens(RIGHT, blind, evaluated, ke2, server_key)
        assert attack_with_registration_starts(node, token, ke2) == []
        status = vc.status()
        assert status["attempts_used"] == 2  # the two login starts, nothing else
        events = [e["event"] for e in vc.audit()]
        assert events.count("registration_started") == len(GUESSES) + 2  # + setup, key probe
        # The right password still logs in (the attack did not disturb the record).
        assert vc.login(RIGHT).wrapped_secret == SECRET


def test_the_attack_finds_nothing_after_the_record_was_replaced(node: VaultNode) -> None:
    token = node.add_account("alice")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(RIGHT, wrap)
        old_ke2 = captured_ke2(node, token)
        vc.register(b"the new password", wrap)
        assert attack_with_registration_starts(node, token, old_ke2) == []
        # Counted login starts now evaluate under the new record's key, not the old one.
        server_key = server_public_key(node, token)
        blind, evaluated = via_login_start(node, token, RIGHT)
        assert not guess_opens(RIGHT, blind, evaluated, old_ke2, server_key)
        assert any(e["event"] == "record_replaced" for e in vc.audit())


@pytest.mark.parametrize("how", ["deleted", "erased at the limit"])
def test_the_attack_finds_nothing_after_the_record_is_gone(node: VaultNode, how: str) -> None:
    token = node.add_account("alice")
    with VaultClient(node.url, token, CONFIG) as vc:
        vc.register(RIGHT, wrap, max_attempts=3)
        login_id, ke2 = captured_login(node, token)
        server_key = server_public_key(node, token)
        if how == "deleted":
            vc.delete_record()
        else:
            with pytest.raises(VaultRefused):
                vc.login_finish(login_id, bytes(64))
            for _ in range(2):
                with pytest.raises(VaultRefused):
                    vc.login(b"wrong")
        assert vc.status()["exists"] is False
        # Without a record, login start answers a fake KE2, uncounted: its OPRF key must
        # not be the one the erased record used.
        for guess in GUESSES[-5:]:
            blind, evaluated = via_login_start(node, token, guess)
            assert not guess_opens(guess, blind, evaluated, ke2, server_key)
        assert attack_with_registration_starts(node, token, ke2) == []


def test_finish_with_another_starts_handle_is_refused(node: VaultNode) -> None:
    alice = node.add_account("alice")
    mallory = node.add_account("mallory")
    with VaultClient(node.url, alice, CONFIG) as vc:
        request, state = client.create_registration_request(RIGHT)
        started = vc.registration_start(request.to_bytes())
        # A racing holder of the same token starts its own registration meanwhile.
        racing = vc.registration_start(client.create_registration_request(b"evil")[0].to_bytes())
        assert racing.registration_id != started.registration_id
        response = RegistrationResponse.from_bytes(started.response)
        record, _ = client.finalize_registration_request(state, response, CONFIG)
        body = {"record": b64(record.to_bytes()), "wrapped_secret": b64(SECRET)}
        with VaultClient(node.url, mallory, CONFIG) as other_account:
            cross = other_account.registration_start(request.to_bytes())
        for handle in ("x" * 32, cross.registration_id):
            refused = post(
                node, alice, "/v1/registration/finish", {**body, "registration_id": handle}
            )
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"] == "registration_not_found"
        assert post(node, alice, "/v1/registration/finish", body).status_code == 422
        assert vc.status()["exists"] is False
        ok = post(
            node,
            alice,
            "/v1/registration/finish",
            {**body, "registration_id": started.registration_id},
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["fingerprint"] == record.fingerprint()
        again = post(
            node,
            alice,
            "/v1/registration/finish",
            {**body, "registration_id": started.registration_id},
        )
        assert again.status_code == 404  # a handle is single use
        # The record is bound to the user's own start: the user's password logs in.
        assert vc.login(RIGHT).wrapped_secret == SECRET


def test_registrations_in_progress_beyond_the_limit_drop_the_oldest(tmp_path: Path) -> None:
    """A token holder cannot block the owner's registration by starting many: past the
    limit, the oldest ones from the same address give way (a refusal would block the
    owner's `password change`), so a flood from elsewhere pushes out only its own."""
    vault = make_node(
        tmp_path / "v",
        f"sqlite:///{tmp_path / 'v.db'}",
        env={"BACKVAULT_SERVER_MAX_PENDING_REGISTRATIONS": "2"},
    ).start()

    def flood_from(address: str, count: int) -> list[int]:
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(transport=transport, timeout=30) as http:
            return [
                http.post(
                    vault.url + "/v1/registration/start",
                    json={"registration_request": b64(oprf.blind(b"x", group.random_scalar()))},
                    headers={"Authorization": f"Bearer {token}"},
                ).status_code
                for _ in range(count)
            ]

    try:
        token = vault.add_account("alice")
        with VaultClient(vault.url, token, CONFIG) as vc:
            request, state = client.create_registration_request(RIGHT)
            first = vc.registration_start(request.to_bytes())  # the owner, from 127.0.0.1
            assert set(flood_from("127.0.0.2", 10)) == {200}  # the holder, from elsewhere
            record, _ = client.finalize_registration_request(
                state, RegistrationResponse.from_bytes(first.response), CONFIG
            )
            vc.registration_finish(first.registration_id, record.to_bytes(), SECRET)
            assert vc.login(RIGHT).wrapped_secret == SECRET
            # From the owner's own address, the oldest of its starts give way.
            request, state = client.create_registration_request(RIGHT)
            mine = vc.registration_start(request.to_bytes())
            for _ in range(2):
                vc.registration_start(client.create_registration_request(b"x")[0].to_bytes())
            record, _ = client.finalize_registration_request(
                state, RegistrationResponse.from_bytes(mine.response), CONFIG
            )
            with pytest.raises(VaultRefused) as dropped:
                vc.registration_finish(mine.registration_id, record.to_bytes(), SECRET)
            assert dropped.value.code == "registration_not_found"
            # Many addresses together fill the account's larger limit (2 x 8): then new
            # starts are refused until they expire, and revoking the token is the remedy.
            for last in range(3, 11):
                flood_from(f"127.0.0.{last}", 2)
            assert flood_from("127.0.0.11", 1) == [429]  # a device with none of its own
    finally:
        vault.stop()
