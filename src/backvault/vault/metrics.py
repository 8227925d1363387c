"""Prometheus metrics of a vault node (served at ``/metrics``, or on ``metrics_listen``).

Labels come from fixed sets only — event names, route templates, status classes, sealing
operations and key versions — never from account names, client addresses, tokens or
request data, so a scrape reveals activity levels and nothing about any person.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

__all__ = [
    "AUDIT_EVENTS",
    "CONTENT_TYPE",
    "COUNTED_EVENTS",
    "HTTP_REQUEST_SECONDS",
    "REGISTRY",
    "SEALING_KEYS_IGNORED",
    "SEALING_KEY_CHANGES",
    "SEALING_KEY_CURRENT_INFO",
    "SEALING_KEY_CURRENT_VERSION",
    "SEALING_KEY_SEALS",
    "SEALING_OPERATIONS",
    "count_audit_event",
    "exposition",
    "method_label",
    "route_label",
    "status_class",
]

# The *_created series (one timestamp per labelled counter) would double the output for
# nothing a dashboard of this service uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

# One registry per process (not prometheus_client's global one, which other libraries
# may fill): what /metrics shows is exactly what is declared here.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Audit event names that get their own series; anything else counts as "other", so a
# new event name can never create series without a code change here.
COUNTED_EVENTS = frozenset(
    {
        "login_started",
        "login_succeeded",
        "login_failed",
        "login_refused",
        "login_expired",
        "record_erased",
        "record_deleted",
        "record_replaced",
        "registered",
        "registration_started",
        "record_moved",
        "token_rotated",
        "token_revoked",
        "realm_registered",
        "realm_replaced",
        "realm_evaluated",
        "realm_refused",
        "realm_key_erased",
        "realm_unlocked",
        "realm_unlock_failed",
        "realm_deleted",
        "realm_erased",
    }
)

AUDIT_EVENTS = Counter(
    "backvault_vault_audit_events",
    "Audited events on this node, by event name (logins started, succeeded, failed, "
    "refused; records erased; ...).",
    ["event"],
    registry=REGISTRY,
)
for _event in (*sorted(COUNTED_EVENTS), "other"):
    AUDIT_EVENTS.labels(event=_event)

HTTP_REQUEST_SECONDS = Histogram(
    "backvault_vault_http_request_duration_seconds",
    "Time to answer an HTTP request, by method, route template and status class.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)

SEALING_OPERATIONS = Counter(
    "backvault_vault_sealing_operations",
    "Calls to the sealing key (HSM or key file), by operation (seal, open) and outcome "
    "(ok, error).",
    ["operation", "outcome"],
    registry=REGISTRY,
)
for _operation in ("seal", "open"):
    for _outcome in ("ok", "error"):
        SEALING_OPERATIONS.labels(operation=_operation, outcome=_outcome)

SEALING_KEY_SEALS = Gauge(
    "backvault_vault_sealing_key_seals",
    "Values sealed under each sealing key version by all nodes (durable count, updated "
    "every sweep). AES-GCM with random nonces allows 2^32 per key version: rotate well "
    "before.",
    ["key_version"],
    registry=REGISTRY,
)

SEALING_KEY_CURRENT_VERSION = Gauge(
    "backvault_vault_sealing_key_current_version",
    "The sealing key version this node seals new values under.",
    registry=REGISTRY,
)

SEALING_KEY_CURRENT_INFO = Gauge(
    "backvault_vault_sealing_key_current_info",
    "1, labelled with the sealing key version this node seals under and the first 8 bytes "
    "of that key's check value (hex): every node of a vault must show the same.",
    ["key_version", "check_value"],
    registry=REGISTRY,
)

SEALING_KEY_CHANGES = Counter(
    "backvault_vault_sealing_key_changes",
    "Times this node's current sealing key version changed since it started (a rotation: "
    "alert on any you did not run).",
    registry=REGISTRY,
)

SEALING_KEYS_IGNORED = Gauge(
    "backvault_vault_sealing_keys_ignored",
    "Keys in the key store (HSM token or key-file folder) that this node refuses to use, by "
    "reason: unrecorded (a version the vault never made), check_value (not the key the "
    "vault made for that version), destroyed, unfinished (a rotation that never recorded "
    "its key). Anything above 0 needs a look: alert on it.",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("unrecorded", "check_value", "destroyed", "unfinished"):
    SEALING_KEYS_IGNORED.labels(reason=_reason)

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def count_audit_event(event: str) -> None:
    AUDIT_EVENTS.labels(event=event if event in COUNTED_EVENTS else "other").inc()


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def route_label(template: str | None) -> str:
    """The route's template (``/v1/login/start``), never the raw path: a path that matched
    no route is ``unmatched``, so scanners cannot create series."""
    return template or "unmatched"


def method_label(method: str) -> str:
    return method if method in _KNOWN_METHODS else "other"


def exposition() -> bytes:
    return generate_latest(REGISTRY)
