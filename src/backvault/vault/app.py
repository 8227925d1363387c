"""The vault's HTTP API (FastAPI): OPAQUE registration and login, status, audit log,
deletion, health. Published as OpenAPI at /openapi.json.

Binary protocol messages travel as standard base64 strings. Errors are JSON objects
``{"error": code, "message": text}`` (plus ``attempts_left`` for a wrong password).
"""

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import math
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backvault import __version__
from backvault.vault import metrics
from backvault.vault.accounts import TokenVerifier
from backvault.vault.ratelimit import RateLimiter
from backvault.vault.service import (
    BadRequest,
    GuessCapReached,
    LoginNotFound,
    NoAttemptsLeft,
    RecordChanged,
    RegistrationNotFound,
    TooManyRegistrations,
    VaultError,
    VaultService,
    WrongPassword,
)

log = logging.getLogger("backvault.vault.http")

B64_PATTERN = r"^[A-Za-z0-9+/]*={0,2}$"
B64 = Annotated[str, Field(max_length=4096, pattern=B64_PATTERN)]


def b64_of(size: int) -> Any:
    """A base64 field holding exactly ``size`` bytes."""
    length = 4 * -(-size // 3)
    return Annotated[str, Field(min_length=length, max_length=length, pattern=B64_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegistrationStartIn(Strict):
    registration_request: b64_of(32) = Field(description="RFC 9807 RegistrationRequest (32 bytes)")  # type: ignore[valid-type]


class RegistrationStartOut(Strict):
    registration_response: str = Field(description="RFC 9807 RegistrationResponse (64 bytes)")
    registration_id: str = Field(
        description="The handle of this registration: the finish must present it. The "
        "response was computed under a fresh credential identifier that only this handle "
        "binds to a record."
    )
    expires_in: float = Field(description="Seconds left to finish")


HANDLE = Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


class RegistrationFinishIn(Strict):
    registration_id: HANDLE = Field(description="From the registration start")
    record: b64_of(192) = Field(description="RFC 9807 RegistrationRecord (192 bytes)")  # type: ignore[valid-type]
    wrapped_secret: B64 = Field(
        description="The client's key-slot secret, encrypted under a key derived from "
        "OPAQUE's export_key. The vault stores it sealed and cannot open it."
    )
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    keep_count: bool = Field(
        default=False,
        description="When this replaces a live record, keep its count and attempt history "
        "(a client moving its record to a fresh credential identifier under the same "
        "password); needs replaces",
    )
    replaces: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="With keep_count: the fingerprint of the record this client logged into; "
        "409 record_changed if the account holds another record (or none) by now",
    )


class RegistrationFinishOut(Strict):
    fingerprint: str = Field(
        description="SHA-256 (hex) of 'backvault record fingerprint v1\\0' and the record: "
        "the client computes it too and compares it with GET /v1/record later"
    )


class LoginStartIn(Strict):
    ke1: b64_of(96) = Field(description="RFC 9807 KE1 (96 bytes)")  # type: ignore[valid-type]


class LoginStartOut(Strict):
    login_id: str
    ke2: str = Field(description="RFC 9807 KE2 (320 bytes)")
    expires_in: float = Field(description="Seconds left to send KE3")


class LoginFinishIn(Strict):
    login_id: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    ke3: b64_of(64) = Field(description="RFC 9807 KE3 (64 bytes)")  # type: ignore[valid-type]
    earlier_login_ids: list[HANDLE] = Field(
        default_factory=list,
        max_length=256,
        description="Login ids of this client's earlier wrong tries in this recovery: on "
        "success they are forgiven; every other attempt stays counted",
    )


class LoginFinishOut(Strict):
    wrapped_secret: str
    attempts_left: int
    forgiven: int = Field(description="Earlier wrong tries of this client now forgiven")
    counted: int = Field(description="Attempts that stay counted: not proven this client's")
    counted_since: float | None = Field(description="When the oldest of those started")
    legacy_record: bool = Field(
        description="The record predates per-registration credential identifiers: register "
        "again (same password, keep_count) to move it to a fresh one"
    )
    max_attempts: int
    fingerprint: str = Field(description="Of the record this login opened")


class StatusOut(Strict):
    exists: bool
    attempts_used: int
    attempts_left: int
    max_attempts: int
    pending_logins: int
    created_at: float | None
    updated_at: float | None
    fingerprint: str | None = Field(description="Of the record held (see registration)")
    legacy_record: bool = Field(
        description="The record predates per-registration credential identifiers; "
        "registering again (password change) moves it to a fresh one"
    )
    counted_since: float | None = Field(
        description="Start of the oldest attempt still counted (not forgiven by a success)"
    )
    last_success_at: float | None
    wrong_guesses_in_window: int = Field(description="Counted by the rolling cap")
    guess_cap: int = Field(description="Wrong guesses allowed within the window")
    guess_cap_days: float


class AuditEvent(Strict):
    at: float
    event: str
    client: str
    attempts_left: int | None
    detail: str


class AuditOut(Strict):
    events: list[AuditEvent]


class ErrorOut(BaseModel):
    error: str
    message: str
    attempts_left: int | None = None


class HealthOut(Strict):
    status: str
    version: str


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 410, 413, 422, 423, 429, 503)
}


class BodyLimit:
    """Refuse request bodies larger than ``limit`` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    await _error(
                        413, "body_too_large", f"request bodies are limited to {self.limit} bytes"
                    )(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _error(
                413, "body_too_large", f"request bodies are limited to {self.limit} bytes"
            )(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def truncated_address(host: str) -> str:
    """The client's network instead of its address: IPv4 /24, IPv6 /48 (an IPv4-mapped
    IPv6 address counts as IPv4). Anything that is not an IP address stays as it is."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class AccessLog:
    """One JSON log line per request (method, path, status, duration, client address) and
    its latency in the metrics, labelled by route template and status class.
    (A plain ASGI middleware: Starlette's BaseHTTPMiddleware costs a task per request.)"""

    def __init__(self, app: ASGIApp, truncate_client_addresses: bool = False) -> None:
        self.app = app
        self.truncate_client_addresses = truncate_client_addresses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            elapsed = time.perf_counter() - started
            client = scope.get("client")
            host = client[0] if client else "unknown"
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round(elapsed * 1000, 2),
                    "client": truncated_address(host) if self.truncate_client_addresses else host,
                },
            )
            metrics.HTTP_REQUEST_SECONDS.labels(
                method=metrics.method_label(scope["method"]),
                route=metrics.route_label(getattr(scope.get("route"), "path", None)),
                status=metrics.status_class(status),
            ).observe(elapsed)


def _decode(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{field} is not valid base64") from exc


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def create_app(
    service: VaultService,
    verifier: TokenVerifier,
    ip_limiter: RateLimiter | None = None,
    account_limiter: RateLimiter | None = None,
    max_body_bytes: int = 16 * 1024,
    truncate_client_addresses: bool = False,
    serve_metrics: bool = False,
    metrics_token: str = "",
) -> FastAPI:
    """The HTTP API. ``truncate_client_addresses``: the audit log and the login table get
    the client's network (IPv4 /24, IPv6 /48), not its address. ``serve_metrics``: answer
    GET /metrics here, behind ``Authorization: Bearer metrics_token`` when one is set."""
    app = FastAPI(
        title="backvault Backup Key Vault",
        version=__version__,
        description=(
            "OPAQUE-3DH (RFC 9807, ristretto255-SHA512) registration and login with an exact "
            "limit of wrong guesses per record. Every call needs `Authorization: Bearer "
            "TOKEN` naming the account. Messages are base64 (standard alphabet)."
        ),
        responses=ERRORS,
    )

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
            raise _RateLimited(math.ceil(wait))

    def account(
        request: Request,
        authorization: Annotated[str | None, Header(description="Bearer TOKEN")] = None,
    ) -> str:
        limited(address_of(request), ip_limiter)
        if not authorization or not authorization.lower().startswith("bearer "):
            raise _Unauthorized("send Authorization: Bearer TOKEN")
        name = verifier.account(authorization[7:].strip())
        if name is None:
            raise _Unauthorized("the bearer token is not valid")
        limited(f"account:{name}", account_limiter)
        return name

    Account = Annotated[str, Depends(account)]

    @app.exception_handler(VaultError)
    async def vault_error(_request: Request, exc: VaultError) -> JSONResponse:
        if isinstance(exc, WrongPassword):
            if exc.erased:
                return _error(410, "record_erased", str(exc), attempts_left=0)
            return _error(403, exc.code, str(exc), attempts_left=exc.attempts_left)
        status = {
            BadRequest: 400,
            NoAttemptsLeft: 423,
            LoginNotFound: 404,
            RegistrationNotFound: 404,
            RecordChanged: 409,
            GuessCapReached: 423,
            TooManyRegistrations: 429,
        }.get(type(exc), 400)
        return _error(status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        response = _error(exc.status_code, code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:
            # Starlette names only the first route's methods; list every route's.
            allowed = sorted(
                method
                for route in app.routes
                if getattr(route, "path", None) == request.url.path
                for method in getattr(route, "methods", None) or ()
            )
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return _error(500, "internal_error", "the vault failed; the request was not completed")

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_request: Request, exc: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", str(exc))

    @app.exception_handler(_RateLimited)
    async def rate_limited(_request: Request, exc: _RateLimited) -> JSONResponse:
        return _error(
            429,
            "rate_limited",
            f"too many requests; retry in {exc.seconds} s",
            retry_after=exc.seconds,
        )

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
            return _error(503, "not_ready", "the database or the sealing key is unavailable")
        return JSONResponse({"status": "ready", "version": __version__})

    @app.post("/v1/registration/start", response_model=RegistrationStartOut, tags=["registration"])
    def registration_start(
        body: RegistrationStartIn, name: Account, request: Request
    ) -> RegistrationStartOut:
        """OPAQUE CreateRegistrationResponse under a fresh credential identifier (never a
        live record's: this endpoint counts nothing, so it must not be an oracle for one).
        Audited."""
        started = service.registration_start(
            name, _decode(body.registration_request, "registration_request"), client_of(request)
        )
        return RegistrationStartOut(
            registration_response=_encode(started.response),
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
            _decode(body.record, "record"),
            _decode(body.wrapped_secret, "wrapped_secret"),
            client_of(request),
            body.max_attempts,
            body.keep_count,
            body.replaces,
        )
        return RegistrationFinishOut(fingerprint=fingerprint)

    @app.post("/v1/login/start", response_model=LoginStartOut, tags=["login"])
    def login_start(body: LoginStartIn, name: Account, request: Request) -> LoginStartOut:
        """KE1 → KE2. The attempt is counted (durably) before this returns."""
        started = service.login_start(name, _decode(body.ke1, "ke1"), client_of(request))
        return LoginStartOut(
            login_id=started.login_id, ke2=_encode(started.ke2), expires_in=started.expires_in
        )

    @app.post("/v1/login/finish", response_model=LoginFinishOut, tags=["login"])
    def login_finish(body: LoginFinishIn, name: Account, request: Request) -> LoginFinishOut:
        """KE3 → the wrapped secret, only if KE3 verifies. A wrong password answers 403
        with attempts_left, or 410 when the record was erased. A success forgives this
        attempt and the earlier ones named in earlier_login_ids; others stay counted."""
        done = service.login_finish(
            name,
            body.login_id,
            _decode(body.ke3, "ke3"),
            client_of(request),
            body.earlier_login_ids,
        )
        return LoginFinishOut(
            wrapped_secret=_encode(done.wrapped_secret),
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
                    raise _Unauthorized("/metrics needs Authorization: Bearer METRICS_TOKEN")
            return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(AccessLog, truncate_client_addresses=truncate_client_addresses)
    return app


class _Unauthorized(Exception):
    pass


class _RateLimited(Exception):
    def __init__(self, seconds: int) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; only fields we put there (never bodies or tokens)."""

    _SKIP = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._SKIP:
                doc[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
            doc["where"] = self.formatException(record.exc_info).splitlines()[-3:]
        return json.dumps(doc, default=str)


def openapi_document() -> dict[str, Any]:
    """The API description, without a database (for docs and tooling)."""

    class _NoService:
        pass

    app = create_app(_NoService(), _NoVerifier())  # type: ignore[arg-type]
    return app.openapi()


class _NoVerifier:
    def account(self, token: str) -> str | None:
        return None
