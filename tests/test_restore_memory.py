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

from backvault.client.restore import MAX_LISTED, MAX_LISTED_PATH
from backvault.repo import format as fmt
from tests.test_hostile_snapshots import THREADS, Hostile, remove_tree

LIMITED_RESTORE = r"""
import json, resource, sys
from backvault.client.restore import Restorer
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
