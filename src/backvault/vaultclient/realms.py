"""The client of threshold realms (docs/realms.md): one ``RealmClient`` per realm speaks
its HTTP API; ``RealmSet`` runs registration, the three phases of a recovery, deletion and
the questions "how many attempts are left" and "is it erased" over the pinned realms. The
computations are ``backvault.realms.protocol``; this module only moves bytes and decides
which realm to ask next.

Nothing a realm answers is trusted: answers are capped (64 KiB), parsed strictly, and every
evaluation and share is checked against the descriptor t realms agreed on. A realm that
misbehaves or does not answer in time is named, never silently skipped.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from backvault.device.settings import check_vault_url
from backvault.opaque import group
from backvault.realms import bounds, protocol
from backvault.realms.descriptor import (
    REALM_ID_SIZE,
    SUITE,
    VERSION_SIZE,
    Descriptor,
    DescriptorError,
    check_threshold,
    decode,
)
from backvault.realms.protocol import RealmPayload, RealmProtocolError, TestOnlyStretching
from backvault.vaultclient.errors import (
    RealmMisbehaved,
    RealmRefused,
    RealmRegistrationFailed,
    RealmsDisagree,
    RealmUnreachable,
    RealmWrongPassword,
    TooFewRealms,
)

MAX_ANSWER = 64 * 1024  # bytes; no honest answer comes near it
ATTEMPT_ID_SIZE = 16
DEFAULT_TIMEOUT = 15.0
STATES = ("registered", "erased", "none")

# What one realm can do wrong; anything else is a bug here and is not caught.
RealmFailure = (RealmUnreachable, RealmMisbehaved, RealmRefused, RealmProtocolError)

T = TypeVar("T")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- one realm ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RealmState:
    """Phase 1's answer: what a realm holds for this account (costs no attempt)."""

    state: str  # registered | erased | none
    descriptor: Descriptor | None
    descriptor_bytes: bytes | None
    attempts: int
    allowed: int

    @property
    def attempts_left(self) -> int:
        """What the realm says is left, never more than the G_r its descriptor names (a
        realm claiming more would be asked first, and would inflate the bound shown)."""
        if self.state != "registered":
            return 0
        allowed = self.allowed
        if self.descriptor is not None:
            allowed = min(allowed, self.descriptor.allowed_guesses)
        return max(0, allowed - self.attempts)


@dataclass(frozen=True)
class Evaluation:
    evaluated_element: bytes
    proof: bytes
    attempts_left: int
    attempt_id: bytes


@dataclass(frozen=True)
class ShareAnswer:
    encryption_share: bytes
    share_mac: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return "ShareAnswer(<hidden>)"


class RealmClient:
    """One realm at ``url``, pinned to ``realm_id`` (None: not yet pinned; ``pin`` asks
    ``GET /realm/v1/info``), with this account's token for it."""

    def __init__(
        self,
        url: str,
        token: str,
        realm_id: bytes | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        verify: bool | str | ssl.SSLContext = True,
        allow_plain_http: bool = False,
    ) -> None:
        check_vault_url(url, allow_plain_http)  # the token must not cross a network in clear
        if realm_id is not None and len(realm_id) != REALM_ID_SIZE:
            raise ValueError(f"a realm id is {REALM_ID_SIZE} bytes ({url})")
        self.url = url.rstrip("/")
        self.realm_id = realm_id
        self.timeout = timeout
        if isinstance(verify, str):  # a CA bundle (e.g. a self-signed realm certificate)
            verify = ssl.create_default_context(cafile=verify)
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"},
            timeout=timeout,
            verify=verify,
        )

    def __repr__(self) -> str:
        pinned = self.realm_id.hex() if self.realm_id else "unpinned"
        return f"RealmClient({self.url}, {pinned})"

    def close(self) -> None:
        self._http.close()

    @property
    def pinned_id(self) -> bytes:
        if self.realm_id is None:
            raise ValueError(f"realm {self.url} has no pinned id yet")
        return self.realm_id

    # --- transport -------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """The answer's JSON (None for 204). Reads at most MAX_ANSWER bytes, and gives up
        when the whole answer takes longer than the timeout (a realm trickling bytes)."""
        deadline = time.monotonic() + self.timeout
        try:
            with self._http.stream(method, path, json=body, params=params) as response:
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):  # we asked for none: no decompression
                    raise self._misbehaved(f"answered in a {encoding!r} encoding")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > MAX_ANSWER:
                    raise self._misbehaved(f"announced an answer of {declared} bytes")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_ANSWER:
                        raise self._misbehaved(f"answered more than {MAX_ANSWER} bytes")
                    if time.monotonic() > deadline:
                        raise RealmUnreachable(self.url, f"no answer within {self.timeout:g} s")
                    chunks.append(chunk)
                status, reason = response.status_code, response.reason_phrase
        except httpx.TimeoutException:
            raise RealmUnreachable(self.url, f"no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise RealmUnreachable(self.url, _one_line(f"cannot reach it: {exc}")) from None
        except httpx.HTTPError as exc:  # a malformed answer (bad headers, bad encoding)
            raise self._misbehaved(_one_line(f"answered something unreadable: {exc}")) from None
        data = b"".join(chunks)
        if status >= 400:
            doc = self._json(data, required=False)
            code = doc.get("error") if isinstance(doc, dict) else None
            message = doc.get("message") if isinstance(doc, dict) else None
            raise RealmRefused(
                status,
                code if isinstance(code, str) else "http_error",
                _one_line(message if isinstance(message, str) else reason),
                None,
                self.url,
            )
        if status == 204:
            return None
        if status != 200:
            raise self._misbehaved(f"answered HTTP {status}")
        return self._json(data, required=True)

    def _json(self, data: bytes, required: bool) -> Any:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nesting too deep: garbage
            if required:
                raise self._misbehaved("answered something that is not JSON") from None
            return {}
        if required and not isinstance(doc, dict):
            raise self._misbehaved("answered JSON that is not an object")
        return doc

    def _misbehaved(self, message: str) -> RealmMisbehaved:
        return RealmMisbehaved(self.url, message)

    def _bytes(self, doc: Mapping[str, Any], key: str, size: int | None = None) -> bytes:
        value = doc.get(key)
        if not isinstance(value, str):
            raise self._misbehaved(f"answered without {key}")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self._misbehaved(f"its {key} is not base64") from None
        if size is not None and len(data) != size:
            raise self._misbehaved(f"its {key} is {len(data)} bytes, not {size}")
        return data

    def _int(self, doc: Mapping[str, Any], key: str) -> int:
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise self._misbehaved(f"its {key} is not a count")
        return value

    # --- the API (docs/realms.md, "Messages") ----------------------------------------

    def info(self) -> bytes:
        """The realm's id (``GET /realm/v1/info``), checked against the pin if any."""
        doc = self._call("GET", "/realm/v1/info")
        try:
            realm_id = bytes.fromhex(str(doc.get("realm_id")))
        except ValueError:
            raise self._misbehaved("its realm id is not hex") from None
        if len(realm_id) != REALM_ID_SIZE:
            raise self._misbehaved("its realm id is not 16 bytes")
        if doc.get("suite") != SUITE.decode() or doc.get("protocol") != 1:
            raise self._misbehaved("it speaks another realm suite or protocol")
        if self.realm_id is not None and realm_id != self.realm_id:
            raise self._misbehaved(
                f"its realm id is {realm_id.hex()}, not the pinned {self.realm_id.hex()}"
            )
        return realm_id

    def pin(self) -> bytes:
        if self.realm_id is None:
            self.realm_id = self.info()
        return self.realm_id

    def registration(self) -> RealmState:
        doc = self._call("GET", "/realm/v1/registration")
        state = doc.get("state")
        if state not in STATES:
            raise self._misbehaved("its registration state is not one of " + ", ".join(STATES))
        attempts, allowed = self._int(doc, "attempts"), self._int(doc, "allowed")
        if state != "registered":
            return RealmState(state, None, None, attempts, allowed)
        raw = self._bytes(doc, "descriptor")
        try:
            descriptor = decode(raw)
        except DescriptorError as exc:
            raise self._misbehaved(f"its descriptor is refused: {exc}") from None
        return RealmState(state, descriptor, raw, attempts, allowed)

    def register(
        self, descriptor_bytes: bytes, payload: RealmPayload, expected_version: bytes | None
    ) -> None:
        version = decode(descriptor_bytes).version
        doc = self._call(
            "POST",
            "/realm/v1/register",
            {
                "expected_version": None if expected_version is None else _b64(expected_version),
                "descriptor": _b64(descriptor_bytes),
                "key_share": _b64(payload.key_share),
                "tag_hash": _b64(payload.tag_hash),
                "encryption_share": _b64(payload.encryption_share),
                "share_mac": _b64(payload.share_mac),
                "ciphertext": _b64(payload.ciphertext),
            },
        )
        if self._bytes(doc, "version", VERSION_SIZE) != version:
            raise self._misbehaved("it confirmed another version than the one registered")

    def evaluate(self, version: bytes, blinded_element: bytes) -> Evaluation:
        doc = self._call(
            "POST",
            "/realm/v1/evaluate",
            {"version": _b64(version), "blinded_element": _b64(blinded_element)},
        )
        return Evaluation(
            self._bytes(doc, "evaluated_element", group.ELEMENT_SIZE),
            self._bytes(doc, "proof", 2 * group.SCALAR_SIZE),
            self._int(doc, "attempts_left"),
            self._bytes(doc, "attempt_id", ATTEMPT_ID_SIZE),
        )

    def unlock(self, version: bytes, tag: bytes, attempt_ids: Sequence[bytes]) -> ShareAnswer:
        doc = self._call(
            "POST",
            "/realm/v1/unlock",
            {
                "version": _b64(version),
                "tag": _b64(tag),
                "attempt_ids": [_b64(a) for a in attempt_ids],
            },
        )
        return ShareAnswer(
            self._bytes(doc, "encryption_share", group.SCALAR_SIZE),
            self._bytes(doc, "share_mac", protocol.MAC_SIZE),
            self._bytes(doc, "ciphertext", protocol.CIPHERTEXT_SIZE),
        )

    def delete(self, version: bytes) -> None:
        """Delete that version here; a missing or erased one is gone already (204), and
        another version (409) means ours is not here either."""
        try:
            self._call("DELETE", "/realm/v1/registration", params={"version": _b64(version)})
        except RealmRefused as exc:
            if exc.code != "version_mismatch":
                raise


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# --- results -----------------------------------------------------------------------------


@dataclass
class Survey:
    """Phase 1 over every pinned realm: each realm's answer or why there is none, and the
    descriptor t of them agree on (None: no agreement)."""

    answers: dict[str, RealmState]
    problems: dict[str, str]  # unreachable or misbehaving realms, by URL
    descriptor: Descriptor | None = None
    descriptor_bytes: bytes | None = None
    agreeing: list[RealmClient] = field(default_factory=list)

    def expected_version(self, url: str) -> bytes | None:
        """The version a registration replacing this one names at realm ``url``: what it
        answered, or for a realm that did not answer, what the others agreed on (the
        last the client knows of)."""
        answer = self.answers.get(url)
        if answer is None:
            return self.descriptor.version if self.descriptor is not None else None
        return answer.descriptor.version if answer.descriptor is not None else None


@dataclass(frozen=True)
class AttemptsLeft:
    guesses: int | None  # the bound over the realms' counts (None: unbounded)
    per_realm: dict[str, int]  # attempts left by URL (0 for the unreachable)
    unreachable: dict[str, str]  # realms counted as 0, and why


@dataclass(frozen=True)
class PendingDelivery:
    """A degraded registration's payload for a realm that missed it, for later delivery
    (``RealmSet.deliver``) with ``expected_version`` = what that realm last had."""

    url: str
    realm_id: bytes
    descriptor_bytes: bytes
    payload: RealmPayload
    expected_version: bytes | None

    def __repr__(self) -> str:
        return f"PendingDelivery({self.url}, realm {self.realm_id.hex()})"


@dataclass(frozen=True)
class RegistrationOutcome:
    descriptor: Descriptor
    accepted: list[str]  # URLs
    pending: list[PendingDelivery]  # non-empty only for a degraded registration
    problems: dict[str, str]
    pinned: dict[str, bytes]  # URL -> realm id learnt now (to be written to the settings)


@dataclass(frozen=True)
class Recovered:
    secret: bytes
    descriptor: Descriptor
    problems: dict[str, str]  # realms that failed some phase (named, replaced)
    attempts_left: dict[str, int]  # reported by the realms that evaluated
    # The realms that answered phase 3 (and so forgave the attempt ids presented to them).
    unlocked: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Recovered(<secret>, problems={sorted(self.problems)})"


@dataclass(frozen=True)
class DeletionReport:
    confirmed: list[str]
    failed: dict[str, str]


# --- the realms together -----------------------------------------------------------------


class RealmSet:
    """The pinned realms of one account (``user_id``, the name its tokens authenticate).

    ``test_stretching`` exists for tests only (cheap Argon2id); production passes nothing
    and the suite's parameters are used."""

    def __init__(
        self,
        realms: Sequence[RealmClient],
        user_id: str,
        *,
        test_stretching: TestOnlyStretching | None = None,
    ) -> None:
        urls = [realm.url for realm in realms]
        if len(set(urls)) != len(urls):
            raise ValueError("a realm URL appears twice")
        self.realms = list(realms)
        self.user_id = user_id
        self._stretching = test_stretching

    def close(self) -> None:
        for realm in self.realms:
            realm.close()

    def __enter__(self) -> RealmSet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def each(
        self, realms: Iterable[RealmClient], call: Callable[[RealmClient], T]
    ) -> tuple[dict[str, T], dict[str, str]]:
        """``call`` on every realm in parallel: (results, problems) by URL."""
        chosen = list(realms)
        results: dict[str, T] = {}
        problems: dict[str, str] = {}
        if not chosen:
            return results, problems
        with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
            futures = {pool.submit(call, realm): realm for realm in chosen}
            for future, realm in futures.items():
                try:
                    results[realm.url] = future.result()
                except RealmFailure as exc:
                    problems[realm.url] = _why(exc)
                except Exception as exc:  # whatever one realm's answer broke: its failure
                    problems[realm.url] = _one_line(f"{type(exc).__name__}: {exc}")
        return results, problems

    # --- phase 1 ---------------------------------------------------------------------

    def survey(self) -> Survey:
        """Ask every realm what it holds (uncounted) and find the descriptor that t of them
        return byte-identically and that names exactly the pinned realms."""
        answers, problems = self.each(self.realms, RealmClient.registration)
        survey = Survey(answers, problems)
        pinned = [realm.realm_id for realm in self.realms]
        if sum(1 for realm_id in pinned if realm_id is not None) < 2:
            return survey  # no descriptor is trusted before a quorum can be pinned
        groups: dict[bytes, list[RealmClient]] = {}
        for realm in self.realms:
            answer = answers.get(realm.url)
            if realm.realm_id is None:
                continue  # an answer from a realm whose identity is unknown counts for nothing
            if answer is not None and answer.descriptor is not None:
                groups.setdefault(answer.descriptor.hash, []).append(realm)
        for members in groups.values():
            answer = answers[members[0].url]
            d = answer.descriptor
            assert d is not None
            if (
                len(members) >= d.threshold
                and protocol.names_exactly(d, pinned)
                and d.user_id == self.user_id
            ):
                survey.descriptor, survey.descriptor_bytes = d, answer.descriptor_bytes
                survey.agreeing = members
        return survey

    def agree(self, expected_version: bytes | None = None) -> Survey:
        """Phase 1, required: the survey with its agreed descriptor, or RealmsDisagree
        naming the realms that did not answer or disagreed — before any attempt is spent.
        ``expected_version``: the registration this device's key slot belongs to."""
        survey = self.survey()
        d = survey.descriptor
        if d is not None and expected_version is not None and d.version != expected_version:
            d = None
        if d is None:
            problems = dict(survey.problems)
            unpinned = [r.url for r in self.realms if r.realm_id is None]
            for url in unpinned:
                problems[url] = "not pinned (no realm id in the settings)"
            for url, answer in survey.answers.items():
                if url not in problems:
                    problems[url] = _describe(answer, expected_version)
            raise RealmsDisagree(
                "no descriptor is returned identically by enough of the pinned realms; "
                "nothing was attempted",
                problems,
            )
        problems = dict(survey.problems)
        members = {realm.url for realm in survey.agreeing}
        for url, answer in survey.answers.items():
            if url not in members:
                problems[url] = _describe(answer, None)
        survey.problems = problems
        return survey

    def attempts_left(self, survey: Survey | None = None) -> AttemptsLeft:
        """The guesses still possible, from the realms' counts; a realm that did not answer
        (or holds another registration) counts 0 and is named."""
        survey = survey or self.survey()
        members = {realm.url for realm in survey.agreeing}
        per_realm: dict[str, int] = {}
        unreachable: dict[str, str] = {}
        for realm in self.realms:
            answer = survey.answers.get(realm.url)
            if realm.url in members and answer is not None:
                per_realm[realm.url] = answer.attempts_left
            else:
                per_realm[realm.url] = 0
                unreachable[realm.url] = survey.problems.get(realm.url) or (
                    _describe(answer, None) if answer else "no answer"
                )
        if survey.descriptor is None:
            return AttemptsLeft(0, per_realm, unreachable)
        guesses = bounds.guesses_left(list(per_realm.values()), survey.descriptor.threshold)
        return AttemptsLeft(guesses, per_realm, unreachable)

    def erased(self, threshold: int, survey: Survey | None = None) -> bool:
        """Erased for good: n-t+1 realms say erased (or hold nothing), so no t realms can
        ever evaluate again. ``threshold``: the registration's t (from the settings when no
        descriptor is agreed any more)."""
        survey = survey or self.survey()
        t = survey.descriptor.threshold if survey.descriptor else threshold
        gone = sum(1 for a in survey.answers.values() if a.state in ("erased", "none"))
        return gone >= len(self.realms) - t + 1

    # --- phases 2 and 3 --------------------------------------------------------------

    def recover(
        self,
        password: bytes,
        *,
        earlier_attempts: Mapping[bytes, Sequence[bytes]] | None = None,
        on_attempt: Callable[[bytes, bytes], None] | None = None,
        expected_version: bytes | None = None,
    ) -> Recovered:
        """The slot secret behind ``password``. ``earlier_attempts``: realm id -> attempt
        ids of this device's earlier wrong tries (forgiven on success); ``on_attempt(realm
        id, attempt id)`` is called as soon as a realm has counted an attempt, so the caller
        can remember it. A wrong password raises RealmWrongPassword; when it leaves fewer
        than t realms with attempts, the registration is deleted everywhere first (no t
        realms can evaluate it again)."""
        survey = self.agree(expected_version)
        d = survey.descriptor
        assert d is not None
        recovery = protocol.begin_recovery(password, d, test_stretching=self._stretching)
        evaluations, made, reported, problems = self._evaluate(survey, recovery, on_attempt)
        key = protocol.unlock_key(recovery, evaluations)
        if key is None:
            left = {
                realm.url: reported.get(realm.url, survey.answers[realm.url].attempts_left)
                for realm in survey.agreeing
            }
            counts = [left.get(realm.url, 0) for realm in self.realms]
            guesses = bounds.guesses_left(counts, d.threshold)
            # Only realms known to be spent count as spent: one that did not answer may
            # still have attempts, and deleting early would throw away the password path.
            spent = sum(1 for count in left.values() if count == 0)
            if len(self.realms) - spent < d.threshold:
                report = self.delete(d.version)
                raise RealmWrongPassword(
                    403,
                    "no_attempts_left",
                    f"wrong password, and fewer than {d.threshold} realms have attempts left: "
                    f"the registration was deleted at {len(report.confirmed)} of "
                    f"{len(self.realms)} realms",
                    0,
                )
            raise RealmWrongPassword(
                403,
                "wrong_password",
                f"wrong password; {guesses} more attempts possible at these realms",
                guesses,
            )
        attempt_ids: dict[bytes, list[bytes]] = {
            realm_id: list(ids) for realm_id, ids in (earlier_attempts or {}).items()
        }
        for realm_id, attempt_id in made.items():
            attempt_ids.setdefault(realm_id, []).append(attempt_id)
        secret, unlock_problems, unlocked = self._unlock(survey, recovery, key, attempt_ids)
        return Recovered(secret, d, {**problems, **unlock_problems}, reported, unlocked)

    def _evaluate(
        self,
        survey: Survey,
        recovery: protocol.Recovery,
        on_attempt: Callable[[bytes, bytes], None] | None,
    ) -> tuple[dict[int, bytes], dict[bytes, bytes], dict[str, int], dict[str, str]]:
        """Phase 2: the same B to exactly t realms, most attempts left first; each one that
        fails is named and replaced by the next. Returns (t evaluations by index, attempt
        ids made by realm id, attempts left reported by URL, problems by URL)."""
        d = survey.descriptor
        assert d is not None
        blinded = recovery.blinded_element
        queue = sorted(
            survey.agreeing,
            key=lambda r: (-survey.answers[r.url].attempts_left, d.entry(r.pinned_id).index),
        )
        good: dict[int, bytes] = {}
        made: dict[bytes, bytes] = {}
        reported: dict[str, int] = {}
        problems: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=len(queue) or 1) as pool:
            pending: dict[Future[Evaluation], RealmClient] = {}

            def top_up() -> None:
                while queue and len(good) + len(pending) < d.threshold:
                    realm = queue.pop(0)
                    pending[pool.submit(realm.evaluate, d.version, blinded)] = realm

            top_up()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    realm = pending.pop(future)
                    try:
                        answer = future.result()
                    except RealmFailure as exc:
                        problems[realm.url] = _why(exc)
                        continue
                    except Exception as exc:  # whatever one realm's answer broke
                        problems[realm.url] = _one_line(f"{type(exc).__name__}: {exc}")
                        continue
                    made[realm.pinned_id] = answer.attempt_id
                    reported[realm.url] = min(answer.attempts_left, d.allowed_guesses)
                    if on_attempt is not None:
                        on_attempt(realm.pinned_id, answer.attempt_id)
                    try:
                        protocol.check_evaluation(
                            d, realm.pinned_id, blinded, answer.evaluated_element, answer.proof
                        )
                    except RealmProtocolError as exc:
                        problems[realm.url] = exc.reason
                        continue
                    good[d.entry(realm.pinned_id).index] = answer.evaluated_element
                top_up()
        if len(good) < d.threshold:
            raise TooFewRealms(
                f"only {len(good)} of the {d.threshold} realms needed gave a valid evaluation",
                problems,
            )
        return good, made, reported, problems

    def _unlock(
        self,
        survey: Survey,
        recovery: protocol.Recovery,
        key: protocol.UnlockKey,
        attempt_ids: Mapping[bytes, Sequence[bytes]],
    ) -> tuple[bytes, dict[str, str], list[str]]:
        """Phase 3 at every realm of the registration that answers (so that every counter
        is settled); t shares that pass their MACs open the ciphertext."""
        d = survey.descriptor
        assert d is not None

        def unlock(realm: RealmClient) -> ShareAnswer:
            tag = protocol.tag(key, d, realm.pinned_id)
            answer = realm.unlock(d.version, tag, attempt_ids.get(realm.pinned_id, ()))
            try:
                protocol.check_share(
                    key,
                    d,
                    realm.pinned_id,
                    answer.encryption_share,
                    answer.share_mac,
                    answer.ciphertext,
                )
            except RealmProtocolError as exc:
                raise RealmMisbehaved(realm.url, exc.reason) from None
            return answer

        named = {entry.realm_id for entry in d.realms}
        ours = [realm for realm in self.realms if realm.realm_id in named]
        answers, problems = self.each(ours, unlock)
        by_ciphertext: dict[bytes, dict[int, bytes]] = {}
        for realm in ours:
            if realm.url in answers:
                answer = answers[realm.url]
                by_ciphertext.setdefault(answer.ciphertext, {})[d.entry(realm.pinned_id).index] = (
                    answer.encryption_share
                )
        for ciphertext, shares in by_ciphertext.items():
            if len(shares) >= d.threshold:
                chosen = dict(sorted(shares.items())[: d.threshold])
                secret = protocol.open_secret(recovery, chosen, ciphertext, d)
                return secret, problems, list(answers)
        raise TooFewRealms(f"fewer than {d.threshold} realms released a valid share", problems)

    # --- registration and deletion ---------------------------------------------------

    def register(
        self,
        password: bytes,
        slot_secret: bytes,
        threshold: int,
        *,
        allowed_guesses: int | None = None,
        allow_degraded: bool = False,
    ) -> RegistrationOutcome:
        """Register at all n realms, replacing what phase 1 saw at each (compare-and-swap).
        All-or-nothing: if any realm refuses or cannot be reached, the new version is
        deleted where it landed and RealmRegistrationFailed names who failed — unless
        ``allow_degraded`` and at least t accepted: then the missed realms' payloads come
        back in ``pending``. Before removing an old key slot, read the registration back
        with ``agree(outcome.descriptor.version)``."""
        check_threshold(threshold, len(self.realms))
        newly_pinned: dict[str, bytes] = {}
        unpinned = [realm for realm in self.realms if realm.realm_id is None]
        pinned, problems = self.each(unpinned, RealmClient.pin)
        if problems:
            raise RealmRegistrationFailed(
                "cannot learn every realm's id; nothing was registered", problems, {}
            )
        newly_pinned.update(pinned)
        allowed = allowed_guesses or bounds.default_allowed_guesses(threshold, len(self.realms))
        # Key shares go only to a realm that says it is the one pinned (a realm redeployed at
        # the URL, with a new id, gets nothing). The realm id is public: the URL's TLS
        # certificate is what authenticates the realm itself.
        already = [realm for realm in self.realms if realm.url not in newly_pinned]
        _confirmed, not_confirmed = self.each(already, RealmClient.info)
        survey = self.survey()
        # A realm that takes the new registration drops the one it held, and deleting the
        # new one again cannot bring that back: so nothing is sent unless every realm (or,
        # degraded, at least t) answered phase 1 just now.
        survey.problems = {**survey.problems, **not_confirmed}
        answered = len(self.realms) - len(survey.problems)
        if survey.problems and (not allow_degraded or answered < threshold):
            raise RealmRegistrationFailed(
                f"{answered} of {len(self.realms)} realms answered"
                + ("" if allow_degraded else " (all are needed without --allow-degraded)")
                + "; nothing was registered, the current registration is untouched",
                dict(survey.problems),
                {},
            )
        registration = protocol.register(
            password,
            self.user_id,
            slot_secret,
            [realm.pinned_id for realm in self.realms],
            threshold,
            allowed,
            test_stretching=self._stretching,
        )
        d = registration.descriptor
        raw = d.encode()
        reachable = [realm for realm in self.realms if realm.url not in survey.problems]
        problems = dict(survey.problems)

        def send(realm: RealmClient) -> None:
            realm.register(
                raw, registration.payload(realm.pinned_id), survey.expected_version(realm.url)
            )

        accepted, refused = self.each(reachable, send)
        problems.update(refused)
        if not problems:
            return RegistrationOutcome(d, list(accepted), [], {}, newly_pinned)
        if allow_degraded and len(accepted) >= threshold:
            pending = [
                PendingDelivery(
                    realm.url,
                    realm.pinned_id,
                    raw,
                    registration.payload(realm.pinned_id),
                    survey.expected_version(realm.url),
                )
                for realm in self.realms
                if realm.url not in accepted
            ]
            return RegistrationOutcome(d, list(accepted), pending, problems, newly_pinned)
        report = self.delete(d.version, [r for r in self.realms if r.url in accepted])
        raise RealmRegistrationFailed(
            f"registered at {len(accepted)} of {len(self.realms)} realms, which is not all"
            + (f" (nor {threshold} with --allow-degraded)" if allow_degraded else "")
            + "; the new registration was deleted again where it landed, and there the "
            "previous one is gone: set the password again when every realm answers",
            problems,
            report.failed,
        )

    def deliver(self, pending: PendingDelivery) -> None:
        """Deliver a degraded registration's payload to the realm that missed it."""
        for realm in self.realms:
            if realm.url == pending.url:
                if realm.info() != pending.realm_id:  # the pin, checked before shares go
                    raise RealmMisbehaved(realm.url, "it is not the realm the payload is for")
                held = realm.registration()
                version = decode(pending.descriptor_bytes).version
                if held.descriptor is not None and held.descriptor.version == version:
                    return  # delivered already (an answer lost on the way)
                realm.register(pending.descriptor_bytes, pending.payload, pending.expected_version)
                return
        raise ValueError(f"{pending.url} is not one of these realms")

    def delete(
        self,
        version: bytes,
        realms: Sequence[RealmClient] | None = None,
        tries: int = 3,
        pause: float = 0.5,
    ) -> DeletionReport:
        """Delete registration ``version`` at ``realms`` (default: all), trying each realm
        up to ``tries`` times; reports who confirmed and who could not be reached."""
        left = list(self.realms if realms is None else realms)
        confirmed: list[str] = []
        failed: dict[str, str] = {}
        for attempt in range(tries):
            if attempt:
                time.sleep(pause)
            done, failed = self.each(left, lambda realm: realm.delete(version))
            confirmed += list(done)
            left = [realm for realm in left if realm.url in failed]
            if not left:
                break
        return DeletionReport(confirmed, failed)


def _why(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("realm "):  # the URL (or id) is named already by the caller's key
        text = text.split(": ", 1)[-1]
    return _one_line(text)


def _describe(answer: RealmState | None, expected_version: bytes | None) -> str:
    if answer is None:
        return "no answer"
    if answer.descriptor is None:
        return f"holds no registration ({answer.state})"
    if expected_version is not None and answer.descriptor.version != expected_version:
        return "holds another registration than this device's key slot"
    return "returned a descriptor that not enough realms agree on"
