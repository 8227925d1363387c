"""A small realm that follows docs/realms.md ("Messages"), run as a real uvicorn server in its
own process, for testing the client's orchestration (backvault.vaultclient.realms) while the
real realm endpoints are written. It can be told to misbehave, per endpoint, through
``POST /_fake/behave`` (not part of the spec).

State is in memory (one process per realm). A bearer token is ``ACCOUNT@REALMIDHEX``: the
account is the user id, and a token for another realm is refused (as a JWT's ``aud`` is).

Run: ``python tests/fake_realm.py PORT REALM_ID_HEX``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from backvault.opaque import group, voprf
from backvault.opaque.errors import InvalidMessageError
from backvault.realms.descriptor import SUITE, Descriptor, DescriptorError, decode

MAX_BODY = 16 * 1024
WINDOW = 60.0  # seconds a realm at its limit keeps what the last guess needs


@dataclass
class Held:
    descriptor: bytes
    version: bytes
    key_share: bytes | None
    tag_hash: bytes
    encryption_share: bytes
    share_mac: bytes
    ciphertext: bytes
    allowed: int
    attempts: int = 0
    attempt_ids: set[bytes] = field(default_factory=set)
    exhausted_at: float | None = None


@dataclass
class Tombstone:
    version: bytes


class Refusal(Exception):
    def __init__(
        self, status: int, code: str, message: str, version: bytes | bool | None = False
    ) -> None:
        # version: what a 409 version_mismatch carries (False: not a version mismatch)
        self.status, self.code, self.message, self.version = status, code, message, version


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise Refusal(400, "bad_request", f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(400, "bad_request", f"{what} is not base64") from None


def now_of(held: Held | Tombstone | None) -> bytes | None:
    return held.version if isinstance(held, Held) else None


def make_app(realm_id: bytes) -> FastAPI:
    app = FastAPI()
    accounts: dict[str, Held | Tombstone] = {}
    behaviour: dict[str, str] = {}  # endpoint -> how to misbehave
    seen: dict[str, list[str]] = {}  # account -> the blinded elements it was asked about
    lock = asyncio.Lock()

    def account(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ")
        name, _, audience = token.rpartition("@")
        if not auth.startswith("Bearer ") or not name or audience != realm_id.hex():
            raise Refusal(401, "unauthorized", "no valid token for this realm")
        return name

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise Refusal(413, "too_large", "request bodies are at most 16 KiB")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Refusal(400, "bad_request", "not JSON") from None
        if not isinstance(doc, dict):
            raise Refusal(400, "bad_request", "not a JSON object")
        return doc

    def current(name: str) -> Held | Tombstone | None:
        held = accounts.get(name)
        expired = (
            isinstance(held, Held)
            and held.exhausted_at is not None
            and time.monotonic() - held.exhausted_at > WINDOW
        )
        if isinstance(held, Held) and expired:
            accounts[name] = held = Tombstone(held.version)
        return held

    @app.exception_handler(Refusal)
    async def refused(_request: Request, exc: Refusal) -> JSONResponse:
        doc: dict[str, Any] = {"error": exc.code, "message": exc.message}
        if exc.version is not False:
            doc["version"] = b64(exc.version) if isinstance(exc.version, bytes) else None
        return JSONResponse(doc, status_code=exc.status)

    async def misbehave(endpoint: str) -> Response | None:
        """The answers of a broken or hostile realm that need no state."""
        how = behaviour.get(endpoint)
        if how == "garbage":
            return Response(b"\x00not json{{", media_type="application/json")
        if how == "deep_json":  # deep enough to exhaust a recursive parser
            return Response(b"[" * 30000 + b"]" * 30000, media_type="application/json")
        if how == "gzip_junk":  # an encoding nobody asked for, and not even valid
            return Response(
                b"not gzip at all",
                media_type="application/json",
                headers={"Content-Encoding": "gzip"},
            )
        if how == "huge":
            chunk = b"x" * 65536

            async def body() -> Any:
                for _ in range(160):  # 10 MiB
                    yield chunk

            return StreamingResponse(body(), media_type="application/json")
        if how == "stall":
            await asyncio.sleep(600)
        if how == "refuse":
            raise Refusal(503, "unavailable", "this realm is down for maintenance")
        return None

    @app.post("/_fake/behave")
    async def behave(request: Request) -> dict[str, str]:
        doc = await request.json()
        behaviour.clear()
        behaviour.update(doc)
        return behaviour

    @app.get("/_fake/seen/{name}")
    async def seen_by(name: str) -> list[str]:
        return seen.get(name, [])

    @app.get("/realm/v1/info")
    async def info() -> Any:
        return await misbehave("info") or {
            "realm_id": realm_id.hex(),
            "suite": SUITE.decode(),
            "protocol": 1,
        }

    @app.get("/realm/v1/registration")
    async def registration(request: Request) -> Any:
        name = account(request)
        if (answer := await misbehave("registration")) is not None:
            return answer
        held = current(name)
        if isinstance(held, Held):
            descriptor = held.descriptor
            if behaviour.get("registration") == "other_descriptor":
                d = decode(descriptor)
                descriptor = Descriptor(
                    d.version,
                    d.user_id,
                    d.threshold,
                    d.allowed_guesses,
                    secrets.token_bytes(32),
                    d.realms,
                ).encode()
            return {
                "state": "registered",
                "descriptor": b64(descriptor),
                "attempts": held.attempts,
                # A realm claiming more attempts than its descriptor allows, to be asked first.
                "allowed": 65535 if behaviour.get("registration") == "inflate" else held.allowed,
            }
        state = "erased" if isinstance(held, Tombstone) else "none"
        return {"state": state, "descriptor": None, "attempts": 0, "allowed": 0}

    @app.post("/realm/v1/register")
    async def register(request: Request) -> Any:
        name = account(request)
        doc = await body_of(request)
        if (answer := await misbehave("register")) is not None:
            return answer
        raw = unb64(doc.get("descriptor"), "descriptor")
        try:
            d = decode(raw)
            entry = d.entry(realm_id)
        except DescriptorError as exc:
            raise Refusal(400, "bad_descriptor", str(exc)) from None
        key_share = unb64(doc.get("key_share"), "key_share")
        try:
            if not hmac.compare_digest(
                group.scalar_mult_base(group.deserialize_scalar(key_share)), entry.public_share
            ):
                raise Refusal(400, "bad_key_share", "the key share is not pk's")
        except InvalidMessageError as exc:
            raise Refusal(400, "bad_key_share", str(exc)) from None
        expected = doc.get("expected_version")
        expected_version = None if expected is None else unb64(expected, "expected_version")
        async with lock:
            held = current(name)
            now = held.version if isinstance(held, Held) else None
            tombstone = held.version if isinstance(held, Tombstone) else None
            if expected_version not in (now, tombstone):
                raise Refusal(
                    409,
                    "version_mismatch",
                    f"the registration here is {now.hex() if now else 'none'}",
                    now,
                )
            accounts[name] = Held(
                raw,
                d.version,
                key_share,
                unb64(doc.get("tag_hash"), "tag_hash"),
                unb64(doc.get("encryption_share"), "encryption_share"),
                unb64(doc.get("share_mac"), "share_mac"),
                unb64(doc.get("ciphertext"), "ciphertext"),
                d.allowed_guesses,
            )
        return {"version": b64(d.version)}

    @app.post("/realm/v1/evaluate")
    async def evaluate(request: Request) -> Any:
        name = account(request)
        doc = await body_of(request)
        version = unb64(doc.get("version"), "version")
        blinded = unb64(doc.get("blinded_element"), "blinded_element")
        seen.setdefault(name, []).append(b64(blinded))
        async with lock:
            held = current(name)
            if not isinstance(held, Held) or held.version != version:
                raise Refusal(409, "version_mismatch", "another registration is here", now_of(held))
            if held.attempts >= held.allowed or held.key_share is None:
                raise Refusal(403, "no_attempts_left", "no attempts left")
            # Counted before anything is evaluated.
            held.attempts += 1
            attempt_id = secrets.token_bytes(16)
            held.attempt_ids.add(attempt_id)
            key_share = held.key_share
            if held.attempts >= held.allowed:
                held.key_share = None
                held.exhausted_at = time.monotonic()
            left = held.allowed - held.attempts
        if (answer := await misbehave("evaluate")) is not None:
            return answer
        d = decode(held.descriptor)
        public = d.entry(realm_id).public_share
        try:
            (z,), proof = voprf.blind_evaluate(key_share, public, [blinded], group.random_scalar())
        except InvalidMessageError as exc:
            raise Refusal(400, "bad_request", str(exc)) from None
        how = behaviour.get("evaluate")
        if how == "wrong_evaluation":
            z = group.scalar_mult(group.random_scalar(), blinded)
        elif how == "wrong_proof":
            proof = group.random_scalar() + group.random_scalar()
        return {
            "evaluated_element": b64(z),
            "proof": b64(proof),
            "attempts_left": left,
            "attempt_id": b64(attempt_id),
        }

    @app.post("/realm/v1/unlock")
    async def unlock(request: Request) -> Any:
        name = account(request)
        doc = await body_of(request)
        if (answer := await misbehave("unlock")) is not None:
            return answer
        version = unb64(doc.get("version"), "version")
        tag = unb64(doc.get("tag"), "tag")
        ids = doc.get("attempt_ids")
        if not isinstance(ids, list):
            raise Refusal(400, "bad_request", "attempt_ids is not a list")
        async with lock:
            held = current(name)
            if isinstance(held, Tombstone) and held.version == version:
                raise Refusal(410, "registration_erased", "this registration is erased")
            if not isinstance(held, Held) or held.version != version:
                raise Refusal(409, "version_mismatch", "another registration is here", now_of(held))
            if not hmac.compare_digest(hashlib.sha256(tag).digest(), held.tag_hash):
                raise Refusal(403, "wrong_tag", "wrong tag")
            for value in ids:
                attempt_id = unb64(value, "attempt id")
                if attempt_id in held.attempt_ids and held.key_share is not None:
                    held.attempt_ids.discard(attempt_id)
                    held.attempts -= 1
            answer_doc = {
                "encryption_share": b64(held.encryption_share),
                "share_mac": b64(held.share_mac),
                "ciphertext": b64(held.ciphertext),
            }
        how = behaviour.get("unlock")
        if how == "bad_share_mac":
            answer_doc["share_mac"] = b64(secrets.token_bytes(32))
        elif how == "bad_share":
            answer_doc["encryption_share"] = b64(group.random_scalar())
        return answer_doc

    @app.delete("/realm/v1/registration")
    async def delete(request: Request, version: str) -> Response:
        name = account(request)
        if (answer := await misbehave("delete")) is not None:
            return answer
        wanted = unb64(version, "version")
        async with lock:
            held = current(name)
            if isinstance(held, Held) and held.version != wanted:
                raise Refusal(409, "version_mismatch", "another registration is here", now_of(held))
            accounts.pop(name, None)  # afterwards phase 1 says "none"
        return Response(status_code=204)

    return app


if __name__ == "__main__":
    port, realm_hex = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        make_app(bytes.fromhex(realm_hex)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
