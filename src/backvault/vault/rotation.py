"""Sealing-key rotation, run by an operator while the nodes keep serving: make a new key
version, re-seal every sealed column under it (sealed_columns.py), and later destroy the
old version once nothing uses it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from backvault.vault.config import VaultSettings
from backvault.vault.housekeeping import last_seal_at, record_seal_counts, seal_totals
from backvault.vault.sealed_columns import (
    ResealProgress,
    reseal,
    values_by_key_version,
    values_under,
)
from backvault.vault.sealing import (
    IGNORED_UNFINISHED,
    IGNORED_UNRECORDED,
    Sealer,
    SealingError,
    short_check_value,
)
from backvault.vault.server import make_sealer
from backvault.vault.store import make_engine


def switch_delay(settings: VaultSettings) -> float:
    """How long after a new key version appears every node seals under it: a node looks
    for new versions at each sweep, and reports its seals at the next."""
    return 2 * settings.sweep_every


@dataclass
class RotationReport:
    key_version: int
    created: bool
    progress: ResealProgress
    # Older versions that still seal values: version -> sealed column -> count.
    still_used: dict[int, dict[str, int]] = field(default_factory=dict)
    old_versions: list[int] = field(default_factory=list)


def _open(settings: VaultSettings) -> tuple[sa.Engine, Sealer]:
    engine = make_engine(settings.db_url)
    try:
        # A key made before the vault required safe HSM attributes is accepted here, so
        # that its values can move to a new, safe version.
        return engine, make_sealer(settings, engine, accept_weak_keys=True)
    except BaseException:
        engine.dispose()
        raise


def rotate_sealing_key(
    settings: VaultSettings,
    resume: bool = False,
    batch_size: int = 100,
    max_batches: int | None = None,
    say: Callable[[str], None] = print,
) -> RotationReport:
    """Create a new key version (unless ``resume``) and re-seal every value sealed under an
    older one, in batches. Stopping early (``max_batches``) or crashing leaves a state
    that ``resume`` finishes."""
    engine, sealer = _open(settings)
    try:
        created = False
        if not resume:
            version = sealer.create_version()
            created = True
            say(
                f"created sealing key version {version} (check value "
                f"{short_check_value(sealer.check_value(version))}): new values are sealed "
                f"under it (running nodes switch within {switch_delay(settings):g} s)"
            )
        progress = reseal(engine, sealer, batch_size, max_batches)
        if progress.finished and created:
            # Nodes that had not switched yet may have sealed a few values under the old
            # version meanwhile: wait until they have, and take those too.
            time.sleep(switch_delay(settings))
            progress.finished = False
            progress = reseal(engine, sealer, batch_size, max_batches, progress)
        record_seal_counts(engine, sealer, time.time())
        current = sealer.current_version
        report = RotationReport(current, created, progress)
        report.old_versions = [v for v in sealer.versions() if v != current]
        for version, counts in _by_version(values_by_key_version(engine)).items():
            if version != current:
                report.still_used[version] = counts
        return report
    finally:
        sealer.close()
        engine.dispose()


def _by_version(by_column: dict[str, dict[int, int]]) -> dict[int, dict[str, int]]:
    by_version: dict[int, dict[str, int]] = {}
    for column, counts in by_column.items():
        for version, count in counts.items():
            by_version.setdefault(version, {})[column] = count
    return by_version


def destroy_sealing_key(settings: VaultSettings, version: int) -> None:
    """Destroy key version ``version`` for good; refused while it is current, while any
    value is sealed under it, or while a node sealed under it moments ago."""
    engine, sealer = _open(settings)
    try:
        if version == sealer.current_version:
            raise SealingError(
                f"key version {version} is the current sealing key; run "
                "`backvault vault rotate-sealing-key` first"
            )
        if version not in sealer.versions():
            ignored = [key for key in sealer.ignored_keys() if key.version == version]
            if ignored:
                raise SealingError(
                    f"the vault does not use the key {ignored[0].where} for version {version} "
                    "(it is not one the vault recorded); remove it with the HSM's own tools, "
                    "or delete the file, once you know where it came from"
                )
            raise SealingError(
                f"there is no sealing key version {version} (versions: "
                f"{', '.join(map(str, sealer.versions()))})"
            )
        used = values_under(engine, version)
        if used:
            where = ", ".join(f"{column}: {count}" for column, count in sorted(used.items()))
            raise SealingError(
                f"{sum(used.values())} values are still sealed under key version {version} "
                f"({where}); run `backvault vault rotate-sealing-key --resume` first"
            )
        last = last_seal_at(engine, version)
        wait = switch_delay(settings)
        if last is not None and time.time() - last < wait:
            raise SealingError(
                f"a node sealed a value under key version {version} in the last {wait:g} s: "
                "not every node has switched to the current version yet; try again in a "
                "moment"
            )
        sealer.destroy_version(version)
    finally:
        sealer.close()
        engine.dispose()


@dataclass(frozen=True)
class KeyVersionState:
    version: int
    state: str  # "current", "old", or "ignored" (a key in the store the vault does not use)
    values: int  # sealed values in the database under this version
    seals: int  # seals ever made under it (durable count, all nodes)
    check_value: str  # short form; "-" when unknown
    reason: str = ""  # why an ignored key is ignored (sealing.IGNORED_REASONS)

    @property
    def current(self) -> bool:
        return self.state == "current"


def sealing_key_states(settings: VaultSettings) -> list[KeyVersionState]:
    """The key versions in use, then the keys in the store that the vault ignores."""
    engine, sealer = _open(settings)
    try:
        by_version = _by_version(values_by_key_version(engine))
        totals = seal_totals(engine)

        def counts(version: int) -> tuple[int, int]:
            return sum(by_version.get(version, {}).values()), totals.get(version, 0)

        states = [
            KeyVersionState(
                version,
                "current" if version == sealer.current_version else "old",
                *counts(version),
                short_check_value(sealer.check_value(version)),
            )
            for version in sealer.versions()
        ]
        listed = set()
        for ignored in sealer.ignored_keys():
            listed.add(ignored.version)
            states.append(
                KeyVersionState(
                    ignored.version,
                    "ignored",
                    *counts(ignored.version) if ignored.reason != IGNORED_UNRECORDED else (0, 0),
                    short_check_value(ignored.check_value) if ignored.check_value else "-",
                    ignored.reason,
                )
            )
        for version in sealer.unfinished_versions():
            if version not in listed:  # reserved, and no key was made for it
                states.append(KeyVersionState(version, "ignored", 0, 0, "-", IGNORED_UNFINISHED))
        return states
    finally:
        sealer.close()
        engine.dispose()
