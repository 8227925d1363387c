"""An HTTP client for the Backup Key Vault: the OPAQUE flows over its JSON API."""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from ..opaque import KE2, OpaqueConfig, RegistrationResponse, client
from .settings import check_vault_url


class VaultUnavailable(Exception):
    """The vault could not be reached or did not answer in time."""


@dataclass
class VaultRefused(Exception):
    status: int
    code: str
    message: str
    attempts_left: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class LoginResult:
    wrapped_secret: bytes
    export_key: bytes

    def __repr__(self) -> str:
        return "LoginResult(wrapped_secret=<hidden>, export_key=<hidden>)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class VaultClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        opaque_config: OpaqueConfig | None = None,
        timeout: float = 15.0,
        verify: bool | str | ssl.SSLContext = True,
        allow_plain_http: bool = False,
    ) -> None:
        check_vault_url(base_url, allow_plain_http)  # the token must not cross a network in clear
        self.config = opaque_config or OpaqueConfig()
        if isinstance(verify, str):  # a CA bundle (e.g. a self-signed vault certificate)
            verify = ssl.create_default_context(cafile=verify)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise VaultUnavailable(
                f"cannot reach the vault at {self._http.base_url}: {exc}"
            ) from exc
        if response.status_code >= 400:
            try:
                doc = response.json()
            except ValueError:
                doc = {}
            raise VaultRefused(
                response.status_code,
                str(doc.get("error", "http_error")),
                str(doc.get("message", response.reason_phrase)),
                doc.get("attempts_left"),
            )
        if response.status_code == 204:
            return None
        return response.json()

    # --- raw API ---------------------------------------------------------------------

    def registration_start(self, request: bytes) -> bytes:
        doc = self._call("POST", "/v1/registration/start", {"registration_request": _b64(request)})
        return base64.b64decode(doc["registration_response"])

    def registration_finish(
        self, record: bytes, wrapped_secret: bytes, max_attempts: int | None = None
    ) -> None:
        body: dict[str, Any] = {"record": _b64(record), "wrapped_secret": _b64(wrapped_secret)}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        self._call("POST", "/v1/registration/finish", body)

    def login_start(self, ke1: bytes) -> tuple[str, bytes]:
        doc = self._call("POST", "/v1/login/start", {"ke1": _b64(ke1)})
        return str(doc["login_id"]), base64.b64decode(doc["ke2"])

    def login_finish(self, login_id: str, ke3: bytes) -> bytes:
        doc = self._call("POST", "/v1/login/finish", {"login_id": login_id, "ke3": _b64(ke3)})
        return base64.b64decode(doc["wrapped_secret"])

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/record"))

    def audit(self, limit: int = 1000) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/audit?limit={int(limit)}")["events"])

    def delete_record(self) -> None:
        self._call("DELETE", "/v1/record")

    # --- OPAQUE flows ------------------------------------------------------------------

    def register(self, password: bytes, wrap: Any, max_attempts: int | None = None) -> bytes:
        """Register ``password``; ``wrap(export_key) -> bytes`` makes the wrapped secret.
        Returns the export key (for the caller to forget)."""
        request, state = client.create_registration_request(password)
        response = RegistrationResponse.from_bytes(self.registration_start(request.to_bytes()))
        record, export_key = client.finalize_registration_request(state, response, self.config)
        self.registration_finish(record.to_bytes(), wrap(export_key), max_attempts)
        return export_key

    def login(self, password: bytes) -> LoginResult:
        """Log in; a wrong password raises VaultRefused (403 with attempts_left, or 410)."""
        from ..opaque.errors import AuthenticationError

        ke1, state = client.generate_ke1(password)
        login_id, ke2_bytes = self.login_start(ke1.to_bytes())
        try:
            result = client.generate_ke3(state, KE2.from_bytes(ke2_bytes), self.config)
            ke3 = result.ke3.to_bytes()
            export_key = result.export_key
        except AuthenticationError:
            # Tell the vault this attempt is over; it fails and reports what is left.
            ke3, export_key = bytes(64), b""
        wrapped = self.login_finish(login_id, ke3)
        return LoginResult(wrapped, export_key)
