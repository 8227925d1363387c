"""An HTTP client for the Backup Key Vault: the OPAQUE flows over its JSON API."""

from __future__ import annotations

import base64
import hmac
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from backvault.device.settings import check_vault_url
from backvault.opaque import KE2, OpaqueConfig, RegistrationResponse, client
from backvault.vaultclient.errors import VaultRefused, VaultUnavailable


@dataclass(frozen=True)
class RegistrationStart:
    registration_id: str  # the handle the finish must present
    response: bytes  # RFC 9807 RegistrationResponse

    def __repr__(self) -> str:
        return "RegistrationStart(<handle>)"


@dataclass(frozen=True)
class Registration:
    export_key: bytes
    fingerprint: str  # of the record registered: compare with status()["fingerprint"]

    def __repr__(self) -> str:
        return f"Registration(fingerprint={self.fingerprint[:16]})"


@dataclass(frozen=True)
class LoginFinished:
    wrapped_secret: bytes
    attempts_left: int
    forgiven: int
    counted: int  # attempts still counted that this client did not prove its own
    counted_since: float | None
    legacy_record: bool = False  # register again (same password, keep_count) to move it
    max_attempts: int = 0
    fingerprint: str = ""  # of the record this login opened

    def __repr__(self) -> str:
        return f"LoginFinished(attempts_left={self.attempts_left}, counted={self.counted})"


@dataclass(frozen=True)
class LoginResult:
    wrapped_secret: bytes
    export_key: bytes
    attempts_left: int
    forgiven: int
    counted: int
    counted_since: float | None
    legacy_record: bool = False
    max_attempts: int = 0
    fingerprint: str = ""

    def __repr__(self) -> str:
        return (
            "LoginResult(wrapped_secret=<hidden>, export_key=<hidden>, "
            f"attempts_left={self.attempts_left}, counted={self.counted})"
        )


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

    def registration_start(self, request: bytes) -> RegistrationStart:
        doc = self._call("POST", "/v1/registration/start", {"registration_request": _b64(request)})
        return RegistrationStart(
            str(doc["registration_id"]), base64.b64decode(doc["registration_response"])
        )

    def registration_finish(
        self,
        registration_id: str,
        record: bytes,
        wrapped_secret: bytes,
        max_attempts: int | None = None,
        keep_count: bool = False,
        replaces: str | None = None,
    ) -> str:
        """Store the record; returns the fingerprint the vault computed for it."""
        body: dict[str, Any] = {
            "registration_id": registration_id,
            "record": _b64(record),
            "wrapped_secret": _b64(wrapped_secret),
        }
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        if keep_count:
            body["keep_count"] = True
            body["replaces"] = replaces
        return str(self._call("POST", "/v1/registration/finish", body)["fingerprint"])

    def login_start(self, ke1: bytes) -> tuple[str, bytes]:
        doc = self._call("POST", "/v1/login/start", {"ke1": _b64(ke1)})
        return str(doc["login_id"]), base64.b64decode(doc["ke2"])

    def login_finish(
        self, login_id: str, ke3: bytes, earlier_login_ids: Sequence[str] = ()
    ) -> LoginFinished:
        doc = self._call(
            "POST",
            "/v1/login/finish",
            {"login_id": login_id, "ke3": _b64(ke3), "earlier_login_ids": list(earlier_login_ids)},
        )
        return LoginFinished(
            base64.b64decode(doc["wrapped_secret"]),
            int(doc["attempts_left"]),
            int(doc["forgiven"]),
            int(doc["counted"]),
            doc.get("counted_since"),
            bool(doc.get("legacy_record", False)),
            int(doc.get("max_attempts", 0)),
            str(doc.get("fingerprint", "")),
        )

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/record"))

    def audit(self, limit: int = 1000) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/audit?limit={int(limit)}")["events"])

    def delete_record(self) -> None:
        self._call("DELETE", "/v1/record")

    # --- OPAQUE flows ------------------------------------------------------------------

    def register(
        self,
        password: bytes,
        wrap: Any,
        max_attempts: int | None = None,
        keep_count: bool = False,
        replaces: str | None = None,
    ) -> Registration:
        """Register ``password``; ``wrap(export_key) -> bytes`` makes the wrapped secret.
        Returns the export key (for the caller to forget) and the record's fingerprint.
        A vault that stores something else than the record made here is refused.
        ``keep_count``: the replaced record's count carries over; ``replaces`` names that
        record (its fingerprint), and the vault refuses if it is not the one there."""
        request, state = client.create_registration_request(password)
        started = self.registration_start(request.to_bytes())
        response = RegistrationResponse.from_bytes(started.response)
        record, export_key = client.finalize_registration_request(state, response, self.config)
        stored = self.registration_finish(
            started.registration_id,
            record.to_bytes(),
            wrap(export_key),
            max_attempts,
            keep_count,
            replaces,
        )
        if not hmac.compare_digest(stored, record.fingerprint()):
            raise VaultRefused(
                502, "fingerprint_mismatch", "the vault stored another record than ours"
            )
        return Registration(export_key, record.fingerprint())

    def login(
        self,
        password: bytes,
        earlier_login_ids: Sequence[str] = (),
        on_started: Callable[[str], None] | None = None,
    ) -> LoginResult:
        """Log in; a wrong password raises VaultRefused (403 with attempts_left, or 410).

        ``earlier_login_ids`` are this client's earlier wrong tries (forgiven on success);
        ``on_started(login_id)`` is called as soon as the vault has counted this attempt,
        so the caller can keep its id before anything else can fail."""
        from backvault.opaque.errors import AuthenticationError

        ke1, state = client.generate_ke1(password)
        login_id, ke2_bytes = self.login_start(ke1.to_bytes())
        if on_started is not None:
            on_started(login_id)
        try:
            result = client.generate_ke3(state, KE2.from_bytes(ke2_bytes), self.config)
            ke3 = result.ke3.to_bytes()
            export_key = result.export_key
        except AuthenticationError:
            # Tell the vault this attempt is over; it fails and reports what is left.
            ke3, export_key = bytes(64), b""
        done = self.login_finish(login_id, ke3, earlier_login_ids)
        if not export_key:
            # A real vault never accepts a KE3 of zeros: whoever answered is not the vault
            # the client registered with, and what it sent must not be used.
            raise VaultRefused(
                502,
                "vault_misbehaved",
                "the vault accepted a login that this client could not verify; it is not "
                "behaving as a vault: nothing it sent was used",
            )
        return LoginResult(
            done.wrapped_secret,
            export_key,
            done.attempts_left,
            done.forgiven,
            done.counted,
            done.counted_since,
            done.legacy_record,
            done.max_attempts,
            done.fingerprint,
        )
