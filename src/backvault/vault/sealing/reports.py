"""What a sealer tells the operator about its keys: the key it seals under (and when that
changes), keys in the store it ignores and why, versions a rotation left unfinished, and why
it stopped sealing — in the log (once each) and in the metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from backvault.vault.metrics import (
    SEALING_KEY_CHANGES,
    SEALING_KEY_CURRENT_INFO,
    SEALING_KEY_CURRENT_VERSION,
    SEALING_KEYS_IGNORED,
)
from backvault.vault.sealing.check_values import short_check_value
from backvault.vault.sealing.versions import (
    IGNORED_CHECK_VALUE,
    IGNORED_NOT_A_SEALING_KEY,
    IGNORED_REASONS,
    IGNORED_UNFINISHED,
    IGNORED_UNRECORDED,
    IGNORED_UNVOUCHED,
    IgnoredKey,
    RecordedVersion,
    reservation_is_fresh,
)

# Reasons a key may be planted by someone who could write to the key store.
PLANTED_REASONS = (
    IGNORED_UNRECORDED,
    IGNORED_CHECK_VALUE,
    IGNORED_UNVOUCHED,
    IGNORED_NOT_A_SEALING_KEY,
)

log = logging.getLogger("backvault.vault.sealing")


class KeyReports:
    """The reporting half of VersionedSealer (a base of it), over the state it keeps."""

    description: str
    no_key_message: str
    _floor: int
    _blocked: str | None
    _check_values: dict[int, bytes]
    _ignored: list[IgnoredKey]
    _reported: set[IgnoredKey]
    _unfinished: list[int]
    _unfinished_reported: set[int]

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
                    if key.reason in PLANTED_REASONS
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
