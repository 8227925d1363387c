"""The vault API's endpoints: bearer-token authentication and rate limits (a dependency
of every /v1 route), then OPAQUE registration and login, the record's status, deletion and
audit log, health, and /metrics when served here.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at
run time, and ``Account`` is local to add_routes.
"""

import hmac
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from backvault import __version__
from backvault.vault import metrics
from backvault.vault.accounts import TokenVerifier
from backvault.vault.api.errors import RateLimited, Unauthorized, error_response
from backvault.vault.api.middleware import truncated_address
from backvault.vault.api.schemas import (
    AuditEvent,
    AuditOut,
    HealthOut,
    LoginFinishIn,
    LoginFinishOut,
    LoginStartIn,
    LoginStartOut,
    RegistrationFinishIn,
    RegistrationFinishOut,
    RegistrationStartIn,
    RegistrationStartOut,
    StatusOut,
    decode_b64,
    encode_b64,
)
from backvault.vault.ratelimit import RateLimiter
from backvault.vault.service import VaultService

log = logging.getLogger("backvault.vault.http")


@dataclass(frozen=True)
class Callers:
    """How a route learns who calls: ``account`` is the bearer-token dependency (with the
    rate limits), ``client_of`` the address as stored."""

    account: Callable[..., str]
    client_of: Callable[[Request], str]


def add_routes(
    app: FastAPI,
    service: VaultService,
    verifier: TokenVerifier,
    ip_limiter: RateLimiter | None,
    account_limiter: RateLimiter | None,
    truncate_client_addresses: bool,
    serve_metrics: bool,
    metrics_token: str,
) -> Callers:
    def address_of(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def client_of(request: Request) -> str:
        """The client as stored (audit log, pending logins)."""
        host = address_of(request)
        return truncated_address(host) if truncate_client_addresses else host

    def limited(key: str, limiter: RateLimiter | None) -> None:
        if limiter is None:
            return
        wait = limiter.allow(key)
        if wait > 0:
            raise RateLimited(math.ceil(wait))

    def account(
        request: Request,
        authorization: Annotated[str | None, Header(description="Bearer TOKEN")] = None,
    ) -> str:
        limited(address_of(request), ip_limiter)
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("send Authorization: Bearer TOKEN")
        name = verifier.account(authorization[7:].strip())
        if name is None:
            raise Unauthorized("the bearer token is not valid")
        limited(f"account:{name}", account_limiter)
        return name

    Account = Annotated[str, Depends(account)]

    @app.get("/healthz", response_model=HealthOut, tags=["operations"])
    def healthz() -> HealthOut:
        """Liveness: the process answers."""
        return HealthOut(status="ok", version=__version__)

    @app.get("/readyz", response_model=HealthOut, tags=["operations"])
    def readyz() -> Response:
        """Readiness: the database answers and the sealing key is reachable (checked
        without sealing anything)."""
        try:
            service.ready()
        except Exception as exc:
            log.warning("not ready", extra={"reason": type(exc).__name__})
            return error_response(
                503, "not_ready", "the database or the sealing key is unavailable"
            )
        return JSONResponse({"status": "ready", "version": __version__})

    @app.post("/v1/registration/start", response_model=RegistrationStartOut, tags=["registration"])
    def registration_start(
        body: RegistrationStartIn, name: Account, request: Request
    ) -> RegistrationStartOut:
        """OPAQUE CreateRegistrationResponse under a fresh credential identifier (never a
        live record's: this endpoint counts nothing, so it must not be an oracle for one).
        Audited."""
        started = service.registration_start(
            name, decode_b64(body.registration_request, "registration_request"), client_of(request)
        )
        return RegistrationStartOut(
            registration_response=encode_b64(started.response),
            registration_id=started.registration_id,
            expires_in=started.expires_in,
        )

    @app.post(
        "/v1/registration/finish", response_model=RegistrationFinishOut, tags=["registration"]
    )
    def registration_finish(
        body: RegistrationFinishIn, name: Account, request: Request
    ) -> RegistrationFinishOut:
        """Store the OPAQUE record and the wrapped secret under the credential identifier of
        the start named by registration_id (single use), replacing any previous record
        (audited as record_replaced) with a fresh count."""
        fingerprint = service.registration_finish(
            name,
            body.registration_id,
            decode_b64(body.record, "record"),
            decode_b64(body.wrapped_secret, "wrapped_secret"),
            client_of(request),
            body.max_attempts,
            body.keep_count,
            body.replaces,
        )
        return RegistrationFinishOut(fingerprint=fingerprint)

    @app.post("/v1/login/start", response_model=LoginStartOut, tags=["login"])
    def login_start(body: LoginStartIn, name: Account, request: Request) -> LoginStartOut:
        """KE1 → KE2. The attempt is counted (durably) before this returns."""
        started = service.login_start(name, decode_b64(body.ke1, "ke1"), client_of(request))
        return LoginStartOut(
            login_id=started.login_id, ke2=encode_b64(started.ke2), expires_in=started.expires_in
        )

    @app.post("/v1/login/finish", response_model=LoginFinishOut, tags=["login"])
    def login_finish(body: LoginFinishIn, name: Account, request: Request) -> LoginFinishOut:
        """KE3 → the wrapped secret, only if KE3 verifies. A wrong password answers 403
        with attempts_left, or 410 when the record was erased. A success forgives this
        attempt and the earlier ones named in earlier_login_ids; others stay counted."""
        done = service.login_finish(
            name,
            body.login_id,
            decode_b64(body.ke3, "ke3"),
            client_of(request),
            body.earlier_login_ids,
        )
        return LoginFinishOut(
            wrapped_secret=encode_b64(done.wrapped_secret),
            attempts_left=done.attempts_left,
            forgiven=done.forgiven,
            counted=done.counted,
            counted_since=done.counted_since,
            legacy_record=done.legacy_record,
            max_attempts=done.max_attempts,
            fingerprint=done.fingerprint,
        )

    @app.get("/v1/record", response_model=StatusOut, tags=["record"])
    def status(name: Account) -> StatusOut:
        """Whether the account has a record, its fingerprint, and the attempts left."""
        return StatusOut(**service.status(name).__dict__)

    @app.delete("/v1/record", status_code=204, tags=["record"])
    def delete_record(name: Account, request: Request) -> Response:
        """Erase the account's record and wrapped secret."""
        service.delete_record(name, client_of(request))
        return Response(status_code=204)

    @app.get("/v1/audit", response_model=AuditOut, tags=["record"])
    def audit_log(
        name: Account,
        limit: Annotated[int, Query(ge=1, le=10000, description="Most recent events")] = 1000,
        event: Annotated[
            list[Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")]] | None,
            Query(max_length=20, description="Only these kinds of event (repeatable)"),
        ] = None,
    ) -> AuditOut:
        """Every registration and login attempt on the account's record, oldest first.
        Client addresses are shown as networks (IPv4 /24, IPv6 /48): whoever holds the
        account token reads this too."""
        return AuditOut(
            events=[
                AuditEvent(**{**e, "client": truncated_address(e["client"])})
                for e in service.audit_log(name, limit, event or ())
            ]
        )

    if serve_metrics:

        @app.get("/metrics", include_in_schema=False)
        def prometheus_metrics(
            authorization: Annotated[str | None, Header()] = None,
        ) -> Response:
            """Prometheus text format: counters and histograms, no account names."""
            if metrics_token:
                offered = (authorization or "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(offered.encode(), metrics_token.encode()):
                    raise Unauthorized("/metrics needs Authorization: Bearer METRICS_TOKEN")
            return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return Callers(account, client_of)
