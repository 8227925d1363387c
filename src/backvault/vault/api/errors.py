"""How the vault API answers errors: a JSON object ``{"error": code, "message": text}``
(plus ``attempts_left`` for a wrong password), with the HTTP status each vault error maps
to."""

from __future__ import annotations

import base64
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backvault.vault.outcomes import (
    BadRequest,
    GuessCapReached,
    LoginNotFound,
    NoAttemptsLeft,
    RealmAttemptsSpent,
    RecordChanged,
    RegistrationErased,
    RegistrationNotFound,
    TooManyRegistrations,
    VaultError,
    VersionMismatch,
    VersionReused,
    WrongPassword,
    WrongTag,
)

log = logging.getLogger("backvault.vault.http")


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )


class Unauthorized(Exception):
    pass


class RateLimited(Exception):
    def __init__(self, seconds: int) -> None:
        super().__init__(seconds)
        self.seconds = seconds


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VaultError)
    async def vaulterror_response(_request: Request, exc: VaultError) -> JSONResponse:
        if isinstance(exc, WrongPassword):
            if exc.erased:
                return error_response(410, "record_erased", str(exc), attempts_left=0)
            return error_response(403, exc.code, str(exc), attempts_left=exc.attempts_left)
        if isinstance(exc, VersionMismatch):
            held = exc.current_version
            return error_response(
                409,
                exc.code,
                str(exc),
                version=base64.b64encode(held).decode() if held is not None else None,
            )
        status = {
            BadRequest: 400,
            NoAttemptsLeft: 423,
            LoginNotFound: 404,
            RegistrationNotFound: 404,
            RecordChanged: 409,
            VersionReused: 409,
            GuessCapReached: 423,
            TooManyRegistrations: 429,
            RealmAttemptsSpent: 403,
            WrongTag: 403,
            RegistrationErased: 410,
        }.get(type(exc), 400)
        return error_response(status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            422, "invalid_request", f"{where or 'body'}: {first.get('msg', 'invalid')}"
        )

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        response = error_response(exc.status_code, code, str(exc.detail))
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
        return error_response(
            500, "internal_error", "the vault failed; the request was not completed"
        )

    @app.exception_handler(Unauthorized)
    async def unauthorized(_request: Request, exc: Unauthorized) -> JSONResponse:
        return error_response(401, "unauthorized", str(exc))

    @app.exception_handler(RateLimited)
    async def rate_limited(_request: Request, exc: RateLimited) -> JSONResponse:
        return error_response(
            429,
            "rate_limited",
            f"too many requests; retry in {exc.seconds} s",
            retry_after=exc.seconds,
        )
