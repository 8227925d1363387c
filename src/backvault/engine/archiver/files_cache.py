"""What a backup need not read again.

- A file is unchanged since the parent snapshot when its type, size, mtime, ctime and
  inode are the same and its blobs are still stored: its content is taken as it was.
- A SQLite database's own stat cannot be trusted (it changes in its -wal first): the
  SQLite state cache remembers, per database, the stat of the file and its WAL at its
  last backup and a digest of the blob list stored then. It is a JSON file on this
  device, outside the repository, written when a snapshot is saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from backvault.hardening.private_files import write_private_file
from backvault.repo.format import ContentIds, Node


def unchanged(node: Node, previous: Node | None, has_blob: Callable[[bytes], bool]) -> bool:
    """Whether ``node`` (just read from disk) is the parent snapshot's ``previous``."""
    return (
        previous is not None
        and previous.type == "file"
        and previous.size == node.size
        and previous.mtime == node.mtime
        and previous.ctime == node.ctime
        and previous.inode == node.inode
        and previous.content is not None
        and all(map(has_blob, previous.content))
    )


def database_state(path: str, st: os.stat_result) -> list[Any]:
    """A database's state: its stat and its WAL's (what any write changes)."""
    state: list[Any] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    try:
        wal = os.stat(path + "-wal")
    except OSError:
        wal = None
    # A missing WAL and an empty one hold the same (nothing); readers, including our own
    # consistent copy, may create an empty one.
    if wal is None or wal.st_size == 0:
        state.append(None)
    else:
        state.append([wal.st_size, wal.st_mtime_ns, wal.st_ctime_ns, wal.st_ino])
    return state


def content_digest(content: Sequence[bytes]) -> str:
    """A database's blob list, in the cache: its digest (a 1.5 GB database has 190 000
    blobs; their list would make the cache file and its reading big). The ids are hashed
    a slice at a time: the same digest, without a copy of all of them."""
    if isinstance(content, ContentIds):
        return hashlib.sha256(content.joined).hexdigest()
    digest = hashlib.sha256()
    for start in range(0, len(content), 4096):
        digest.update(b"".join(content[start : start + 4096]))
    return digest.hexdigest()


class SQLiteStateCache:
    """The state of each database at its last backup, read from ``file`` (none: nothing
    is remembered) and written back, with this run's changes, by ``save``."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self._known: dict[str, Any] = {}
        self._new: dict[str, Any] = {}
        if file is not None:
            try:
                self._known = json.loads(file.read_text())["databases"]
            except (OSError, ValueError, KeyError, TypeError):
                self._known = {}

    def state_unchanged(self, path: str, state: list[Any]) -> bool:
        """Whether the database is as it was at its last backup."""
        cached = self._known.get(path)
        return cached is not None and cached.get("state") == state

    def reusable(self, path: str, state: list[Any], previous: Node | None) -> bool:
        """Whether the database is as it was at its last backup, and the parent
        snapshot's entry ``previous`` holds what that backup stored."""
        cached = self._known.get(path)
        return (
            cached is not None
            and previous is not None
            and cached.get("state") == state
            and previous.content is not None
            and cached.get("content_sha256") == content_digest(previous.content)
        )

    def keep(self, path: str) -> None:
        """The database did not change: remember it as it was."""
        self._new[path] = self._known[path]

    def record(self, path: str, state: list[Any], content: Sequence[bytes]) -> None:
        """The database, in ``state``, was stored as ``content``."""
        self._new[path] = {"state": state, "content_sha256": content_digest(content)}

    def save(self, snapshot_id: str) -> None:
        if self.file is None:
            return
        merged = {**self._known, **self._new}
        # Private (it names the user's databases), whole or not at all; a cache that cannot
        # be written only costs a full read of the databases next time.
        with contextlib.suppress(OSError):
            write_private_file(
                self.file, json.dumps({"snapshot": snapshot_id, "databases": merged})
            )
