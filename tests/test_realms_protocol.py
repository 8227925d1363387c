"""The client's computations of docs/realms.md (backvault.realms.protocol), with the
realms' side played by direct calls of the VOPRF: registration, the three phases of a
recovery, and every check that names a misbehaving realm.

Not here: that one realm's stored payload (its key_share, e_j, ciphertext, tag_hash and D)
allows no offline test of a password guess is a property of the whole system (what a realm
stores, sealed, and what it answers); it belongs to the later end-to-end test against real
realm servers and is not faked here."""

from __future__ import annotations

import hashlib
import itertools
import secrets

import pytest
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backvault.opaque import group, voprf
from backvault.realms import protocol, shamir
from backvault.realms.protocol import (
    EvaluationRejected,
    Registration,
    SecretDoesNotOpen,
    ShareRejected,
    TestOnlyStretching,
)

CHEAP = TestOnlyStretching()
PASSWORD = b"correct horse battery staple"


def registration(n: int, t: int, secret: bytes, password: bytes = PASSWORD) -> Registration:
    ids = [secrets.token_bytes(16) for _ in range(n)]
    return protocol.register(password, "alice", secret, ids, t, 5, test_stretching=CHEAP)


def evaluate_at(reg: Registration, realm_id: bytes, blinded: bytes) -> tuple[bytes, bytes]:
    """What realm ``realm_id`` answers in phase 2: Z_j and its proof."""
    payload = reg.payload(realm_id)
    entry = reg.descriptor.entry(realm_id)
    (z,), proof = voprf.blind_evaluate(
        payload.key_share, entry.public_share, [blinded], group.random_scalar()
    )
    return z, proof


def recover(reg: Registration, realm_ids: list[bytes], password: bytes = PASSWORD) -> bytes:
    d = reg.descriptor
    rec = protocol.begin_recovery(password, d, test_stretching=CHEAP)
    evaluations = {}
    for realm_id in realm_ids:
        z, proof = evaluate_at(reg, realm_id, rec.blinded_element)
        protocol.check_evaluation(d, realm_id, rec.blinded_element, z, proof)
        evaluations[d.entry(realm_id).index] = z
    key = protocol.unlock_key(rec, evaluations)
    if key is None:
        raise LookupError("wrong password")
    shares, ciphertexts = {}, set()
    for realm_id in realm_ids:
        payload = reg.payload(realm_id)
        # A realm releases its share only for the right tag.
        assert hashlib.sha256(protocol.tag(key, d, realm_id)).digest() == payload.tag_hash
        protocol.check_share(
            key, d, realm_id, payload.encryption_share, payload.share_mac, payload.ciphertext
        )
        shares[d.entry(realm_id).index] = payload.encryption_share
        ciphertexts.add(payload.ciphertext)
    (ciphertext,) = ciphertexts
    return protocol.open_secret(rec, shares, ciphertext, d)


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3)])
def test_every_threshold_subset_recovers_the_secret(n: int, t: int) -> None:
    secret = secrets.token_bytes(32)
    reg = registration(n, t, secret)
    ids = [entry.realm_id for entry in reg.descriptor.realms]
    subsets = list(itertools.combinations(ids, t))
    assert len(subsets) == {3: 3, 5: 10}[n]
    for subset in subsets:
        assert recover(reg, list(subset)) == secret


def test_registration_is_what_the_spec_says() -> None:
    reg = registration(3, 2, bytes(32))
    d = reg.descriptor
    assert [e.index for e in d.realms] == [1, 2, 3]
    assert (d.threshold, d.allowed_guesses, d.user_id) == (2, 5, "alice")
    for payload, entry in zip(reg.payloads, d.realms, strict=True):
        assert shamir.public_share(payload.key_share) == entry.public_share
        assert len(payload.tag_hash) == 32 and len(payload.share_mac) == 32
        assert len(payload.ciphertext) == protocol.CIPHERTEXT_SIZE
    assert "hidden" in repr(reg.payloads[0])
    assert reg.payloads[0].key_share.hex() not in repr(reg)


def test_production_stretching_uses_the_suites_fixed_argon2id() -> None:
    version = bytes(range(16))
    access_key, seed = protocol.stretch(b"pw", version, "alice")
    expected = hash_secret_raw(b"pw", protocol.salt(version, "alice"), 3, 65536, 4, 64, Type.ID)
    assert access_key + seed == expected
    assert protocol.stretch(b"pw", version, "bob", test_stretching=CHEAP) != protocol.stretch(
        b"pw", version, "alice", test_stretching=CHEAP
    )


def test_a_wrong_password_gives_no_unlock_key_and_nothing_decrypts() -> None:
    secret = secrets.token_bytes(32)
    reg = registration(3, 2, secret)
    d = reg.descriptor
    ids = [e.realm_id for e in d.realms]
    with pytest.raises(LookupError):
        recover(reg, ids[:2], b"wrong password")
    # With the wrong password's encryption_seed even the right shares open nothing.
    wrong = protocol.begin_recovery(b"wrong password", d, test_stretching=CHEAP)
    shares = {1: reg.payloads[0].encryption_share, 2: reg.payloads[1].encryption_share}
    with pytest.raises(SecretDoesNotOpen):
        protocol.open_secret(wrong, shares, reg.payloads[0].ciphertext, d)


def test_a_wrong_evaluation_or_proof_is_caught_and_names_the_realm() -> None:
    reg = registration(3, 2, bytes(32))
    d = reg.descriptor
    rec = protocol.begin_recovery(PASSWORD, d, test_stretching=CHEAP)
    first, second = d.realms[0].realm_id, d.realms[1].realm_id
    z, proof = evaluate_at(reg, first, rec.blinded_element)
    z2, proof2 = evaluate_at(reg, second, rec.blinded_element)
    wrong_z = group.scalar_mult(group.random_scalar(), rec.blinded_element)
    cases = [
        (wrong_z, proof),  # another evaluation under the honest proof
        (z, proof2),  # another realm's proof
        (z2, proof2),  # another realm's evaluation and proof, presented as this realm's
        (z, proof[:32] + group.random_scalar()),  # a forged response
        (z, b"\xff" * 64),  # not scalars at all
        (bytes(32), proof),  # the identity element
    ]
    for bad_z, bad_proof in cases:
        with pytest.raises(EvaluationRejected, match=first.hex()) as caught:
            protocol.check_evaluation(d, first, rec.blinded_element, bad_z, bad_proof)
        assert caught.value.realm_id == first
    # An evaluation of another blinded element is refused too (the same B goes everywhere).
    other = protocol.begin_recovery(PASSWORD, d, test_stretching=CHEAP).blinded_element
    z_other, proof_other = evaluate_at(reg, first, other)
    with pytest.raises(EvaluationRejected):
        protocol.check_evaluation(d, first, rec.blinded_element, z_other, proof_other)
    protocol.check_evaluation(d, first, rec.blinded_element, z, proof)  # the honest one


def test_a_bad_share_is_caught_and_names_the_realm() -> None:
    reg = registration(3, 2, bytes(32))
    d = reg.descriptor
    rec = protocol.begin_recovery(PASSWORD, d, test_stretching=CHEAP)
    ids = [e.realm_id for e in d.realms]
    evaluations = {}
    for realm_id in ids[:2]:
        evaluations[d.entry(realm_id).index] = evaluate_at(reg, realm_id, rec.blinded_element)[0]
    key = protocol.unlock_key(rec, evaluations)
    assert key is not None and "hidden" in repr(key)
    good = reg.payload(ids[0])
    other = reg.payload(ids[1])
    bad = [
        (group.random_scalar(), good.share_mac, good.ciphertext),  # another share
        (good.encryption_share, bytes(32), good.ciphertext),  # another MAC
        (
            good.encryption_share,
            good.share_mac,
            good.ciphertext[:-1] + bytes([good.ciphertext[-1] ^ 1]),
        ),  # ciphertext
        (other.encryption_share, other.share_mac, other.ciphertext),  # realm 2's, as realm 1's
    ]
    for share, mac, ciphertext in bad:
        with pytest.raises(ShareRejected, match=ids[0].hex()):
            protocol.check_share(key, d, ids[0], share, mac, ciphertext)
    protocol.check_share(key, d, ids[0], good.encryption_share, good.share_mac, good.ciphertext)


def test_shares_of_another_registration_do_not_open() -> None:
    secret = secrets.token_bytes(32)
    reg = registration(3, 2, secret)
    again = protocol.register(
        PASSWORD,
        "alice",
        secret,
        [e.realm_id for e in reg.descriptor.realms],
        2,
        5,
        test_stretching=CHEAP,
    )
    d = reg.descriptor
    rec = protocol.begin_recovery(PASSWORD, d, test_stretching=CHEAP)
    # Evaluations of the other registration's key shares give no unlock key for D …
    mixed = {
        1: evaluate_at(reg, d.realms[0].realm_id, rec.blinded_element)[0],
        2: evaluate_at(again, d.realms[1].realm_id, rec.blinded_element)[0],
    }
    assert protocol.unlock_key(rec, mixed) is None
    # … and its encryption shares (one or all) do not open D's ciphertext.
    for shares in (
        {1: reg.payloads[0].encryption_share, 2: again.payloads[1].encryption_share},
        {1: again.payloads[0].encryption_share, 2: again.payloads[1].encryption_share},
    ):
        with pytest.raises(SecretDoesNotOpen):
            protocol.open_secret(rec, shares, reg.payloads[0].ciphertext, d)
    # Nor do the right shares open the other registration's ciphertext.
    right = {1: reg.payloads[0].encryption_share, 2: reg.payloads[1].encryption_share}
    with pytest.raises(SecretDoesNotOpen):
        protocol.open_secret(rec, right, again.payloads[0].ciphertext, d)


def test_the_ciphertext_opens_neither_with_the_password_alone_nor_the_shares_alone() -> None:
    """The key is HKDF(encryption_seed ‖ e): either half alone must not open it."""
    secret = secrets.token_bytes(32)
    reg = registration(3, 2, secret)
    d = reg.descriptor
    ciphertext = reg.payloads[0].ciphertext
    nonce, sealed = ciphertext[:12], ciphertext[12:]
    _, encryption_seed = protocol.stretch(PASSWORD, d.version, "alice", test_stretching=CHEAP)
    e = shamir.combine_scalars({p: reg.payloads[p - 1].encryption_share for p in (1, 2)})
    right_key = protocol._encryption_key(encryption_seed, e, d.version)
    assert AESGCM(right_key).decrypt(nonce, sealed, d.hash) == secret
    attempts = {
        "encryption_seed alone": encryption_seed,
        "encryption_seed through the KDF without e": protocol._hkdf(
            encryption_seed, d.version, protocol.ENCRYPTION_LABEL + protocol._lp(protocol.SUITE), 32
        ),
        "e alone": e,
        "e through the KDF without the seed": protocol._hkdf(
            e, d.version, protocol.ENCRYPTION_LABEL + protocol._lp(protocol.SUITE), 32
        ),
        "e with another password's seed": protocol._encryption_key(
            protocol.stretch(b"guess", d.version, "alice", test_stretching=CHEAP)[1],
            e,
            d.version,
        ),
    }
    for what, key in attempts.items():
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(nonce, sealed, d.hash)
            pytest.fail(what)


def test_combining_needs_exactly_t_shares_named_in_the_descriptor() -> None:
    reg = registration(3, 2, bytes(32))
    d = reg.descriptor
    rec = protocol.begin_recovery(PASSWORD, d, test_stretching=CHEAP)
    z = {e.index: evaluate_at(reg, e.realm_id, rec.blinded_element)[0] for e in d.realms}
    with pytest.raises(ValueError, match="exactly 2"):
        protocol.unlock_key(rec, z)
    with pytest.raises(ValueError, match="exactly 2"):
        protocol.unlock_key(rec, {1: z[1]})
    with pytest.raises(ValueError, match="index"):
        protocol.unlock_key(rec, {1: z[1], 4: z[2]})


def test_registration_refuses_bad_parameters() -> None:
    ids = [secrets.token_bytes(16) for _ in range(3)]
    with pytest.raises(ValueError, match="threshold"):
        protocol.register(PASSWORD, "a", bytes(32), ids, 1, 5, test_stretching=CHEAP)
    with pytest.raises(ValueError, match="slot secret"):
        protocol.register(PASSWORD, "a", bytes(31), ids, 2, 5, test_stretching=CHEAP)
    with pytest.raises(ValueError, match="twice"):
        protocol.register(PASSWORD, "a", bytes(32), [ids[0]] * 3, 2, 5, test_stretching=CHEAP)
