"""The realm endpoints (docs/realms.md, "Messages"), served in realm mode: /realm/v1/info
without a token; registration, phase 1, the counted evaluation, the unlock and deletion
behind the same bearer-token dependency, rate limits and body limit as /v1.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at
run time, and ``Account`` is local to add_realm_routes.
"""

from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response

from backvault.vault.api.routes import Callers
from backvault.vault.api.schemas import (
    B64_PATTERN,
    RealmEvaluateIn,
    RealmEvaluateOut,
    RealmInfoOut,
    RealmRegisterIn,
    RealmRegisterOut,
    RealmRegistrationOut,
    RealmUnlockIn,
    RealmUnlockOut,
    decode_b64,
    encode_b64,
)
from backvault.vault.realm import RealmService

PREFIX = "/realm/v1"


def add_realm_routes(app: FastAPI, realm: RealmService, callers: Callers) -> None:
    Account = Annotated[str, Depends(callers.account)]
    client_of = callers.client_of

    @app.get(PREFIX + "/info", response_model=RealmInfoOut, tags=["realm"])
    def info() -> RealmInfoOut:
        """This realm's id, the suite and the protocol version (no token needed)."""
        return RealmInfoOut(**realm.info())

    @app.post(PREFIX + "/register", response_model=RealmRegisterOut, tags=["realm"])
    def register(body: RealmRegisterIn, name: Account, request: Request) -> RealmRegisterOut:
        """Store this realm's part of a registration, by compare-and-swap on
        expected_version (409 version_mismatch with the version held otherwise); a version
        this account used here before is 409 version_reused. Replaces the account's
        earlier registration, its key share with it. Attempts start at 0."""
        version = realm.register(
            name,
            None
            if body.expected_version is None
            else decode_b64(body.expected_version, "expected_version"),
            decode_b64(body.descriptor, "descriptor"),
            decode_b64(body.key_share, "key_share"),
            decode_b64(body.tag_hash, "tag_hash"),
            decode_b64(body.encryption_share, "encryption_share"),
            decode_b64(body.share_mac, "share_mac"),
            decode_b64(body.ciphertext, "ciphertext"),
            client_of(request),
        )
        return RealmRegisterOut(version=encode_b64(version))

    @app.get(PREFIX + "/registration", response_model=RealmRegistrationOut, tags=["realm"])
    def registration(name: Account) -> RealmRegistrationOut:
        """Phase 1 (uncounted): the state, the descriptor and the counts; nothing secret."""
        held = realm.registration(name)
        return RealmRegistrationOut(
            state=held.state,
            descriptor=encode_b64(held.descriptor) if held.descriptor is not None else None,
            attempts=held.attempts,
            allowed=held.allowed,
        )

    @app.delete(PREFIX + "/registration", status_code=204, tags=["realm"])
    def delete(
        name: Account,
        request: Request,
        version: Annotated[
            str,
            Query(min_length=24, max_length=24, pattern=B64_PATTERN, description="b64, 16 bytes"),
        ],
    ) -> Response:
        """Delete that version only (409 version_mismatch otherwise); a missing or erased
        registration answers 204 too."""
        realm.delete(name, decode_b64(version, "version"), client_of(request))
        return Response(status_code=204)

    @app.post(PREFIX + "/evaluate", response_model=RealmEvaluateOut, tags=["realm"])
    def evaluate(body: RealmEvaluateIn, name: Account, request: Request) -> RealmEvaluateOut:
        """Phase 2 (counted): the attempt is committed before Z_j = k_j·B is computed; the
        last allowed one erases the key share. 403 no_attempts_left once they are spent."""
        done = realm.evaluate(
            name,
            decode_b64(body.version, "version"),
            decode_b64(body.blinded_element, "blinded_element"),
            client_of(request),
        )
        return RealmEvaluateOut(
            evaluated_element=encode_b64(done.evaluated_element),
            proof=encode_b64(done.proof),
            attempts_left=done.attempts_left,
            attempt_id=encode_b64(done.attempt_id),
        )

    @app.post(PREFIX + "/unlock", response_model=RealmUnlockOut, tags=["realm"])
    def unlock(body: RealmUnlockIn, name: Account, request: Request) -> RealmUnlockOut:
        """Phase 3: with the right tag (403 wrong_tag otherwise, counting nothing), forgive
        the presented attempt ids of this account counted against this very registration
        (its realm-made identity, not merely its version), and answer the encryption
        share, its MAC and the ciphertext."""
        done = realm.unlock(
            name,
            decode_b64(body.version, "version"),
            decode_b64(body.tag, "tag"),
            [decode_b64(i, "attempt_ids") for i in body.attempt_ids],
            client_of(request),
        )
        return RealmUnlockOut(
            encryption_share=encode_b64(done.encryption_share),
            share_mac=encode_b64(done.share_mac),
            ciphertext=encode_b64(done.ciphertext),
        )
