"""The workflows behind the commands, called directly (no click, no subprocess): key slot
prefixes and the last-slot refusal, --read-data-subset, forget through the repository
(the ls walk's guard: tests/test_hostile_snapshots.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backvault.app import keys, retention
from backvault.app.checking import subset_filter
from backvault.app.errors import AmbiguousKeySlot, InvalidArgument, LastKeySlot, NoSuchKeySlot
from backvault.device.settings import VaultSettings
from backvault.repo.format import Snapshot
from backvault.repo.policy import Policy
from backvault.repo.repository import KeySlot, Repository
from backvault.repo.timefmt import format_ns
from backvault.storage import LocalBackend


def slot(slot_id: str) -> KeySlot:
    return KeySlot(slot_id, "ana", "phone", "2026-01-01T00:00:00Z", False)


def no_vault() -> VaultSettings:
    raise AssertionError("a recovery key slot needs no vault")


def test_a_key_slot_is_named_by_a_unique_prefix_of_at_least_four_digits() -> None:
    slots = [slot("abcd1111"), slot("abcd2222"), slot("ef001234")]
    assert keys.find_slot(slots, "ef00").id == "ef001234"
    assert keys.find_slot(slots, "abcd1").id == "abcd1111"
    with pytest.raises(NoSuchKeySlot, match="no key slot matches 'ef0'"):
        keys.find_slot(slots, "ef0")  # too short, though it matches
    with pytest.raises(NoSuchKeySlot):
        keys.find_slot(slots, "9999")
    with pytest.raises(AmbiguousKeySlot, match="matches 2 key slots"):
        keys.find_slot(slots, "abcd")


def test_removing_slots_never_removes_the_last(tmp_path: Path) -> None:
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    added = keys.add_recovery_key(repo)
    assert {s.id for s in repo.list_keys()} >= {added.key_id}
    assert added.secret.hex() not in repr(added)
    removed = keys.remove_slot(repo, added.key_id[:8], no_vault)
    assert removed.slot.id == added.key_id and removed.kind == "recovery key"
    assert not removed.record_left_alone
    (last,) = repo.list_keys()
    with pytest.raises(LastKeySlot, match="refusing to remove the last key slot"):
        keys.remove_slot(repo, last.id, no_vault)
    assert [s.id for s in repo.list_keys()] == [last.id]


def test_read_data_subset() -> None:
    assert subset_filter(None) is None
    second_of_four = subset_filter("2/4")
    assert second_of_four is not None
    assert second_of_four("00000001" + "0" * 56) and not second_of_four("0" * 64)
    everything = subset_filter("100%")
    assert everything is not None and everything("0" * 64)
    for bad in ("0/4", "5/4", "x", "0%", "150%"):
        with pytest.raises(InvalidArgument, match="--read-data-subset takes n/t"):
            subset_filter(bad)


def test_forget_removes_through_the_repository_and_a_dry_run_removes_nothing(
    tmp_path: Path,
) -> None:
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    start = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    ids = [
        repo.save_snapshot(
            Snapshot(
                format_ns(int((start + timedelta(days=i)).timestamp() * 1e9)),
                b"\0" * 32,
                ["/chat"],
                "phone",
            )
        )
        for i in range(5)
    ]
    dry = retention.forget(repo, Policy(last=2), ("host", "paths"), dry_run=True)
    assert dry.removed == ids[:3] and len(repo.list_snapshots()) == 5
    assert [d.snapshot_id for d in dry.oldest_first()] == ids
    done = retention.forget(repo, Policy(last=2), retention.groups_of("host, paths,"), False)
    assert done.removed == ids[:3]
    assert sorted(name for name, _ in repo.list_snapshots()) == sorted(ids[3:])
    with pytest.raises(InvalidArgument, match="no policy given"):
        retention.forget(repo, Policy(), ("host",), dry_run=False)
