"""Red team round three (restore): what a snapshot planted by someone with the repository
key costs a restore in memory. Each restore runs in a subprocess under an address-space
limit (RLIMIT_AS) that the old code exceeded (it died of MemoryError) and the new one
fits in; no timing is measured. Reproductions with figures: bench/hostile_restore/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from backvault.engine.restorer import MAX_LISTED, MAX_LISTED_PATH
from backvault.repo import format as fmt
from tests.test_hostile_snapshots import THREADS, Hostile, remove_tree

LIMITED_RESTORE = r"""
import json, resource, sys
from backvault.engine.restorer import Restorer
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
repo_path, key, snapshot_id, target, limit, includes = sys.argv[1:7]
repo = Repository.open(LocalBackend(repo_path), [key.encode()])
resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
restorer = Restorer(repo, target, includes=json.loads(includes))
outcome = restorer.run(repo.find_snapshot(snapshot_id)[1])
print(json.dumps(outcome.to_json()))
"""


def limited_restore(
    h: Hostile, snapshot_id: str, target: Path, limit: int, includes: list[str] | None = None
) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", LIMITED_RESTORE, str(h.path), h.key, snapshot_id, str(target),
         str(limit), json.dumps(includes or [])],
        capture_output=True, text=True, env={**os.environ, **THREADS},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    outcome: dict[str, Any] = json.loads(done.stdout)
    return outcome


def test_a_chain_of_folders_with_long_names_costs_memory_linear_in_depth(tmp_path: Path) -> None:
    """4000 nested folders with 255-character names, each holding a setuid file (a
    warning each). Every folder kept its full path (1 MB at the bottom), and every warning
    its own: 2 GB and more, MemoryError under a 1 GiB limit. Now a folder keeps its name
    only, and the result lists the first MAX_LISTED warnings (long paths shortened) and
    counts the rest."""
    depth = 4000
    h = Hostile(tmp_path / "repo")
    name = "n" * 255
    nodes = [h.file("leaf.txt", b"leaf\n")]
    for _ in range(depth):
        nodes = [h.folder(name, [*nodes, h.file("s", b"s\n", mode=0o755 | fmt.GO_MODE_SETUID)])]
    snapshot_id = h.snapshot(nodes)
    target = tmp_path / "target"
    try:
        outcome = limited_restore(h, snapshot_id, target, 1 << 30)
        check_deep(outcome, target, depth, name)
    finally:
        if target.exists():
            remove_tree(target, tmp_path / "spare")  # pytest's clean-up recurses


def check_deep(outcome: dict[str, Any], target: Path, depth: int, name: str) -> None:
    assert outcome["damaged"] == [] and outcome["dirs"] == depth
    assert outcome["files"] == depth + 1
    assert len(outcome["warnings"]) == MAX_LISTED
    assert outcome["warnings_unlisted"] == depth - MAX_LISTED
    assert all("setuid" in w["warning"] for w in outcome["warnings"])
    longest = max(len(w["path"]) for w in outcome["warnings"])
    assert MAX_LISTED_PATH - 100 < longest <= MAX_LISTED_PATH  # shortened
    assert "characters)…/" in outcome["warnings"][-1]["path"]
    # The bottom was restored (reached through descriptors, not its 1 MB path).
    fd = os.open(target, os.O_RDONLY)
    try:
        for _ in range(depth):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("leaf.txt", os.O_RDONLY, dir_fd=fd), "rb") as leaf:
            assert leaf.read() == b"leaf\n"
    finally:
        os.close(fd)


LIMITED_PLAN = r"""
import json, resource, sys
from backvault.engine.restorer import Restorer, TooManyEntries
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
repo_path, key, snapshot_id, target, limit, max_entries = sys.argv[1:7]
repo = Repository.open(LocalBackend(repo_path), [key.encode()])
resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
try:
    Restorer(repo, target, max_entries=int(max_entries)).run(repo.find_snapshot(snapshot_id)[1])
except TooManyEntries as exc:
    print(json.dumps({"refused": str(exc)}))
"""


def test_planning_keeps_no_more_trees_than_the_cache_holds(tmp_path: Path) -> None:
    """30 folders of 40,000 fifos each (the trees compress to a few hundred KiB).
    Planning read every tree and the tree cache, bounded by count (4096 trees), kept them
    all: MemoryError under a 384 MiB limit (and a 512 MiB one; it needed about 768). Now
    the cache is bounded by nodes and planning reads each tree once (it fits in 256 MiB).
    The restore is refused right after planning (``max_entries`` below the snapshot's
    count), so every tree is read and nothing is written."""
    folders, per_folder = 30, 40_000
    h = Hostile(tmp_path / "repo")
    top = [
        h.folder(
            f"dir{f:02d}", [{"name": f"{f}-{i:06d}", "type": "fifo"} for i in range(per_folder)]
        )
        for f in range(folders)
    ]
    snapshot_id = h.snapshot(top)
    target = tmp_path / "target"
    done = subprocess.run(
        [sys.executable, "-c", LIMITED_PLAN, str(h.path), h.key, snapshot_id, str(target),
         str(384 << 20), str(folders * per_folder)],
        capture_output=True, text=True, env={**os.environ, **THREADS},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    refused = json.loads(done.stdout)["refused"]
    assert f"expands to {folders * (per_folder + 1):,} entries" in refused, refused
    assert os.listdir(target) == []
