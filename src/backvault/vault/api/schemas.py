"""The vault API's request and response bodies (pydantic), exactly as the OpenAPI document
publishes them. Binary protocol messages travel as standard base64 strings."""

import base64
import binascii
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from backvault.vault.outcomes import BadRequest

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
    version: str | None = Field(
        default=None, description="version_mismatch: the version held (null: none or erased)"
    )


class HealthOut(Strict):
    status: str
    version: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 410, 413, 422, 423, 429, 503)
}


def decode_b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{field} is not valid base64") from exc


def encode_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- realms (docs/realms.md, "Messages") -------------------------------------------------


class RealmInfoOut(Strict):
    realm_id: str = Field(description="This realm's id: 16 bytes, lower-case hex")
    suite: str
    protocol: int


class RealmRegisterIn(Strict):
    expected_version: b64_of(16) | None = Field(  # type: ignore[valid-type]
        description="The version the client believes this realm holds; null: none, or erased"
    )
    descriptor: B64 = Field(description="The descriptor D (docs/realms.md)")
    key_share: b64_of(32) = Field(description="k_j, this realm's share of the OPRF key")  # type: ignore[valid-type]
    tag_hash: b64_of(32) = Field(description="SHA-256 of this realm's unlock tag")  # type: ignore[valid-type]
    encryption_share: b64_of(32) = Field(description="e_j, this realm's encryption share")  # type: ignore[valid-type]
    share_mac: b64_of(32)  # type: ignore[valid-type]
    ciphertext: B64


class RealmRegisterOut(Strict):
    version: str


class RealmRegistrationOut(Strict):
    state: str = Field(description="registered, erased or none")
    descriptor: str | None
    attempts: int
    allowed: int


class RealmEvaluateIn(Strict):
    version: b64_of(16)  # type: ignore[valid-type]
    blinded_element: b64_of(32) = Field(description="B, the client's blinded element")  # type: ignore[valid-type]


class RealmEvaluateOut(Strict):
    evaluated_element: str = Field(description="Z_j = k_j·B")
    proof: str = Field(description="DLEQ proof (RFC 9497) that Z_j and pk_j share k_j")
    attempts_left: int
    attempt_id: str = Field(description="16 bytes: present it at unlock to be forgiven")


class RealmUnlockIn(Strict):
    version: b64_of(16)  # type: ignore[valid-type]
    tag: b64_of(32)  # type: ignore[valid-type]
    attempt_ids: list[b64_of(16)] = Field(  # type: ignore[valid-type]
        default_factory=list,
        max_length=256,
        description="Ids of this client's own evaluations of this registration: forgiven",
    )


class RealmUnlockOut(Strict):
    encryption_share: str
    share_mac: str
    ciphertext: str
