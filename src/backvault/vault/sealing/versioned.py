"""What every sealer shares, whatever holds its keys: the Sealer interface; sealing and
opening under the key versions it trusts (recorded, with a matching check value, vouched
for); refreshing them; making and destroying versions; counting seals per version.

(A little over 500 lines: the trust rules and the sealing they guard are read together.)
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from backvault.vault.metrics import (
    SEALING_OPERATIONS,
)
from backvault.vault.retry import retry
from backvault.vault.sealing.check_values import (
    compute_check_value,
    vouch_purpose,
)
from backvault.vault.sealing.formats import (
    MAX_KEY_VERSION,
    NONCE_SIZE,
    SealingError,
    parse_sealed,
    sealed_header,
)
from backvault.vault.sealing.reports import KeyReports
from backvault.vault.sealing.versions import (
    IGNORED_CHECK_VALUE,
    IGNORED_DESTROYED,
    IGNORED_NOT_A_SEALING_KEY,
    IGNORED_UNFINISHED,
    IGNORED_UNRECORDED,
    IGNORED_UNVOUCHED,
    IgnoredKey,
    PinnedVersions,
    RecordedVersion,
    VersionRecords,
    reservation_is_fresh,
)

log = logging.getLogger("backvault.vault.sealing")


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


class _NotUsableYet(Exception):
    """A version just made is not among the keys this sealer uses yet."""


class VersionedSealer(KeyReports):
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

    def _misfits(self) -> list[tuple[int, str]]:
        """Keys in the store that claim a version but are not the kind a sealing key is
        (never used; reported): ``(version, where)``."""
        return []

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
        return compute_check_value(self._encrypt, key)

    def stored_check_values(self) -> dict[int, list[bytes]]:
        """The check value of every key in the store, by the version it claims."""
        return {
            version: [self._check_value_of(self._usable(version, c)) for c in candidates]
            for version, candidates in self._stored().items()
        }

    def opening_check_values(self, sealed: bytes, purpose: bytes) -> list[bytes]:
        """The check values of the keys in the store that open ``sealed``: which key an
        older vault really sealed under."""
        version, nonce, body, aad_prefix = parse_sealed(sealed)
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
        _version, nonce, body, header = parse_sealed(record.vouch)
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
        for version, where in self._misfits():
            ignored.append(IgnoredKey(version, where, IGNORED_NOT_A_SEALING_KEY))
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
            version, nonce, body, aad_prefix = parse_sealed(sealed)
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
        taken = set(self._stored()) | {version for version, _ in self._misfits()} | set(recorded)
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
        # process rewrites its files (SoftHSM2): look again for up to ~20 s (a loaded
        # machine has taken longer than 4.5 s; waiting costs nothing when it works).

        def usable() -> None:
            self.refresh()
            if version not in self._keys:
                raise _NotUsableYet

        try:
            retry(usable, attempts=20, on=_NotUsableYet, pause=0.1)
        except _NotUsableYet:
            raise SealingError(
                f"made sealing key version {version}, but cannot use it yet (see the log); run "
                "`backvault vault rotate-sealing-key --resume` in a moment"
            ) from None
        return version

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
