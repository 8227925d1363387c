"""The sealing-key versions as the vault records them (in its database: key_versions.py, or
pinned in memory for a sealer without one), and why a key in a store is ignored."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from backvault.vault.sealing.check_values import short_check_value
from backvault.vault.sealing.formats import SealingError, key_version_of

# Why a key in the store is not used (the label values of the ignored-keys metric).
IGNORED_UNRECORDED = "unrecorded"  # its version is not one the vault recorded
IGNORED_CHECK_VALUE = "check_value"  # its version is recorded, with another key's check value
IGNORED_DESTROYED = "destroyed"  # its version was destroyed
IGNORED_UNFINISHED = "unfinished"  # reserved by a rotation that never recorded its key
# recorded with its check value, but not vouched for by a version the vault trusts
IGNORED_UNVOUCHED = "unvouched"
# labelled as a version, but not the kind of key a sealing key is (an AES key of 128 or 192
# bits in an HSM)
IGNORED_NOT_A_SEALING_KEY = "not_aes256"
IGNORED_REASONS = (
    IGNORED_UNRECORDED,
    IGNORED_CHECK_VALUE,
    IGNORED_DESTROYED,
    IGNORED_UNFINISHED,
    IGNORED_UNVOUCHED,
    IGNORED_NOT_A_SEALING_KEY,
)
# A rotation makes its key moments after reserving the version: until then (and for this
# long) a key of a reserved version is skipped quietly, not reported as unfinished.
RESERVATION_GRACE = 600.0


def reservation_is_fresh(record: RecordedVersion, now: float) -> bool:
    """A reservation made moments ago by a rotation that is making its key now. Any other
    (older, or dated in the future by whoever wrote it) is unfinished: reported, never
    used, and no obstacle to the next rotation."""
    return record.check_value is None and abs(now - record.recorded_at) <= RESERVATION_GRACE


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
            IGNORED_NOT_A_SEALING_KEY: "it is not an AES-256 key, which every sealing key is",
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
