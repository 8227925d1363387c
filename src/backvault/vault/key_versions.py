"""The sealing-key versions the vault made, recorded in its database with each key's check
value (sealing/check_values.py): what lets a node tell the vault's own keys from keys that
someone who held the HSM PIN for a moment, or could write to the key folder, planted under
a label or file name the vault would otherwise pick up.

Versions are recorded by the vault itself: version 1 when it makes the first key (``vault
init-hsm``, or the first start with a key file), each later one by ``vault
rotate-sealing-key``. A database that has no records yet — a new one whose key store holds
exactly one key (made by ``init-hsm`` against another database), or one from before
versions were recorded — gets them once, at the next start: the one key, or the versions
that stored values are sealed under and whose key in the store really opens them.

Every version but the first is vouched for by the key of a lower version
(sealing/check_values.py, VOUCH_CONTEXT): `rotate-sealing-key` has the current key vouch
for the new one, so a record written into the database by someone who cannot use the
vault's keys is ignored. Records from before vouches existed are chained once, at the
first start after the upgrade: the versions up to the highest one stored values are sealed
under, each vouched for by the one before.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping

import sqlalchemy as sa

from backvault.vault.schema import sealing_key_versions
from backvault.vault.sealed_columns import count_by_key_version, sample_sealed_value
from backvault.vault.sealing import KeyStore, RecordedVersion, SealingError, short_check_value
from backvault.vault.store import READ_ONLY

log = logging.getLogger("backvault.vault.sealing")

# Serialises record keeping between nodes and rotations on PostgreSQL (SQLite's
# BEGIN IMMEDIATE already does).
_ADVISORY_LOCK = 7462813


def _load(conn: sa.Connection) -> dict[int, RecordedVersion]:
    return {
        int(row.key_version): RecordedVersion(
            int(row.key_version),
            bytes.fromhex(row.check_value) if row.check_value is not None else None,
            row.origin,
            float(row.recorded_at),
            None if row.destroyed_at is None else float(row.destroyed_at),
            _from_hex(row.vouch),
        )
        for row in conn.execute(sa.select(sealing_key_versions))
    }


def _from_hex(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None  # not a vouch: as good as none


def _insert(
    conn: sa.Connection,
    version: int,
    check_value: bytes | None,
    origin: str,
    now: float,
    vouch: bytes | None = None,
) -> None:
    conn.execute(
        sealing_key_versions.insert().values(
            key_version=version,
            check_value=None if check_value is None else check_value.hex(),
            origin=origin,
            recorded_at=now,
            vouch=None if vouch is None else vouch.hex(),
        )
    )


def _set_vouch(conn: sa.Connection, version: int, vouch: bytes) -> None:
    conn.execute(
        sealing_key_versions.update()
        .where(sealing_key_versions.c.key_version == version)
        .values(vouch=vouch.hex())
    )


def _versions_in_use(conn: sa.Connection) -> set[int]:
    in_use: set[int] = set()
    for counts in count_by_key_version(conn).values():
        in_use.update(version for version, count in counts.items() if count)
    return in_use


class DatabaseVersionRecords:
    """The records, in the vault's database (migrated before use)."""

    def __init__(self, engine: sa.Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})"))
            yield conn

    def load(self) -> dict[int, RecordedVersion]:
        # Read only: a node may look while a login of its own holds SQLite's write lock.
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return _load(conn)

    def reserve(self, choose: Callable[[Mapping[int, RecordedVersion]], int]) -> int:
        with self._locked() as conn:
            version = choose(_load(conn))
            _insert(conn, version, None, "created", self.clock())
        return version

    def confirm(self, version: int, check_value: bytes, vouch: bytes) -> None:
        with self.engine.begin() as conn:
            updated = conn.execute(
                sealing_key_versions.update()
                .where(
                    sealing_key_versions.c.key_version == version,
                    sealing_key_versions.c.check_value.is_(None),
                )
                .values(check_value=check_value.hex(), vouch=vouch.hex())
            )
        if updated.rowcount != 1:
            raise SealingError(f"sealing key version {version} was not reserved by this rotation")

    def mark_destroyed(self, version: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sealing_key_versions.update()
                .where(sealing_key_versions.c.key_version == version)
                .values(destroyed_at=self.clock())
            )

    def in_use(self) -> set[int]:
        with self.engine.connect() as conn:
            return _versions_in_use(conn)

    def prepare(self, store: KeyStore, create: bool) -> bool:
        """Record the versions a database without records already uses, or chain records
        from before vouches existed (once; nodes starting together wait for each other).
        Returns whether a key was made."""
        with self._locked() as conn:
            records = _load(conn)
            if records:
                if not any(record.vouch for record in records.values()):
                    self._chain(conn, store, records)
                return False
            in_use = _versions_in_use(conn)
            if in_use:
                self._adopt(conn, store, sorted(in_use))
                return False
            return self._first_start(conn, store, create)

    def _adopt(self, conn: sa.Connection, store: KeyStore, in_use: list[int]) -> None:
        """A database from before versions were recorded: record each version values are
        sealed under, with the check value of the key in the store that opens one of
        them. Versions nothing is sealed under are not taken (their keys are ignored)."""
        now = self.clock()
        adopted: list[str] = []
        previous: tuple[int, bytes] | None = None
        for version in in_use:
            sample = sample_sealed_value(conn, version)
            check_values = set(store.opening_check_values(*sample)) if sample else set()
            if len(check_values) != 1:
                log.error(
                    f"values are sealed under key version {version}, but no key in "
                    f"{store.description} opens them: they cannot be opened",
                    extra={"key_version": version},
                )
                continue
            (check_value,) = check_values
            # The first adopted version vouches for itself, each later one is vouched for
            # by the one before.
            voucher = previous or (version, check_value)
            vouch = store.vouch(version, check_value, *voucher)
            _insert(conn, version, check_value, "adopted", now, vouch)
            previous = (version, check_value)
            adopted.append(f"{version} (check value {short_check_value(check_value)})")
        if not adopted:
            raise SealingError(
                f"the database holds values sealed under key versions "
                f"{', '.join(map(str, in_use))}, and no key in {store.description} opens "
                "them: is this the right key store?"
            )
        log.warning(
            "recorded the sealing key versions this vault already seals under: "
            + ", ".join(adopted)
            + ". From now on nodes use no other key version than those recorded and the "
            "ones `backvault vault rotate-sealing-key` makes",
        )

    def _first_start(self, conn: sa.Connection, store: KeyStore, create: bool) -> bool:
        stored = store.stored_check_values()
        now = self.clock()
        if not stored:
            if not create:
                raise SealingError(store.no_key_message)
            check_value = store.make_key_version(
                1,
                lambda check_value: _insert(
                    conn,
                    1,
                    check_value,
                    "created",
                    now,
                    store.vouch(1, check_value, 1, check_value),
                ),
            )
            log.warning(
                f"made sealing key version 1 (check value {short_check_value(check_value)})"
            )
            return True
        keys = sorted((version, check) for version, checks in stored.items() for check in checks)
        if len(keys) > 1:
            found = ", ".join(
                f"{version} (check value {short_check_value(check)})" for version, check in keys
            )
            raise SealingError(
                f"{store.description} holds several sealing keys (versions {found}) and this "
                "database records none, so the vault cannot tell which one it made: destroy "
                "every key but the one `backvault vault init-hsm` made (it printed its check "
                "value), then start again"
            )
        ((version, check_value),) = keys
        vouch = store.vouch(version, check_value, version, check_value)
        _insert(conn, version, check_value, "first start", now, vouch)
        log.warning(
            f"recorded sealing key version {version} (check value "
            f"{short_check_value(check_value)}), the one key in {store.description}, as this "
            "vault's"
        )
        return False

    def _chain(
        self, conn: sa.Connection, store: KeyStore, records: Mapping[int, RecordedVersion]
    ) -> None:
        """Records from before vouches existed (none has one): vouch, once, for the
        versions up to the highest one stored values are sealed under (only the first
        version when nothing is sealed yet) — each one in use only if its key opens one of
        its values — the lowest for itself, each later one with the one before. Versions
        above stay unvouched: their keys are ignored (logged) until a rotation."""
        usable = sorted(version for version, record in records.items() if record.usable)
        if not usable:
            return
        in_use = _versions_in_use(conn)
        top = max(in_use) if in_use else usable[0]
        chained: list[str] = []
        left: list[int] = []
        previous: tuple[int, bytes] | None = None
        for version in usable:
            check_value = records[version].check_value
            assert check_value is not None  # usable
            if version > top:
                left.append(version)
                continue
            if version in in_use:
                sample = sample_sealed_value(conn, version)
                if sample and check_value not in store.opening_check_values(*sample):
                    left.append(version)
                    continue
            voucher = previous or (version, check_value)
            try:
                vouch = store.vouch(version, check_value, *voucher)
            except SealingError:
                left.append(version)  # its key is not in the store
                continue
            _set_vouch(conn, version, vouch)
            previous = (version, check_value)
            chained.append(f"{version} (check value {short_check_value(check_value)})")
        if not chained:
            return
        log.warning(
            "chained the sealing key versions recorded before each version was vouched for "
            "by the one before: "
            + ", ".join(chained)
            + (
                f"; not chained (their keys are ignored): {', '.join(map(str, left))}"
                if left
                else ""
            )
            + ". From now on a version is used only when the key of a version this vault "
            "trusts vouches for it (`backvault vault rotate-sealing-key` does)",
        )
