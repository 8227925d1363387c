"""Building and running a vault node from its settings."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from prometheus_client import start_http_server

from backvault.hardening.private_files import make_private_dir, write_private_file
from backvault.opaque import OpaqueConfig
from backvault.vault import metrics
from backvault.vault.accounts import (
    BuiltinTokens,
    Ed25519JwtVerifier,
    TokenVerifier,
    VerifierChain,
    jwt_verifier_from_settings,
)
from backvault.vault.api import create_app
from backvault.vault.config import SettingsError, VaultSettings, default_config_dir
from backvault.vault.housekeeping import nonce_budget_warning, purge_audit, record_seal_counts
from backvault.vault.key_versions import DatabaseVersionRecords
from backvault.vault.logging import JsonLogFormatter
from backvault.vault.ratelimit import RateLimiter
from backvault.vault.realm import RealmService, load_or_create_realm_id
from backvault.vault.schema import migrate, vault_keys
from backvault.vault.sealing import FileSealer, Pkcs11Sealer, Sealer
from backvault.vault.service import VaultService
from backvault.vault.store import make_engine

log = logging.getLogger("backvault.vault")


def make_sealer(
    settings: VaultSettings,
    engine: sa.Engine,
    create_hsm_key: bool = False,
    accept_weak_keys: bool = False,
) -> Sealer:
    """The sealer, using only the key versions recorded in the vault's database (migrated
    here first; key_versions.py). An HSM key is never created implicitly (several nodes
    starting at once would each make their own): `backvault vault init-hsm` creates it
    once. ``accept_weak_keys`` lets the rotation commands use an HSM key made before the
    vault required safe attributes, so that its values can move to a new key."""
    migrate(engine)
    records = DatabaseVersionRecords(engine)
    if settings.sealing == "pkcs11":
        return Pkcs11Sealer(
            settings.pkcs11_module,
            settings.pkcs11_token_label,
            settings.pin(),
            settings.pkcs11_key_label,
            create=create_hsm_key,
            accept_weak_keys=accept_weak_keys,
            accept_cloned_keys=settings.pkcs11_accept_cloned_keys,
            records=records,
        )
    if settings.sealing == "file":
        return FileSealer(settings.sealing_key_path, records=records)
    raise ValueError(f"sealing must be 'file' or 'pkcs11', not {settings.sealing!r}")


def open_database(settings: VaultSettings) -> sa.Engine:
    """The database engine, after making its files private (SQLite)."""
    for change in secure_database_files(settings):
        log.warning("tightened permissions", extra={"change": change})
    return make_engine(settings.db_url)


def secure_database_files(settings: VaultSettings) -> list[str]:
    """Before SQLite opens the database: its folder 0700 when it is the data folder (or
    is made now), the database file created 0600 (SQLite gives the -wal and -shm files the
    database file's mode), and looser modes on existing files tightened. Returns what was
    tightened, for the log."""
    path = settings.sqlite_path
    if path is None:
        return []
    fixed: list[str] = []
    folder = path.parent
    if not folder.exists() or folder.resolve() == Path(settings.data_dir).resolve():
        change = make_private_dir(folder)
        if change:
            fixed.append(change)
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            write_private_file(path, b"", exclusive=True, private_folder=False)
    for name in (path.name, path.name + "-wal", path.name + "-shm", path.name + "-journal"):
        candidate = folder / name
        try:
            mode = candidate.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(candidate, mode & 0o600)
            fixed.append(f"{candidate} was mode {mode:04o}; now {mode & 0o600:04o}")
    return fixed


def key_location_warning(settings: VaultSettings) -> str | None:
    """A warning when the sealing key file sits in the database's folder, where one backup
    would capture both."""
    if settings.sealing != "file":
        return None
    key = settings.sealing_key_path.resolve()
    database = settings.sqlite_path
    folders = {Path(settings.data_dir).resolve()}
    if database is not None:
        folders.add(database.parent.resolve())
    if key.parent not in folders:
        return None
    return (
        f"the sealing key {key} is in the database's folder {key.parent}: a backup of that "
        "folder holds both the sealed records and the key that opens them. Stop the vault, "
        f"move {key.name} and any {key.name}.v* next to it to {default_config_dir()}/ (the "
        "default) or elsewhere, and set sealing_key_file if elsewhere"
    )


def _initialised(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("vault_keys"):
            return False
        return conn.execute(sa.select(sa.func.count()).select_from(vault_keys)).scalar_one() > 0


def where_things_are(settings: VaultSettings, sealer: Sealer) -> str:
    """The first-start note: where the database and the key are, and why they must be
    backed up apart."""
    database = settings.sqlite_path or settings.db_url.split("@")[-1]
    if isinstance(sealer, FileSealer):
        key = f"the sealing key is {sealer.path}"
    else:
        key = f"the sealing key is in the HSM ({sealer.description}; back it up with the HSM's own procedure)"
    return (
        f"first start: the database is {database} and {key}. Back them up separately, to "
        "different places: whoever holds both can open every record and guess passwords "
        "offline, and losing the key loses every record."
    )


@dataclass
class OpenedVault:
    service: VaultService
    first_start: bool
    note: str
    realm: RealmService | None = None  # in realm mode


def open_vault(settings: VaultSettings) -> OpenedVault:
    """Prepare the database files, open the sealer and the database, start the service,
    and log what an operator must know (permissions tightened, a key in the database's
    folder, where things are at first start)."""
    engine = open_database(settings)
    sealer: Sealer | None = None
    try:
        first_start = not _initialised(engine)
        sealer = make_sealer(settings, engine)
        service = VaultService(
            engine,
            sealer,
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
        realm = None
        if settings.realm:
            realm = RealmService(
                engine,
                sealer,
                service.clock,
                guess_cap=settings.guess_cap,
                guess_cap_days=settings.guess_cap_days,
                max_allowed=settings.max_attempts,
                unlock_window=settings.realm_unlock_window,
            )
            realm.start()
    except BaseException:
        if sealer is not None:
            sealer.close()
        engine.dispose()
        raise
    warning = key_location_warning(settings)
    if warning:
        log.warning(warning)
    note = where_things_are(settings, service.sealer)
    if first_start or getattr(service.sealer, "created", False):
        log.warning(note)
    return OpenedVault(service, first_start, note, realm)


def make_service(settings: VaultSettings) -> VaultService:
    return open_vault(settings).service


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


def realm_id_of(settings: VaultSettings) -> bytes:
    """The realm id kept in the database, made now if this is its first use (the schema
    migrated first); needs no sealing key, so an operator can learn it before the first
    start, to set the JWT audience."""
    engine = open_database(settings)
    try:
        migrate(engine)
        return load_or_create_realm_id(engine, time.time)
    finally:
        engine.dispose()


def check_realm_audience(settings: VaultSettings, realm_id: bytes) -> None:
    """In realm mode a JWT must be addressed to this realm alone: its audience is the realm
    id in lower-case hex, so a realm cannot replay a user's token at another."""
    if settings.realm and settings.jwt_public_key_file and settings.jwt_audience != realm_id.hex():
        raise SettingsError(
            f"realm mode: jwt_audience must be this realm's id {realm_id.hex()} (lower-case "
            f"hex, `backvault vault realm-id`), not {settings.jwt_audience!r}"
        )


def check_settings(settings: VaultSettings) -> None:
    """Refuse settings that cannot work, before a database or a key is touched."""
    make_jwt_verifier(settings)
    if not settings.builtin_tokens and not settings.jwt_public_key_file:
        raise SettingsError(NO_VERIFIER)


def make_app(
    settings: VaultSettings, service: VaultService, realm: RealmService | None = None
) -> FastAPI:
    return create_app(
        service,
        make_verifier(settings, service),
        RateLimiter(settings.rate_per_ip_per_minute),
        RateLimiter(settings.rate_per_account_per_minute),
        settings.max_body_bytes,
        truncate_client_addresses=settings.truncate_client_addresses,
        serve_metrics=settings.metrics and not settings.metrics_listen,
        metrics_token=settings.metrics_token(),
        realm=realm,
    )


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("backvault")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


AUDIT_PURGE_EVERY = 3600.0
NONCE_WARNING_EVERY = 3600.0


@dataclass
class _Sweeper:
    """Each node's background work: expire logins (and erase spent records), pick up new
    sealing-key versions, add up seals per key version, apply audit retention."""

    service: VaultService
    settings: VaultSettings
    stop: threading.Event
    realm: RealmService | None = None
    last_purge: float = field(default=float("-inf"))
    last_nonce_warning: float = field(default=float("-inf"))

    def run(self) -> None:
        self.housekeeping()
        while not self.stop.wait(self.settings.sweep_every):
            self._step("sweep", self._expire)
            self._step("sealing key refresh", self.service.sealer.refresh)
            self.housekeeping()

    def housekeeping(self) -> None:
        self._step("counting seals", self.count_seals)
        self._step("audit retention", self._purge_audit)

    @staticmethod
    def _step(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:
            log.exception(f"{what} failed")

    def _expire(self) -> None:
        erased = self.service.sweep()
        if erased:
            log.info("sweep", extra={"records_erased": erased})
        if self.realm is not None:
            tombstoned = self.realm.sweep()
            if tombstoned:
                log.info("sweep", extra={"realm_registrations_erased": tombstoned})

    def count_seals(self) -> None:
        now = time.time()
        totals = record_seal_counts(self.service.engine, self.service.sealer, now)
        warning = nonce_budget_warning(totals, self.service.sealer.current_version)
        if warning and now - self.last_nonce_warning >= NONCE_WARNING_EVERY:
            self.last_nonce_warning = now
            log.warning(warning)

    def _purge_audit(self) -> None:
        now = time.time()
        if now - self.last_purge < AUDIT_PURGE_EVERY:
            return
        self.last_purge = now
        deleted = purge_audit(self.service.engine, self.settings.audit_retention_days, now)
        if deleted:
            log.info(
                "audit retention",
                extra={"deleted": deleted, "retention_days": self.settings.audit_retention_days},
            )


def serve(settings: VaultSettings) -> None:
    check_settings(settings)
    configure_logging(settings.log_level)
    host, port = settings.host_port()
    metrics_address = settings.metrics_host_port() if settings.metrics_listen else None
    settings.metrics_token()  # a bad token file fails here, before anything starts
    if settings.realm:
        # Before the sealing key is touched: a wrong audience refuses to start.
        check_realm_audience(settings, realm_id_of(settings))
    opened = open_vault(settings)
    service = opened.service
    if opened.first_start:
        print(opened.note, flush=True)
    old_records = service.legacy_record_count()
    if old_records:
        log.warning(
            "records made before each record had its own OPRF key: their key derives from the "
            "account name, which an older vault's registration endpoint evaluated for any "
            "token holder; each moves to a fresh key at its owner's next successful login "
            "(see the operator guide, 'Upgrading to per-registration credential identifiers')",
            extra={"records": old_records},
        )
    if settings.jwt_public_key_file:
        legacy = service.legacy_jwt_records()
        if legacy:
            log.warning(
                "records made by JWT subjects before they had their own namespace are out "
                "of their reach until `backvault vault migrate-jwt-records` moves them",
                extra={"records": len(legacy)},
            )
    app = make_app(settings, service, opened.realm)
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
    metrics_server = None
    if settings.metrics and metrics_address is not None:
        metrics_server, _thread = start_http_server(
            metrics_address[1], metrics_address[0], registry=metrics.REGISTRY
        )
    stop = threading.Event()
    sweeper = _Sweeper(service, settings, stop, opened.realm)
    threading.Thread(target=sweeper.run, daemon=True).start()
    log.info(
        "vault starting",
        extra={
            "listen": settings.listen,
            "db": settings.db_url.split("@")[-1],
            "sealing": service.sealer.description,
            "max_attempts": settings.max_attempts,
            "realm_id": opened.realm.realm_id.hex() if opened.realm else None,
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
        if metrics_server is not None:
            metrics_server.shutdown()
        _Sweeper._step("counting seals", sweeper.count_seals)
        service.sealer.close()
        service.engine.dispose()
        log.info("vault stopped")
