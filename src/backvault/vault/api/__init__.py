"""The vault's HTTP API (FastAPI): OPAQUE registration and login, status, audit log,
deletion, health. Published as OpenAPI at /openapi.json.

schemas.py holds the bodies, routes.py the endpoints (and the bearer-token dependency),
errors.py how errors answer, middleware.py the body limit and the access log.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from backvault import __version__
from backvault.vault.accounts import TokenVerifier
from backvault.vault.api.errors import add_error_handlers
from backvault.vault.api.middleware import AccessLog, BodyLimit
from backvault.vault.api.realm_routes import add_realm_routes
from backvault.vault.api.routes import add_routes
from backvault.vault.api.schemas import ERRORS
from backvault.vault.ratelimit import RateLimiter
from backvault.vault.realm import RealmService
from backvault.vault.service import VaultService


def create_app(
    service: VaultService,
    verifier: TokenVerifier,
    ip_limiter: RateLimiter | None = None,
    account_limiter: RateLimiter | None = None,
    max_body_bytes: int = 16 * 1024,
    truncate_client_addresses: bool = False,
    serve_metrics: bool = False,
    metrics_token: str = "",
    realm: RealmService | None = None,
) -> FastAPI:
    """The HTTP API. ``truncate_client_addresses``: the audit log and the login table get
    the client's network (IPv4 /24, IPv6 /48), not its address. ``serve_metrics``: answer
    GET /metrics here, behind ``Authorization: Bearer metrics_token`` when one is set.
    ``realm``: serve the realm endpoints (/realm/v1, docs/realms.md) too."""
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

    add_error_handlers(app)
    callers = add_routes(
        app,
        service,
        verifier,
        ip_limiter,
        account_limiter,
        truncate_client_addresses,
        serve_metrics,
        metrics_token,
    )
    if realm is not None:
        add_realm_routes(app, realm, callers)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(AccessLog, truncate_client_addresses=truncate_client_addresses)
    return app


def openapi_document() -> dict[str, Any]:
    """The API description, without a database (for docs and tooling); with the realm
    endpoints, which a node serves in realm mode only."""

    class _NoService:
        pass

    app = create_app(
        _NoService(),  # type: ignore[arg-type]
        _NoVerifier(),
        realm=_NoService(),  # type: ignore[arg-type]
    )
    return app.openapi()


class _NoVerifier:
    def account(self, token: str) -> str | None:
        return None
