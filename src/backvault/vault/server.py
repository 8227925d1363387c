"""Building and running a vault node from its settings."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from ..opaque import OpaqueConfig
from .accounts import (
    BuiltinTokens,
    Ed25519JwtVerifier,
    TokenVerifier,
    VerifierChain,
    jwt_verifier_from_settings,
)
from .app import JsonLogFormatter, create_app
from .config import SettingsError, VaultSettings
from .ratelimit import RateLimiter
from .sealing import FileSealer, Pkcs11Sealer, Sealer
from .service import VaultService
from .store import make_engine

log = logging.getLogger("backvault.vault")


def make_sealer(settings: VaultSettings, create_hsm_key: bool = False) -> Sealer:
    """The sealer. An HSM key is never created implicitly (several nodes starting at once
    would each make their own): `backvault vault init-hsm` creates it once."""
    if settings.sealing == "pkcs11":
        return Pkcs11Sealer(
            settings.pkcs11_module,
            settings.pkcs11_token_label,
            settings.pin(),
            settings.pkcs11_key_label,
            create=create_hsm_key,
        )
    if settings.sealing == "file":
        return FileSealer(settings.sealing_key_path)
    raise ValueError(f"sealing must be 'file' or 'pkcs11', not {settings.sealing!r}")


def make_service(settings: VaultSettings) -> VaultService:
    service = VaultService(
        make_engine(settings.db_url),
        make_sealer(settings),
        OpaqueConfig(
            context=settings.opaque_context.encode(),
            server_identity=settings.server_identity.encode() or None,
        ),
        max_attempts=settings.max_attempts,
        login_ttl=settings.login_ttl,
        registration_ttl=settings.registration_ttl,
        guess_cap=settings.guess_cap,
        guess_cap_days=settings.guess_cap_days,
        max_pending_registrations=settings.max_pending_registrations,
    )
    service.start()
    return service


NO_VERIFIER = "no token verifier: enable builtin_tokens or set jwt_public_key_file"


def make_jwt_verifier(settings: VaultSettings) -> Ed25519JwtVerifier | None:
    """The JWT verifier if a JWT key is configured; a SettingsError if its settings are
    incomplete or wrong (checked before anything else starts)."""
    if not settings.jwt_public_key_file:
        return None
    return jwt_verifier_from_settings(
        settings.jwt_public_key_file,
        settings.jwt_audience,
        settings.jwt_issuer,
        settings.jwt_max_lifetime,
    )


def make_verifier(settings: VaultSettings, service: VaultService) -> TokenVerifier:
    verifiers: list[TokenVerifier] = []
    jwt_verifier = make_jwt_verifier(settings)
    if jwt_verifier is not None:
        verifiers.append(jwt_verifier)
    if settings.builtin_tokens:
        verifiers.append(BuiltinTokens(service.account_for_token))
    if not verifiers:
        raise SettingsError(NO_VERIFIER)
    return VerifierChain(verifiers)


def check_settings(settings: VaultSettings) -> None:
    """Refuse settings that cannot work, before a database or a key is touched."""
    make_jwt_verifier(settings)
    if not settings.builtin_tokens and not settings.jwt_public_key_file:
        raise SettingsError(NO_VERIFIER)


def make_app(settings: VaultSettings, service: VaultService) -> FastAPI:
    return create_app(
        service,
        make_verifier(settings, service),
        RateLimiter(settings.rate_per_ip_per_minute),
        RateLimiter(settings.rate_per_account_per_minute),
        settings.max_body_bytes,
    )


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("backvault")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


@dataclass
class _Sweeper:
    service: VaultService
    every: float
    stop: threading.Event

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                erased = self.service.sweep()
                if erased:
                    log.info("sweep", extra={"records_erased": erased})
            except Exception:
                log.exception("sweep failed")


def serve(settings: VaultSettings) -> None:
    check_settings(settings)
    configure_logging(settings.log_level)
    service = make_service(settings)
    app = make_app(settings, service)
    if settings.jwt_public_key_file:
        legacy = service.legacy_jwt_records()
        if legacy:
            log.warning(
                "records made by JWT subjects before they had their own namespace are out "
                "of their reach until `backvault vault migrate-jwt-records` moves them",
                extra={"records": len(legacy)},
            )
    host, port = settings.host_port()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        ssl_certfile=settings.tls_cert or None,
        ssl_keyfile=settings.tls_key or None,
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        timeout_keep_alive=settings.timeout_keep_alive,
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
        limit_concurrency=settings.limit_concurrency,
        h11_max_incomplete_event_size=16 * 1024,
    )
    stop = threading.Event()
    sweeper = threading.Thread(
        target=_Sweeper(service, settings.sweep_every, stop).run, daemon=True
    )
    sweeper.start()
    log.info(
        "vault starting",
        extra={
            "listen": settings.listen,
            "db": settings.db_url.split("@")[-1],
            "sealing": service.sealer.description,
            "max_attempts": settings.max_attempts,
        },
    )

    # uvicorn finishes in-flight requests on SIGTERM/SIGINT, then re-raises the signal to
    # the handler that was installed before it: make that a clean exit.
    def _exit(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    try:
        uvicorn.Server(config).run()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        stop.set()
        service.sealer.close()
        service.engine.dispose()
        log.info("vault stopped")
