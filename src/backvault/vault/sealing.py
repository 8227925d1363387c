"""Sealing at rest: every secret the vault stores is encrypted under a key that never
leaves an HSM (PKCS#11), or — the embedded default — a sealing-key file.

Sealed formats (AES-256-GCM; the purpose names what is sealed and for whom, e.g.
``record:alice:3``, so a blob copied into another row or field does not open):

- format 2, written today: ``0x02 || key version (4 bytes, big-endian) || nonce (12) ||
  ciphertext || tag (16)``, associated data ``the 5 header bytes || purpose``;
- format 1, written before key versions existed and still read:
  ``0x01 || nonce (12) || ciphertext || tag``, associated data ``purpose``, key version 1.

Key versions: key files ``sealing.key`` (version 1), ``sealing.key.v2``, …; HSM keys
labelled ``LABEL-v1``, ``LABEL-v2``, … (the bare ``LABEL`` of older deployments is version
1). A label or a file name proves nothing (anyone with the HSM PIN for a moment, or write
access to the key folder, can add one), so the vault records every version it makes — with
the key's check value, which only the key's holder can compute — in its database
(key_versions.py), and a sealer uses only the keys whose version is recorded and whose
check value matches — and whose record is vouched for by the key of a lower version it
already trusts (VOUCH_CONTEXT), since a record proves nothing either to someone who can
write to the database; it seals under the highest of them, and never under a lower one
than it sealed under before or than stored values name (it stops sealing instead: the
newest version's record or key went missing). ``backvault vault
rotate-sealing-key`` records a new version and re-seals every sealed column
(sealed_columns.py); a serving node picks the new version up at its next sweep, or at once
when it meets a value sealed under it.

Nonce bound: with random 96-bit nonces one key may seal at most 2^32 values (NIST SP
800-38D, 8.3). Seals are counted per key version (housekeeping.py); rotate well before.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backvault.vault.metrics import (
    SEALING_KEY_CHANGES,
    SEALING_KEY_CURRENT_INFO,
    SEALING_KEY_CURRENT_VERSION,
    SEALING_KEYS_IGNORED,
    SEALING_OPERATIONS,
)

log = logging.getLogger("backvault.vault.sealing")

FORMAT_UNVERSIONED = 1
FORMAT_VERSIONED = 2
HEADER_SIZE = 5  # format byte + key version
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
# NIST SP 800-38D 8.3: random 96-bit nonces keep the collision chance below 2^-32 only up
# to 2^32 encryptions under one key. The vault warns at half of it.
SEALS_PER_KEY_LIMIT = 2**32
SEALS_PER_KEY_WARNING = 2**31
MAX_KEY_VERSION = 2**32 - 1

# A key's check value: SHA-256 of the AES-256-GCM encryption, under the key, of one zero
# block with a fixed nonce and associated data. Only the key's holder can compute it
# (through the HSM, or with the key file), and nobody can make a key with a given one, so
# a recorded check value tells the vault's own key from one planted under the same label
# or file name. The same input always gives the same output, so computing it again reveals
# nothing new; hashing keeps even that one block's ciphertext and tag out of the database.
# (A seal's random nonce equals the fixed one with probability 2^-96.)
CHECK_VALUE_NONCE = bytes(NONCE_SIZE)
CHECK_VALUE_ASSOCIATED_DATA = b"backvault sealing-key check value v1"
CHECK_VALUE_BLOCK = bytes(16)

# A version's record is vouched for by the key of a lower version the vault already
# trusts: the vouch is a value sealed (format 2, naming the vouching version) under that
# key, of nothing, with associated data naming this context, the version and its check
# value. Only the holder of the lower key makes one, so a record written into the database
# by someone who cannot use the vault's keys — even with the check value of a key they
# planted — is not vouched for, and its key is ignored. The first version of a database
# (and those adopted from before records existed) vouches for itself: that marks the
# database as chained, and a self-vouch never makes any other version trusted.
VOUCH_CONTEXT = b"backvault sealing-key version vouch v1\0"


def vouch_purpose(version: int, check_value: bytes) -> bytes:
    """The associated data of the vouch for ``version`` with ``check_value``."""
    return VOUCH_CONTEXT + version.to_bytes(8, "big") + check_value


# Why a key in the store is not used (the label values of the ignored-keys metric).
IGNORED_UNRECORDED = "unrecorded"  # its version is not one the vault recorded
IGNORED_CHECK_VALUE = "check_value"  # its version is recorded, with another key's check value
IGNORED_DESTROYED = "destroyed"  # its version was destroyed
IGNORED_UNFINISHED = "unfinished"  # reserved by a rotation that never recorded its key
# recorded with its check value, but not vouched for by a version the vault trusts
IGNORED_UNVOUCHED = "unvouched"
IGNORED_REASONS = (
    IGNORED_UNRECORDED,
    IGNORED_CHECK_VALUE,
    IGNORED_DESTROYED,
    IGNORED_UNFINISHED,
    IGNORED_UNVOUCHED,
)
# A rotation makes its key moments after reserving the version: until then (and for this
# long) a key of a reserved version is skipped quietly, not reported as unfinished.
RESERVATION_GRACE = 600.0


def reservation_is_fresh(record: RecordedVersion, now: float) -> bool:
    """A reservation made moments ago by a rotation that is making its key now. Any other
    (older, or dated in the future by whoever wrote it) is unfinished: reported, never
    used, and no obstacle to the next rotation."""
    return record.check_value is None and abs(now - record.recorded_at) <= RESERVATION_GRACE


class SealingError(Exception):
    """The sealing key is unavailable or unsafe, or a sealed blob does not open."""


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses — a label or
    file name planted with one must not stop the sealer."""
    return text.isascii() and text.isdigit()


def short_check_value(check_value: bytes) -> str:
    """How logs, metrics and listings show a check value: its first 8 bytes in hex."""
    return check_value[:8].hex()


@dataclass(frozen=True)
class RecordedVersion:
    """A key version as the vault recorded it."""

    version: int
    check_value: bytes | None  # None: reserved by a rotation that has not made its key yet
    origin: str  # "created", "first start" or "adopted"
    recorded_at: float
    destroyed_at: float | None = None
    # sealed under the key of the version that vouches for this one (VOUCH_CONTEXT)
    vouch: bytes | None = None

    @property
    def usable(self) -> bool:
        return self.check_value is not None and self.destroyed_at is None

    @property
    def voucher(self) -> int | None:
        """The version whose key made the vouch (unverified), or None."""
        if self.vouch is None:
            return None
        try:
            return key_version_of(self.vouch)
        except SealingError:
            return None


@dataclass(frozen=True)
class IgnoredKey:
    """A key in the key store that the sealer does not use, and why."""

    version: int
    where: str  # the HSM key's label, or the key file
    reason: str  # one of IGNORED_REASONS
    check_value: bytes | None = None  # when computed

    def describe(self) -> str:
        why = {
            IGNORED_UNRECORDED: "this vault never made that version (it is not recorded in "
            "its database)",
            IGNORED_CHECK_VALUE: "it is not the key this vault made for that version (its "
            "check value differs from the recorded one)",
            IGNORED_DESTROYED: "that version was destroyed",
            IGNORED_UNFINISHED: "a rotation reserved that version but never recorded its key",
            IGNORED_UNVOUCHED: "its record in the database is not vouched for by a key "
            "version this vault trusts (a record written into the database is not enough)",
        }[self.reason]
        check = f" (check value {short_check_value(self.check_value)})" if self.check_value else ""
        return f"ignoring the sealing key {self.where} for key version {self.version}{check}: {why}"


class KeyStore(Protocol):
    """What a record keeper needs from a sealer to record its first versions."""

    description: str
    no_key_message: str

    def stored_check_values(self) -> dict[int, list[bytes]]: ...

    def opening_check_values(self, sealed: bytes, purpose: bytes) -> list[bytes]: ...

    def make_key_version(self, version: int, record: Callable[[bytes], None]) -> bytes: ...

    def vouch(
        self, version: int, check_value: bytes, voucher: int, voucher_check_value: bytes
    ) -> bytes: ...


class VersionRecords(Protocol):
    """Where the key versions the vault made are recorded (its database: key_versions.py;
    in memory for a sealer used on its own)."""

    def load(self) -> dict[int, RecordedVersion]:
        """Every version ever recorded, destroyed and reserved ones included."""
        ...

    def reserve(self, choose: Callable[[Mapping[int, RecordedVersion]], int]) -> int:
        """Record, atomically, the version ``choose`` picks from the recorded ones, as
        reserved (no check value yet)."""
        ...

    def confirm(self, version: int, check_value: bytes, vouch: bytes) -> None:
        """Record the check value of the key made for a reserved version, and the vouch
        for it made with the current version's key."""
        ...

    def in_use(self) -> set[int]:
        """The key versions stored values name (their headers; nothing is opened)."""
        ...

    def mark_destroyed(self, version: int) -> None: ...

    def prepare(self, store: KeyStore, create: bool) -> bool:
        """Before first use: when nothing is recorded yet, record the versions the vault
        already uses (or make version 1 when ``create`` and the store is empty). Returns
        whether it made a key."""
        ...


class PinnedVersions:
    """Records kept in memory, for a sealer used without the vault's database (tests,
    tools): the versions in the key store when the sealer starts are taken as recorded,
    and so are those this sealer makes. Share one between sealers that must see each
    other's new versions."""

    def __init__(self) -> None:
        self._records: dict[int, RecordedVersion] = {}
        self._lock = threading.RLock()

    def load(self) -> dict[int, RecordedVersion]:
        with self._lock:
            return dict(self._records)

    def reserve(self, choose: Callable[[Mapping[int, RecordedVersion]], int]) -> int:
        with self._lock:
            version = choose(dict(self._records))
            self._records[version] = RecordedVersion(version, None, "created", time.time())
            return version

    def confirm(self, version: int, check_value: bytes, vouch: bytes) -> None:
        with self._lock:
            reserved = self._records[version]
            self._records[version] = RecordedVersion(
                version, check_value, reserved.origin, reserved.recorded_at, vouch=vouch
            )

    def in_use(self) -> set[int]:
        return set()

    def mark_destroyed(self, version: int) -> None:
        with self._lock:
            record = self._records[version]
            self._records[version] = RecordedVersion(
                version,
                record.check_value,
                record.origin,
                record.recorded_at,
                time.time(),
                record.vouch,
            )

    def prepare(self, store: KeyStore, create: bool) -> bool:
        with self._lock:
            if self._records:
                return False
            stored = store.stored_check_values()
            now = time.time()
            if not stored:
                if not create:
                    raise SealingError(store.no_key_message)

                def record(check_value: bytes) -> None:
                    vouch = store.vouch(1, check_value, 1, check_value)
                    self._records[1] = RecordedVersion(1, check_value, "created", now, vouch=vouch)

                store.make_key_version(1, record)
                return True
            previous: tuple[int, bytes] | None = None
            for version, check_values in sorted(stored.items()):
                if len(set(check_values)) > 1:
                    raise SealingError(
                        f"{store.description} holds {len(check_values)} different keys for "
                        f"sealing key version {version}; destroy the ones you did not make "
                        "with backvault"
                    )
                check_value = check_values[0]
                voucher = previous or (version, check_value)
                self._records[version] = RecordedVersion(
                    version,
                    check_value,
                    "first start",
                    now,
                    vouch=store.vouch(version, check_value, *voucher),
                )
                previous = (version, check_value)
            return False


class Sealer(Protocol):
    description: str

    @property
    def current_version(self) -> int: ...

    def versions(self) -> list[int]: ...

    def check_value(self, version: int) -> bytes: ...

    def ignored_keys(self) -> list[IgnoredKey]: ...

    def unfinished_versions(self) -> list[int]: ...

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes: ...

    def open(self, sealed: bytes, purpose: bytes) -> bytes: ...

    def refresh(self) -> None: ...

    def check(self) -> None: ...

    def create_version(self) -> int: ...

    def destroy_version(self, version: int) -> None: ...

    def take_seal_counts(self) -> dict[int, int]: ...

    def close(self) -> None: ...


def sealed_header(key_version: int) -> bytes:
    """The first bytes of every value sealed under ``key_version`` (format 2)."""
    return bytes([FORMAT_VERSIONED]) + key_version.to_bytes(4, "big")


def key_version_of(sealed: bytes) -> int:
    """The key version a sealed value names (format 1 values: version 1)."""
    return _parse(sealed)[0]


def _parse(sealed: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(key version, nonce, ciphertext || tag, associated-data prefix)."""
    if len(sealed) >= 1 + NONCE_SIZE + TAG_SIZE and sealed[0] == FORMAT_UNVERSIONED:
        return 1, sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :], b""
    if len(sealed) >= HEADER_SIZE + NONCE_SIZE + TAG_SIZE and sealed[0] == FORMAT_VERSIONED:
        header = sealed[:HEADER_SIZE]
        version = int.from_bytes(header[1:], "big")
        if version >= 1:
            body = sealed[HEADER_SIZE + NONCE_SIZE :]
            return version, sealed[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE], body, header
    raise SealingError("sealed data is malformed")


class _VersionedSealer:
    """What every sealer shares: the sealed format; the key versions it uses (those the
    records name, with a matching check value; the highest seals); refreshing them;
    counting seals per version; logs and metrics."""

    description: str
    no_key_message: str

    def __init__(self, records: VersionRecords | None) -> None:
        self._records: VersionRecords = records if records is not None else PinnedVersions()
        self._keys: dict[int, Any] = {}
        self._check_values: dict[int, bytes] = {}
        self._ignored: list[IgnoredKey] = []
        self._reported: set[IgnoredKey] = set()
        self._refresh_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._seal_counts: dict[int, int] = {}
        # The versions this sealer trusts (vouched for by a chain from its anchor): kept
        # across refreshes, so a running node never needs the database to tell it again.
        self._trusted: set[int] = set()
        self._in_use: set[int] = set()
        self._unfinished: list[int] = []
        self._unfinished_reported: set[int] = set()
        # The lowest version this sealer may seal under: the highest it sealed under (or
        # saw as current), or that stored values name. A current version below it means
        # the newest version's record or key went missing: sealing stops (``_blocked``)
        # rather than fall back to an older version the operator may be destroying.
        self._floor = 0
        self._blocked: str | None = None
        self.created = False

    def _start(self, create: bool) -> None:
        self.created = self._records.prepare(self, create)
        self._in_use = self._records.in_use()
        self._floor = max(self._in_use, default=0)
        self.refresh()

    # --- what a key store provides --------------------------------------------------------

    def _stored(self) -> dict[int, list[Any]]:
        """Every key in the store that claims a version (by label or file name), unchecked."""
        raise NotImplementedError

    def _where(self, candidate: Any) -> str:
        raise NotImplementedError

    def _usable(self, version: int, candidate: Any) -> Any:
        """The key to encrypt with; a SealingError when the store holds it unsafely."""
        raise NotImplementedError

    def _encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def _create_key(self, version: int) -> Any:
        raise NotImplementedError

    def _destroy_key(self, version: int, key: Any) -> None:
        raise NotImplementedError

    def _check_attributes(self, version: int, key: Any, strict: bool) -> None:
        """Refuse (``strict``: the key that seals) or warn about an unsafe key."""

    # --- check values and first versions (for the records) -------------------------------

    def _check_value_of(self, key: Any) -> bytes:
        encrypted = self._encrypt(
            key, CHECK_VALUE_NONCE, CHECK_VALUE_BLOCK, CHECK_VALUE_ASSOCIATED_DATA
        )
        return hashlib.sha256(CHECK_VALUE_ASSOCIATED_DATA + b"\0" + encrypted).digest()

    def stored_check_values(self) -> dict[int, list[bytes]]:
        """The check value of every key in the store, by the version it claims."""
        return {
            version: [self._check_value_of(self._usable(version, c)) for c in candidates]
            for version, candidates in self._stored().items()
        }

    def opening_check_values(self, sealed: bytes, purpose: bytes) -> list[bytes]:
        """The check values of the keys in the store that open ``sealed``: which key an
        older vault really sealed under."""
        version, nonce, body, aad_prefix = _parse(sealed)
        found = []
        for candidate in self._stored().get(version, []):
            key = self._usable(version, candidate)
            try:
                self._decrypt(key, nonce, body, aad_prefix + purpose)
            except SealingError:
                continue
            found.append(self._check_value_of(key))
        return found

    def make_key_version(self, version: int, record: Callable[[bytes], None]) -> bytes:
        """Make the key for ``version``, compute its check value and ``record`` it; on any
        failure, destroy the key again (unrecorded, it would only ever be ignored).
        Returns the check value."""
        key = self._create_key(version)
        try:
            check_value = self._check_value_of(key)
            record(check_value)
        except BaseException:
            with contextlib.suppress(Exception):
                self._destroy_key(version, key)
            raise
        return check_value

    def vouch(
        self, version: int, check_value: bytes, voucher: int, voucher_check_value: bytes
    ) -> bytes:
        """The vouch for ``version`` (with ``check_value``), made with the key in the
        store of version ``voucher`` whose check value is ``voucher_check_value``."""
        for candidate in self._stored().get(voucher, []):
            key = self._usable(voucher, candidate)
            if hmac.compare_digest(self._check_value_of(key), voucher_check_value):
                return self._make_vouch(voucher, key, version, check_value)
        raise SealingError(
            f"no key in {self.description} has the check value recorded for sealing key "
            f"version {voucher}"
        )

    def _make_vouch(self, voucher: int, key: Any, version: int, check_value: bytes) -> bytes:
        header = sealed_header(voucher)
        nonce = secrets.token_bytes(NONCE_SIZE)
        # One GCM nonce per new version: not counted with the seals (whose latest time
        # tells whether a node still seals under a version about to be destroyed).
        body = self._encrypt(key, nonce, b"", header + vouch_purpose(version, check_value))
        return header + nonce + body

    def _vouched(
        self,
        record: RecordedVersion,
        check_value: bytes,
        keys: Mapping[int, tuple[Any, bytes, str]],
        trusted: set[int],
    ) -> bool:
        """Whether ``record`` is vouched for by a lower version in ``trusted``."""
        voucher = record.voucher
        if record.vouch is None or voucher is None:
            return False
        if voucher >= record.version or voucher not in trusted or voucher not in keys:
            return False  # by itself, by a higher version, or by one not trusted
        _version, nonce, body, header = _parse(record.vouch)
        try:
            self._decrypt(
                keys[voucher][0], nonce, body, header + vouch_purpose(record.version, check_value)
            )
        except SealingError:
            return False
        return True

    def _trust(
        self,
        records: Mapping[int, RecordedVersion],
        keys: Mapping[int, tuple[Any, bytes, str]],
    ) -> set[int]:
        """The versions to use among ``keys`` (recorded, with the recorded check value):
        those a chain of vouches links to the anchor — the versions this sealer trusted
        before; at its first look, the lowest version stored values are sealed under
        (their sealed rows are what a node must open), or on a database holding none yet
        the lowest recorded version (trust on first use, as `init-hsm` prints its check
        value). Lower versions count too when a chain from the lowest one reaches the
        anchor."""
        if not keys:
            return set()

        def chained(start: set[int]) -> set[int]:
            trusted = set(start)
            for version in sorted(keys):  # a voucher is lower: it was decided before
                if version not in trusted and self._vouched(
                    records[version], keys[version][1], keys, trusted
                ):
                    trusted.add(version)
            return trusted

        if self._trusted:
            # Only what a chain links to the versions trusted before, even when none of them
            # is usable any more (its record marked destroyed or given another check value):
            # choosing a new anchor then would trust whatever record is lowest — a planted
            # one. Nothing trusted is left: nothing is used (refresh says so).
            return chained({version for version in self._trusted if version in keys})
        # A recorded version stored values are sealed under that is not usable here (its
        # record marked destroyed or given another check value — the vault destroys no
        # version values still use — or its key missing): nothing above it anchors, or
        # marking version 1 destroyed would make the lowest recorded version above it — a
        # planted one, vouched for by nobody — the anchor. On a database holding no sealed
        # value, only the lowest recorded version not destroyed anchors.
        if self._in_use:
            limit = min((v for v in self._in_use if v in records and v not in keys), default=None)
            if limit is not None:
                keys = {version: key for version, key in keys.items() if version < limit}
                if not keys:
                    return set()
            in_use = sorted(version for version in self._in_use if version in keys)
            anchor = in_use[0] if in_use else min(keys)
        else:
            recorded = [v for v, record in records.items() if record.usable]
            anchor = min(recorded, default=min(keys))
            if anchor not in keys:
                return set()
        trusted = chained({anchor})
        lowest = min(keys)
        if lowest < anchor:
            below = chained({lowest})
            if anchor in below:
                trusted |= below
        return trusted

    # --- shared -------------------------------------------------------------------------

    @property
    def current_version(self) -> int:
        return max(self._keys)

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def check_value(self, version: int) -> bytes:
        return self._check_values[version]

    def ignored_keys(self) -> list[IgnoredKey]:
        return list(self._ignored)

    def unfinished_versions(self) -> list[int]:
        """Versions a rotation reserved long ago and never recorded a key for."""
        return list(self._unfinished)

    def _select(
        self, records: Mapping[int, RecordedVersion]
    ) -> tuple[dict[int, tuple[Any, bytes, str]], list[IgnoredKey]]:
        """The keys to use, with their check values and where they are — for a recorded,
        live version, the key whose check value is the recorded one — and the keys to
        ignore."""
        keys: dict[int, tuple[Any, bytes, str]] = {}
        ignored: list[IgnoredKey] = []
        for version, candidates in sorted(self._stored().items()):
            record = records.get(version)
            for candidate in candidates:
                where = self._where(candidate)
                if record is None:
                    ignored.append(IgnoredKey(version, where, IGNORED_UNRECORDED))
                elif record.destroyed_at is not None:
                    ignored.append(IgnoredKey(version, where, IGNORED_DESTROYED))
                elif record.check_value is None:
                    if not reservation_is_fresh(record, time.time()):
                        ignored.append(IgnoredKey(version, where, IGNORED_UNFINISHED))
                else:
                    key = self._usable(version, candidate)
                    try:
                        check_value: bytes | None = self._check_value_of(key)
                    except SealingError:
                        check_value = None  # a key that cannot even encrypt is not ours
                    if check_value is None or not hmac.compare_digest(
                        check_value, record.check_value
                    ):
                        ignored.append(IgnoredKey(version, where, IGNORED_CHECK_VALUE, check_value))
                    else:
                        # A second object with the recorded check value is a copy of the
                        # same key: either will do.
                        keys.setdefault(version, (key, check_value, where))
        return keys, ignored

    def refresh(self) -> None:
        """Reload the key versions: a rotation may have recorded a new one, or destroyed
        an old one; a key nobody recorded may have appeared (ignored, loudly)."""
        with self._refresh_lock:
            records = self._records.load()
            found, ignored = self._select(records)
            trusted = self._trust(records, found)
            for version, (_key, check_value, where) in sorted(found.items()):
                if version not in trusted:
                    ignored.append(IgnoredKey(version, where, IGNORED_UNVOUCHED, check_value))
            keys = {version: found[version] for version in trusted}
            self._report_unfinished(records)
            self._report_ignored(ignored)
            if not keys:
                raise SealingError(self._nothing_usable(records, ignored))
            current = max(keys)
            for version, (key, _check_value, _where) in keys.items():
                self._check_attributes(version, key, strict=version == current)
            previous = max(self._keys) if self._keys else None
            self._trusted = set(keys)
            self._keys = {version: key for version, (key, _check, _where) in keys.items()}
            self._check_values = {version: check for version, (_key, check, _w) in keys.items()}
            if current < self._floor:
                self._block(current)
                return
            self._floor = current
            if self._blocked is not None:
                self._blocked = None
                log.warning(f"sealing key version {current} is usable again: sealing resumes")
        if previous != current:
            self._report_current(previous, current)

    def _block(self, current: int) -> None:
        message = (
            f"refusing to seal: sealing key version {self._floor} — the newest this node "
            "sealed under, or that stored values are sealed under — is missing (its record "
            "was deleted from the database or marked destroyed, or its key is gone from "
            f"{self.description}); the vault never falls back to an older version "
            f"({current}), which may be about to be destroyed. Restore the record of version "
            f"{self._floor} (from a backup of the database) or its key (see the operator guide)"
        )
        if message != self._blocked:
            log.error(message, extra={"key_version": self._floor, "usable_version": current})
        self._blocked = message

    def _nothing_usable(
        self, records: Mapping[int, RecordedVersion], ignored: list[IgnoredKey]
    ) -> str:
        usable = sorted(version for version, record in records.items() if record.usable)
        if not usable:
            return self.no_key_message
        message = (
            f"no key for the sealing key versions this vault recorded "
            f"({', '.join(map(str, usable))}) is in {self.description}"
        )
        if ignored:
            message += f"; {len(ignored)} other keys there are ignored (see the log)"
        return message

    def _report_unfinished(self, records: Mapping[int, RecordedVersion]) -> None:
        """Versions reserved long ago (or dated in the future) that never got a key's check
        value: a rotation that crashed between reserving and recording, or a row written
        into the database. Logged once each; listed by `vault sealing-keys`."""
        now = time.time()
        unfinished = sorted(
            version
            for version, record in records.items()
            if record.check_value is None
            and record.destroyed_at is None
            and not reservation_is_fresh(record, now)
        )
        for version in unfinished:
            if version not in self._unfinished_reported:
                self._unfinished_reported.add(version)
                recorded = time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(max(0.0, records[version].recorded_at))
                )
                log.warning(
                    f"sealing key version {version} was reserved (at {recorded}) by a "
                    "rotation that never recorded its key — one that crashed, or a row "
                    "written into the database: it is never used and does not hold up the "
                    "next rotation. Run `backvault vault rotate-sealing-key` again if a "
                    "rotation was interrupted; otherwise find out who wrote it",
                    extra={"key_version": version, "reason": IGNORED_UNFINISHED},
                )
        self._unfinished = unfinished

    def _report_ignored(self, ignored: list[IgnoredKey]) -> None:
        self._ignored = ignored
        for reason in IGNORED_REASONS:
            count = sum(1 for key in ignored if key.reason == reason)
            if reason == IGNORED_UNFINISHED:
                # reservations, whether or not a key was made for them
                count = len(
                    set(self._unfinished) | {k.version for k in ignored if k.reason == reason}
                )
            SEALING_KEYS_IGNORED.labels(reason=reason).set(count)
        for key in ignored:
            if key not in self._reported:
                self._reported.add(key)
                advice = (
                    " — someone who could write to the key store may have planted it: find "
                    "out who, then destroy it"
                    if key.reason in (IGNORED_UNRECORDED, IGNORED_CHECK_VALUE, IGNORED_UNVOUCHED)
                    else "; destroy it"
                )
                log.error(
                    key.describe() + advice,
                    extra={"key_version": key.version, "reason": key.reason},
                )

    def _report_current(self, previous: int | None, current: int) -> None:
        check = short_check_value(self._check_values[current])
        SEALING_KEY_CURRENT_VERSION.set(current)
        SEALING_KEY_CURRENT_INFO.clear()
        SEALING_KEY_CURRENT_INFO.labels(key_version=str(current), check_value=check).set(1)
        fields = {"key_version": current, "check_value": check}
        if previous is None:
            log.info(f"sealing under key version {current} (check value {check})", extra=fields)
            return
        SEALING_KEY_CHANGES.inc()
        log.warning(
            f"the current sealing key version changed from {previous} to {current} "
            f"(check value {check})",
            extra=fields,
        )

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        for attempt in range(2):
            if self._blocked is not None:
                SEALING_OPERATIONS.labels(operation="seal", outcome="error").inc()
                raise SealingError(self._blocked)
            keys = self._keys
            version = max(keys)
            header = sealed_header(version)
            nonce = secrets.token_bytes(NONCE_SIZE)
            try:
                body = self._encrypt(keys[version], nonce, plaintext, header + purpose)
            except SealingError:
                # A key destroyed or replaced by another process: look again, once.
                if attempt == 0 and self._reloaded_newer(version):
                    continue
                SEALING_OPERATIONS.labels(operation="seal", outcome="error").inc()
                raise
            SEALING_OPERATIONS.labels(operation="seal", outcome="ok").inc()
            with self._counts_lock:
                self._seal_counts[version] = self._seal_counts.get(version, 0) + 1
            return header + nonce + body
        raise AssertionError("unreachable")  # pragma: no cover

    def _reloaded_newer(self, version: int) -> bool:
        try:
            self.refresh()
        except SealingError:
            return False
        return self.current_version != version

    def open(self, sealed: bytes, purpose: bytes) -> bytes:
        try:
            version, nonce, body, aad_prefix = _parse(sealed)
            key = self._keys.get(version)
            if key is None:
                self.refresh()  # sealed under a version recorded since this node looked
                key = self._keys.get(version)
            if key is None and self._blocked is not None and version >= self._floor:
                raise SealingError(self._blocked)
            if key is None:
                raise SealingError(
                    f"sealed under key version {version}, which this vault does not hold "
                    "(destroyed, not yet copied to this node's key store, or not a version "
                    "this vault recorded)"
                )
            plaintext = self._decrypt(key, nonce, body, aad_prefix + purpose)
        except SealingError:
            SEALING_OPERATIONS.labels(operation="open", outcome="error").inc()
            raise
        SEALING_OPERATIONS.labels(operation="open", outcome="ok").inc()
        return plaintext

    def _next_free_version(self, recorded: Mapping[int, RecordedVersion]) -> int:
        """The version after the highest one this sealer uses (or a rotation reserved
        moments ago) — whatever numbers keys in the store claim or rows in the database
        name, so a planted huge one blocks nothing — skipping every number recorded in any
        state, and those a key in the store already claims (its version could never be
        told apart from ours)."""
        taken = set(self._stored()) | set(recorded)
        now = time.time()
        fresh = [v for v, record in recorded.items() if reservation_is_fresh(record, now)]
        version = max([*self._keys, *fresh], default=0) + 1
        while version in taken:
            version += 1
        if version > MAX_KEY_VERSION:
            raise SealingError("no key version is left")
        return version

    def create_version(self) -> int:
        """Make and record a new key version, which then seals everything new; returns
        its number. The version is reserved in the records before its key exists, so a
        node never meets a key of ours that is not recorded."""
        with self._create_lock:
            self.refresh()
            if self._blocked is not None:
                raise SealingError(self._blocked)
            voucher = self.current_version
            voucher_key = self._keys[voucher]
            version = self._records.reserve(self._next_free_version)
            self.make_key_version(
                version,
                lambda check_value: self._records.confirm(
                    version,
                    check_value,
                    self._make_vouch(voucher, voucher_key, version, check_value),
                ),
            )
            self._trusted.add(version)  # made and vouched for here
        # A token shared with running nodes may fail a call now and then while another
        # process rewrites its files (SoftHSM2): look again a few times.
        for attempt in range(5):
            self.refresh()
            if version in self._keys:
                return version
            time.sleep(0.1 * (attempt + 1))
        raise SealingError(
            f"made sealing key version {version}, but cannot use it yet (see the log); run "
            "`backvault vault rotate-sealing-key --resume` in a moment"
        )

    def destroy_version(self, version: int) -> None:
        """Destroy an old key version for good. Check first that nothing is sealed under
        it (sealed_columns.usage): values still sealed under it will never open again."""
        self.refresh()
        if version == self.current_version:
            raise SealingError(
                f"key version {version} is the current sealing key; rotate first "
                "(`backvault vault rotate-sealing-key`)"
            )
        key = self._keys.get(version)
        if key is None:
            raise SealingError(f"there is no sealing key version {version}")
        self._destroy_key(version, key)
        self._records.mark_destroyed(version)
        self.refresh()

    def take_seal_counts(self) -> dict[int, int]:
        """Seals per key version since the last call (for the durable count)."""
        with self._counts_lock:
            counts, self._seal_counts = self._seal_counts, {}
        return counts

    def check(self) -> None:
        """Cheap readiness, without a seal: sealing is not stopped, and the key is
        reachable."""
        if self._blocked is not None:
            raise SealingError(self._blocked)
        self._check_reachable()

    def _check_reachable(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_private_dir(path: Path) -> str | None:
    """Create ``path`` as 0700, or tighten an existing one; says what it changed."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        return f"{path} was mode {mode:04o}; now {mode & 0o700:04o}"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _FileKey:
    path: Path
    aead: AESGCM = dataclass_field(repr=False)


class FileSealer(_VersionedSealer):
    """AES-256-GCM under 32-byte keys kept in files (mode 0600): ``PATH`` is key version
    1, ``PATH.v2``, ``PATH.v3``, … the later ones.

    For a single self-hosted node. Keep the files off the database's folder and out of its
    backups: whoever holds both can open the records.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        create: bool = True,
        records: VersionRecords | None = None,
    ) -> None:
        super().__init__(records)
        self.path = Path(path)
        self.description = f"sealing-key file {self.path}"
        self.no_key_message = f"the sealing key file {self.path} does not exist"
        self._start(create)

    def version_path(self, version: int) -> Path:
        return self.path if version == 1 else self.path.with_name(f"{self.path.name}.v{version}")

    def _stored(self) -> dict[int, list[Any]]:
        found: dict[int, list[Any]] = {}
        if self.path.exists():
            found[1] = [self.path]
        if self.path.parent.is_dir():
            prefix = self.path.name + ".v"
            for candidate in self.path.parent.iterdir():
                suffix = candidate.name.removeprefix(prefix)
                if candidate.name.startswith(prefix) and _is_number(suffix) and int(suffix) >= 2:
                    found[int(suffix)] = [candidate]
        return found

    def _where(self, candidate: Any) -> str:
        return str(candidate)

    def _usable(self, version: int, candidate: Any) -> Any:
        path = Path(candidate)
        try:
            key = path.read_bytes()
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise SealingError(f"the sealing key file {path} disappeared") from None
        if len(key) != KEY_SIZE:
            raise SealingError(f"the sealing key file {path} must hold exactly 32 bytes")
        if mode & 0o077:
            raise SealingError(f"the sealing key file {path} is readable by others; chmod 600 it")
        return _FileKey(path, AESGCM(key))

    def _write_new_key(self, path: Path) -> None:
        # Written under a temporary name, then linked into place: a reader never sees a
        # half-written key, and two rotations cannot overwrite each other's key.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(KEY_SIZE))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise SealingError(
                    f"{path} already exists (another rotation is running?)"
                ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        _fsync_dir(path.parent)

    def _encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return bytes(key.aead.encrypt(nonce, plaintext, aad))

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        try:
            return bytes(key.aead.decrypt(nonce, body, aad))
        except InvalidTag as exc:
            raise SealingError("sealed data does not open (wrong key, or altered)") from exc

    def _create_key(self, version: int) -> Any:
        path = self.version_path(version)
        make_private_dir(path.parent)
        self._write_new_key(path)
        return self._usable(version, path)

    def _destroy_key(self, version: int, key: Any) -> None:
        # Overwrite before unlinking, so the key's blocks do not simply become free space.
        # (Copy-on-write filesystems, SSD wear levelling and backups may still keep copies:
        # see the operator guide.)
        path = key.path
        with open(path, "r+b") as handle:
            handle.write(bytes(KEY_SIZE))
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()
        _fsync_dir(path.parent)


# Opening a token is retried this many times on a transient GeneralError or NoSuchToken.
_OPEN_ATTEMPTS = 6

# What a sealing key in an HSM must be: usable only to encrypt and decrypt, never to wrap
# or unwrap other keys, sign, verify or derive; its attributes frozen; its value never
# readable or exportable; kept in the token, and usable only in a session logged in with
# the PIN (CKA_PRIVATE: a public key object is usable by anyone who can open a session).
SAFE_KEY_ATTRIBUTES: tuple[tuple[str, bool], ...] = (
    ("ENCRYPT", True),
    ("DECRYPT", True),
    ("WRAP", False),
    ("UNWRAP", False),
    ("SIGN", False),
    ("VERIFY", False),
    ("DERIVE", False),
    ("MODIFIABLE", False),
    ("SENSITIVE", True),
    ("EXTRACTABLE", False),
    ("TOKEN", True),
    ("PRIVATE", True),
)
# Attributes that tell a key's history: false means its value was readable or exportable
# at some point — an imported key (whose value someone typed in) or an unwrapped copy.
# The key that seals must have both true, unless the operator accepts cloned keys
# (pkcs11_accept_cloned_keys: HSM cloning procedures that unwrap a key onto another
# appliance clear them); older versions, which only open, are warned about.
# CKA_LOCAL tells the same of how the key was made: true only for a key generated in the
# token (C_GenerateKey); false for one imported, unwrapped or derived — a key derived
# from a base key someone kept (public, with CKA_DERIVE) can be derived again, readable,
# without the PIN.
HISTORY_ATTRIBUTES = ("ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "LOCAL")
# The one mechanism the vault uses a sealing key with. Keys the vault makes are limited to
# it (CKA_ALLOWED_MECHANISMS, PKCS#11 2.40; the token refuses every other mechanism, such
# as CKM_AES_ECB, which would make the key a raw block-cipher oracle for any PIN holder).
# A current key that allows another mechanism is refused; one that allows every mechanism
# (an empty list: keys made before the vault set it) is warned about.
ALLOWED_MECHANISMS_NAME = "ALLOWED_MECHANISMS"


def pkcs11_attribute_mapper() -> Any:
    """python-pkcs11's attribute mapper, taught CKA_ALLOWED_MECHANISMS (an array of
    CK_MECHANISM_TYPE, which it does not handle by itself)."""
    import struct

    from pkcs11 import Attribute, Mechanism
    from pkcs11.attributes import AttributeMapper

    known = {int(mechanism) for mechanism in Mechanism}
    size = struct.calcsize("L")

    def pack(mechanisms: Any) -> bytes:
        return b"".join(struct.pack("L", int(mechanism)) for mechanism in mechanisms)

    def unpack(raw: bytes) -> list[Any]:
        return [
            Mechanism(value) if value in known else value
            for (value,) in struct.iter_unpack("L", raw[: len(raw) - len(raw) % size])
        ]

    mapper = AttributeMapper()
    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, pack, unpack)
    return mapper


class Pkcs11Sealer(_VersionedSealer):
    """AES-256-GCM inside an HSM over PKCS#11: the key is generated in the token with only
    encrypt/decrypt allowed, sensitive, not extractable, not modifiable, private and not
    copyable (checked on every load), and every seal/open is a call into the token.

    python-pkcs11 initialises the library without OS locking, so calls into the token are
    serialised here with one lock (a seal or open takes about 0.2 ms on SoftHSM2).
    """

    def __init__(
        self,
        module: str,
        token_label: str,
        pin: str,
        key_label: str = "backvault-sealing",
        create: bool = True,
        accept_weak_keys: bool = False,
        accept_cloned_keys: bool = False,
        records: VersionRecords | None = None,
    ) -> None:
        super().__init__(records)
        import pkcs11

        self._pkcs11 = pkcs11
        self._lock = threading.Lock()
        self.key_label = key_label
        self.accept_weak_keys = accept_weak_keys
        self.accept_cloned_keys = accept_cloned_keys
        self._warned: set[tuple[int, str]] = set()
        self.description = f"PKCS#11 token {token_label!r} ({module}), key {key_label!r}"
        self.no_key_message = (
            f"the HSM token has no key labelled {key_label!r} or {key_label + '-v1'!r}; "
            "create it once with `backvault vault init-hsm`"
        )
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                lib = pkcs11.lib(module)
                token = lib.get_token(token_label=token_label)
                mapper = pkcs11_attribute_mapper()
                try:
                    self._session: Any = token.open(user_pin=pin, rw=True, attribute_mapper=mapper)
                except pkcs11.UserAlreadyLoggedIn:
                    # PKCS#11 logs in per process: another session here already did.
                    self._session = token.open(rw=True, attribute_mapper=mapper)
                break
            except (pkcs11.exceptions.GeneralError, pkcs11.exceptions.NoSuchToken) as exc:
                # Transient: SoftHSM2 answers either while another process (a second vault
                # node starting) rewrites the token's files; network HSMs while busy. A
                # token that is really missing is reported after the last attempt (~2 s).
                if attempt + 1 == _OPEN_ATTEMPTS:
                    raise SealingError(
                        f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
                    ) from exc
                time.sleep(0.1 * (attempt + 1))
            except (pkcs11.PinIncorrect, pkcs11.PinLenRange) as exc:
                raise SealingError(
                    f"cannot log in to the HSM token {token_label!r}: {exc!r}"
                ) from exc
            except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
                raise SealingError(
                    f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
                ) from exc
        try:
            self._start(create)
        except BaseException:
            self.close()
            raise

    def label_of(self, version: int) -> str:
        return f"{self.key_label}-v{version}"

    def _version_of(self, label: str) -> int | None:
        if label == self.key_label:
            return 1  # created before key versions existed
        suffix = label.removeprefix(self.key_label + "-v")
        if label.startswith(self.key_label + "-v") and _is_number(suffix) and int(suffix) >= 1:
            return int(suffix)
        return None

    def _stored(self) -> dict[int, list[Any]]:
        from pkcs11 import Attribute, KeyType, ObjectClass

        try:
            with self._lock:
                candidates = [
                    (str(obj[Attribute.LABEL]), obj)
                    for obj in self._session.get_objects(
                        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
                    )
                ]
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"cannot list the HSM token's keys: {exc!r}") from exc
        found: dict[int, list[Any]] = {}
        for label, obj in candidates:
            version = self._version_of(label)
            if version is not None:
                found.setdefault(version, []).append((label, obj))
        return found

    def _where(self, candidate: Any) -> str:
        return f"labelled {candidate[0]!r}"

    def _usable(self, version: int, candidate: Any) -> Any:
        return candidate[1]

    def _check_attributes(self, version: int, key: Any, strict: bool) -> None:
        from pkcs11 import Attribute

        with self._lock:
            try:
                values = {name: key[getattr(Attribute, name)] for name, _ in SAFE_KEY_ATTRIBUTES}
                history = {name: key[getattr(Attribute, name)] for name in HISTORY_ATTRIBUTES}
            except self._pkcs11.PKCS11Error as exc:
                raise SealingError(
                    f"cannot read the attributes of HSM sealing key version {version}: {exc!r}"
                ) from exc
        for name, wanted in SAFE_KEY_ATTRIBUTES:
            if bool(values[name]) == wanted:
                continue
            problem = (
                f"the HSM sealing key version {version} has CKA_{name}={str(bool(values[name])).lower()}; "
                f"a sealing key must have CKA_{name}={str(wanted).lower()}"
            )
            if strict and not self.accept_weak_keys:
                raise SealingError(
                    f"{problem}. Make a new key version with safe attributes and move every "
                    "value to it: `backvault vault rotate-sealing-key` (see the operator guide)"
                )
            self._warn_once(version, name, problem + "; destroy this version once nothing uses it")
        for name, value in history.items():
            if value:
                continue
            if name == "LOCAL":
                problem = (
                    f"the HSM sealing key version {version} has CKA_LOCAL=false: it was not "
                    "generated in the token but imported, unwrapped or derived, so someone may "
                    "know its value or be able to make it again"
                )
            else:
                problem = (
                    f"the HSM sealing key version {version} has CKA_{name}=false: its value "
                    "was readable or exportable at some point (an imported key, or an "
                    "unwrapped copy), so someone may know it"
                )
            if strict and not (self.accept_cloned_keys or self.accept_weak_keys):
                raise SealingError(
                    f"{problem}. Make a new key version inside the HSM and move every value "
                    "to it: `backvault vault rotate-sealing-key`; or, if your HSM's cloning "
                    "procedure cleared this flag on a copy of the vault's own key, set "
                    "pkcs11_accept_cloned_keys = true (see the operator guide)"
                )
            self._warn_once(version, name, problem)
        self._check_mechanisms(version, key, strict)

    def _allowed_mechanisms(self, version: int, key: Any) -> list[Any] | None:
        """The key's CKA_ALLOWED_MECHANISMS (empty: every mechanism), or None when the
        token does not know the attribute."""
        from pkcs11 import Attribute

        try:
            with self._lock:
                return list(key[Attribute.ALLOWED_MECHANISMS])
        except (self._pkcs11.AttributeTypeInvalid, self._pkcs11.AttributeSensitive):
            return None
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"cannot read the allowed mechanisms of HSM sealing key version {version}: {exc!r}"
            ) from exc

    def _check_mechanisms(self, version: int, key: Any, strict: bool) -> None:
        from pkcs11 import Mechanism

        allowed = self._allowed_mechanisms(version, key)
        if allowed is None:
            return  # a token without CKA_ALLOWED_MECHANISMS: nothing to check
        if not allowed:
            self._warn_once(
                version,
                ALLOWED_MECHANISMS_NAME,
                f"the HSM sealing key version {version} may be used with any mechanism "
                "(CKA_ALLOWED_MECHANISMS is empty), not only CKM_AES_GCM: keys the vault "
                "makes now are limited to it; move to one with `backvault vault "
                "rotate-sealing-key`",
            )
            return
        others = [m for m in allowed if m != Mechanism.AES_GCM]
        if not others:
            return
        names = ", ".join(
            f"CKM_{m.name}" if isinstance(m, Mechanism) else f"0x{int(m):x}" for m in others
        )
        problem = (
            f"the HSM sealing key version {version} allows mechanisms other than "
            f"CKM_AES_GCM ({names}) in CKA_ALLOWED_MECHANISMS"
        )
        if strict and not self.accept_weak_keys:
            raise SealingError(
                f"{problem}. Make a new key version with `backvault vault rotate-sealing-key` "
                "(the vault limits the keys it makes to CKM_AES_GCM) and move every value to it"
            )
        self._warn_once(version, ALLOWED_MECHANISMS_NAME, problem)

    def _warn_once(self, version: int, attribute: str, message: str) -> None:
        if (version, attribute) not in self._warned:
            self._warned.add((version, attribute))
            log.warning(message)

    def _create_key(self, version: int) -> Any:
        from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag

        template = {getattr(Attribute, name): wanted for name, wanted in SAFE_KEY_ATTRIBUTES}
        # Not even a PIN holder may copy the key (a copy could be made public, or given
        # other uses), nor use it with another mechanism than AES-GCM. PKCS#11 2.40; a
        # token that does not know an attribute goes without it.
        copyable = {Attribute.COPYABLE: False}
        mechanisms = {Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_GCM]}
        attempts = [
            {**template, **copyable, **mechanisms},
            {**template, **mechanisms},
            {**template, **copyable},
            template,
        ]
        for index, attempt in enumerate(attempts):
            try:
                with self._lock:
                    return self._session.generate_key(
                        KeyType.AES,
                        256,
                        label=self.label_of(version),
                        store=True,
                        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                        template=attempt,
                    )
            except self._pkcs11.AttributeTypeInvalid:
                if index + 1 == len(attempts):
                    raise SealingError(
                        "the HSM refused to create a sealing key: it does not know one of "
                        "the attributes a sealing key needs"
                    ) from None
            except self._pkcs11.PKCS11Error as exc:
                raise SealingError(f"the HSM refused to create a sealing key: {exc!r}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _destroy_key(self, version: int, key: Any) -> None:
        try:
            with self._lock:
                key.destroy()
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"the HSM refused to destroy key version {version}: {exc!r}"
            ) from exc

    def _encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams, Mechanism

        try:
            return self._transient_retried(
                lambda: bytes(
                    key.encrypt(
                        plaintext,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
            )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"the HSM refused to seal: {exc!r}") from exc

    def _transient_retried(self, call: Callable[[], bytes]) -> bytes:
        """``call`` in the token, tried again on CKR_GENERAL_ERROR: SoftHSM2 answers it now
        and then while another process (a node, a rotation) rewrites the token's files.
        (A retried seal reuses its nonce for the same plaintext and associated data: the
        same ciphertext, nothing revealed.)"""
        for attempt in range(3):
            try:
                with self._lock:
                    return call()
            except self._pkcs11.exceptions.GeneralError:
                if attempt == 2:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams, Mechanism

        try:
            return self._transient_retried(
                lambda: bytes(
                    key.decrypt(
                        body,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
            )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"sealed data does not open (wrong key, or altered): {exc!r}"
            ) from exc

    def _check_reachable(self) -> None:
        """Reads the current key's label: proves the session is logged in and the key
        handle valid, without spending a GCM nonce or an encryption in the HSM."""
        from pkcs11 import Attribute

        key = self._keys[self.current_version]
        try:
            with self._lock:
                _ = key[Attribute.LABEL]
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"the HSM session or key is gone: {exc!r}") from exc

    def close(self) -> None:
        session = getattr(self, "_session", None)
        with self._lock, contextlib.suppress(Exception):  # a dead session needs no closing
            if session is not None:
                session.close()
