"""The cryptographic core of threshold realms: Shamir sharing of a VOPRF key over
ristretto255, and a threshold evaluation that equals the single-key VOPRF (RFC 9497)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backvault.opaque import group, voprf
from backvault.opaque.errors import InvalidMessageError
from backvault.realms import shamir

GENERATOR = group.scalar_mult_base(group.scalar_from_public_int(1))
ONE = group.scalar_from_public_int(1)
PROPERTY = settings(max_examples=50, deadline=None)


@dataclass(frozen=True)
class Realm:
    """A sharing of a root key: t of n servers, with the t that answer a request."""

    threshold: int
    server_indices: list[int]
    responders: list[int]


@st.composite
def realms(draw: st.DrawFn) -> Realm:
    threshold = draw(st.integers(2, 5))
    count = draw(st.integers(threshold, min(7, 2 * threshold - 1)))  # t > n/2
    server_indices = draw(
        st.lists(st.integers(1, 255), min_size=count, max_size=count, unique=True)
    )
    responders = draw(st.permutations(server_indices))[:threshold]
    return Realm(threshold, server_indices, responders)


@st.composite
def scalars(draw: st.DrawFn) -> bytes:
    """A non-zero scalar from hypothesis's bytes, so that failures replay."""
    uniform = draw(st.binary(min_size=64, max_size=64))
    scalar = group.hash_to_scalar(uniform, b"backvault-test-scalar")
    if not any(scalar):  # pragma: no cover - probability 2^-252
        scalar = ONE
    return scalar


inputs = st.binary(min_size=0, max_size=64)


def evaluate_share(share: bytes, blinded: bytes) -> tuple[bytes, bytes]:
    """What one realm server does: evaluate with its share, prove it against its public
    share."""
    (evaluated,), proof = voprf.blind_evaluate(
        share, shamir.public_share(share), [blinded], group.random_scalar()
    )
    return evaluated, proof


@PROPERTY
@given(realm=realms(), root_key=scalars(), blind=scalars(), secret_input=inputs)
def test_threshold_evaluation_equals_the_single_key_voprf(
    realm: Realm, root_key: bytes, blind: bytes, secret_input: bytes
) -> None:
    root_public = shamir.public_share(root_key)
    shares = shamir.split(root_key, realm.threshold, realm.server_indices)
    assert sorted(shares) == sorted(realm.server_indices)
    blinded = voprf.blind(secret_input, blind)

    evaluations: dict[int, bytes] = {}
    for index in realm.responders:
        evaluated, proof = evaluate_share(shares[index], blinded)
        share_public = shamir.public_share(shares[index])
        assert voprf.verify_proof(GENERATOR, share_public, [blinded], [evaluated], proof)
        evaluations[index] = evaluated
    combined = shamir.combine_elements(evaluations)
    threshold_output = voprf.unblind_and_hash(secret_input, blind, combined)

    (single, single_proof) = voprf.blind_evaluate(
        root_key, root_public, [blinded], group.random_scalar()
    )
    assert combined == single[0]
    assert threshold_output == voprf.evaluate(root_key, secret_input)
    assert threshold_output == voprf.finalize(
        secret_input, blind, single[0], blinded, root_public, single_proof
    )
    # The public shares of the responders combine to the realm's public key.
    responders_public = {i: shamir.public_share(shares[i]) for i in realm.responders}
    assert shamir.combine_elements(responders_public) == root_public


@PROPERTY
@given(realm=realms(), secret=scalars(), data=st.data())
def test_any_threshold_of_shares_recovers_the_secret_and_fewer_do_not(
    realm: Realm, secret: bytes, data: st.DataObject
) -> None:
    shares = shamir.split(secret, realm.threshold, realm.server_indices)
    enough = data.draw(
        st.lists(
            st.sampled_from(realm.server_indices),
            min_size=realm.threshold,
            max_size=len(realm.server_indices),
            unique=True,
        )
    )
    assert shamir.combine_scalars({i: shares[i] for i in enough}) == secret
    too_few = enough[: realm.threshold - 1]
    assert shamir.combine_scalars({i: shares[i] for i in too_few}) != secret


@PROPERTY
@given(
    realm=realms(),
    root_key=scalars(),
    wrong_key=scalars(),
    blind=scalars(),
    secret_input=inputs,
    data=st.data(),
)
def test_a_wrong_share_changes_the_output_and_its_proof_fails(
    realm: Realm,
    root_key: bytes,
    wrong_key: bytes,
    blind: bytes,
    secret_input: bytes,
    data: st.DataObject,
) -> None:
    shares = shamir.split(root_key, realm.threshold, realm.server_indices)
    cheater = data.draw(st.sampled_from(realm.responders))
    if wrong_key == shares[cheater]:  # pragma: no cover - probability 2^-252
        wrong_key = group.scalar_add(wrong_key, ONE)
    blinded = voprf.blind(secret_input, blind)

    evaluations = {i: evaluate_share(shares[i], blinded)[0] for i in realm.responders}
    honest_output = voprf.unblind_and_hash(
        secret_input, blind, shamir.combine_elements(evaluations)
    )
    assert honest_output == voprf.evaluate(root_key, secret_input)

    # The cheater evaluates with a wrong key and proves that (validly) for the wrong key.
    (wrong_evaluation,), wrong_proof = voprf.blind_evaluate(
        wrong_key, shamir.public_share(wrong_key), [blinded], group.random_scalar()
    )
    cheater_public = shamir.public_share(shares[cheater])
    assert not voprf.verify_proof(
        GENERATOR, cheater_public, [blinded], [wrong_evaluation], wrong_proof
    )
    # Its honest proof does not cover the wrong evaluation either.
    _, honest_proof = evaluate_share(shares[cheater], blinded)
    assert not voprf.verify_proof(
        GENERATOR, cheater_public, [blinded], [wrong_evaluation], honest_proof
    )
    tampered = {**evaluations, cheater: wrong_evaluation}
    wrong_output = voprf.unblind_and_hash(secret_input, blind, shamir.combine_elements(tampered))
    assert wrong_output != honest_output


@PROPERTY
@given(
    indices=st.lists(st.integers(1, 255), min_size=1, max_size=12, unique=True),
)
def test_lagrange_coefficients_at_zero_sum_to_one(indices: list[int]) -> None:
    """sum lambda_i = f(0) for the constant polynomial f = 1."""
    coefficients = shamir.lagrange_at_zero(indices)
    assert sorted(coefficients) == sorted(indices)
    total = coefficients[indices[0]]
    for index in indices[1:]:
        total = group.scalar_add(total, coefficients[index])
    assert total == ONE
    assert shamir.combine_scalars(dict.fromkeys(indices, ONE)) == ONE


def test_lagrange_coefficients_of_two_indices() -> None:
    # For x = 1, 2: lambda_1 = 2 / (2 - 1) = 2, lambda_2 = 1 / (1 - 2) = -1.
    coefficients = shamir.lagrange_at_zero([1, 2])
    assert coefficients[1] == group.scalar_from_public_int(2)
    assert coefficients[2] == group.scalar_from_public_int(group.GROUP_ORDER - 1)


@pytest.mark.parametrize(
    "indices",
    [[], [0], [256], [1, 1], [3, 7, 3], [-1], [True], [1.0], ["1"], [1, 2, 300]],
    ids=repr,
)
def test_lagrange_at_zero_refuses_bad_indices(indices: list[object]) -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.lagrange_at_zero(indices)  # type: ignore[arg-type]


def test_shamir_error_is_a_value_error() -> None:
    assert issubclass(shamir.ShamirError, ValueError)


def test_split_refuses_bad_input() -> None:
    secret = group.random_scalar()
    for threshold in (0, 1, 4, True, 2.0):
        with pytest.raises(shamir.ShamirError):
            shamir.split(secret, threshold, [1, 2, 3])  # type: ignore[arg-type]
    for indices in ([], [0, 1], [1, 1, 2], [1, 256]):
        with pytest.raises(shamir.ShamirError):
            shamir.split(secret, 2, indices)
    for bad_secret in (bytes(32), group.GROUP_ORDER.to_bytes(32, "little"), bytes(31)):
        with pytest.raises(InvalidMessageError):
            shamir.split(bad_secret, 2, [1, 2, 3])


def test_split_uses_fresh_randomness() -> None:
    secret = group.random_scalar()
    first = shamir.split(secret, 2, [1, 2])
    second = shamir.split(secret, 2, [1, 2])
    assert first != second
    assert shamir.combine_scalars(first) == shamir.combine_scalars(second) == secret


def test_combine_refuses_bad_shares_and_elements() -> None:
    shares = shamir.split(group.random_scalar(), 2, [1, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.combine_scalars({})
    with pytest.raises(shamir.ShamirError):
        shamir.combine_elements({})
    with pytest.raises(InvalidMessageError):
        shamir.combine_scalars({1: shares[1], 2: group.GROUP_ORDER.to_bytes(32, "little")})
    element = shamir.public_share(shares[1])
    for bad in (bytes(32), bytes([0xFF] * 32), element[:31]):
        with pytest.raises(InvalidMessageError):
            shamir.combine_elements({1: element, 2: bad})
    with pytest.raises(shamir.ShamirError):
        shamir.combine_elements({0: element, 2: element})
    with pytest.raises(InvalidMessageError):
        shamir.public_share(bytes(32))


def test_combine_elements_refuses_an_identity_result() -> None:
    """Two elements chosen to cancel out (lambda_1 P_1 + lambda_2 P_2 = 0) are refused."""
    coefficients = shamir.lagrange_at_zero([1, 2])
    first = shamir.public_share(group.random_scalar())
    # P_2 = -(lambda_1 / lambda_2) P_1
    ratio = group.scalar_mul(coefficients[1], group.scalar_inverse(coefficients[2]))
    second = group.scalar_mult(group.scalar_sub(bytes(32), ratio), first)
    with pytest.raises(InvalidMessageError):
        shamir.combine_elements({1: first, 2: second})
