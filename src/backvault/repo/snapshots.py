"""Snapshots (restic's ``snapshots/``): listing them in time order, and finding one by
``latest`` or by an id prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backvault.repo import format as fmt
from backvault.repo.errors import DamagedObject, RepositoryError
from backvault.repo.format import Snapshot
from backvault.repo.ids import resolve_prefix
from backvault.repo.timefmt import parse_ns
from backvault.storage import FileType

if TYPE_CHECKING:
    from backvault.repo.repository import Repository


def list_snapshots(
    repo: Repository, errors: list[DamagedObject] | None = None
) -> list[tuple[str, Snapshot]]:
    """All snapshots, oldest first. Damaged ones go to ``errors`` or raise."""
    snapshots = []
    for name, _ in repo.list_objects(FileType.SNAPSHOT):
        try:
            snapshots.append((name, load_snapshot(repo, name)))
        except DamagedObject as exc:
            if errors is None:
                raise
            errors.append(exc)
    snapshots.sort(key=lambda item: (_sort_time(item[1].time), item[0]))
    return snapshots


def load_snapshot(repo: Repository, name: str) -> Snapshot:
    try:
        return Snapshot.from_json(repo.load_unpacked(FileType.SNAPSHOT, name))
    except fmt.FormatError as exc:
        raise DamagedObject(f"snapshots/{name}", str(exc)) from exc


def find_snapshot(
    repo: Repository, ref: str, paths: list[str] | None = None
) -> tuple[str, Snapshot]:
    """``latest`` (of those of ``paths``, if given) or an id prefix (at least 4 hex
    digits, as restic allows)."""
    if ref == "latest":
        damaged: list[DamagedObject] = []  # a damaged snapshot file is skipped here
        found = [
            item
            for item in list_snapshots(repo, errors=damaged)
            if paths is None or sorted(item[1].paths) == sorted(paths)
        ]
        if not found:
            raise RepositoryError("the repository has no snapshots yet")
        return found[-1]
    names = (name for name, _ in repo.list_objects(FileType.SNAPSHOT))
    name = resolve_prefix(names, ref, "snapshot", "list them with `backvault snapshots`")
    return name, load_snapshot(repo, name)


def _sort_time(text: str) -> int:
    try:
        return parse_ns(text)
    except ValueError:
        return 0
