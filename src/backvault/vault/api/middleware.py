"""The vault API's ASGI middleware: a request body limit, and the access log (one JSON line
and one latency observation per request)."""

from __future__ import annotations

import ipaddress
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backvault.vault import metrics
from backvault.vault.api.errors import error_response

log = logging.getLogger("backvault.vault.http")


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
                    await error_response(
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
            await error_response(
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
