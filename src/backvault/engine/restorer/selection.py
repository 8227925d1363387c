"""What a restore selects (restic-style include patterns) and how it reads a file's
data (its blobs grouped into runs, one read each)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from backvault.crypto.aead import OVERHEAD
from backvault.repo import format as fmt
from backvault.repo.blobs import BlobEntry
from backvault.repo.repository import Repository

# A run is read with one request; small runs of small SQLite chunks would cost a request
# (and a task) each, large ones would hold much memory per worker.
_RUN_BYTES = 4 * 1024 * 1024

# Blobs of a run may be this far apart in their pack: reading the gap costs less than
# another request.
_RUN_GAP_BYTES = 256 * 1024


def matches(path: str, patterns: list[str], *, ancestors: bool = True) -> bool:
    """restic-style include: a pattern with a leading / is anchored at the snapshot root;
    one without matches any trailing run of path components. A match on a directory
    selects everything below it. With ``ancestors=False`` only the path itself is tried
    (the walk knows that no folder above it matched): a snapshot nests folders thousands
    deep, and trying every ancestor of every entry cost the cube of the depth."""
    parts = path.strip("/").split("/")
    for pattern in patterns:
        anchored = pattern.startswith("/")
        pparts = pattern.strip("/").split("/")
        size = len(pparts)
        if anchored:
            ends: range | list[int] = [size] if ancestors or size == len(parts) else []
        else:
            ends = range(size, len(parts) + 1) if ancestors else [len(parts)]
        for end in ends:  # the path or one of its ancestors: its last ``size`` components
            if end < size or end > len(parts):
                continue
            window = parts[end - size : end]
            if all(fnmatch.fnmatchcase(c, p) for c, p in zip(window, pparts, strict=True)):
                return True
    return False


def could_contain_match(path: str, patterns: list[str]) -> bool:
    """Whether a directory may hold selected entries (so it must be walked)."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    for pattern in patterns:
        if not pattern.startswith("/"):
            return True
        pparts = pattern.strip("/").split("/")
        prefix = pparts[: len(parts)]
        if all(fnmatch.fnmatchcase(c, p) for c, p in zip(parts, prefix, strict=False)):
            return True
    return False


class Run(NamedTuple):
    """A run as a restore sends it: its pack, its blobs' entries, the plaintext bytes they
    hold and the bytes of the pack the run spans (its read)."""

    pack_id: bytes
    entries: list[BlobEntry]
    plaintext: int
    stored: int


def group_runs(repo: Repository, content: Sequence[bytes]) -> list[Run]:
    """Group a file's blobs into runs that lie close together in one pack, so each run
    is one read (skipping what lies between): small SQLite chunks would otherwise cost
    a request each, and after an incremental backup a database's chunks sit in the
    older packs with gaps where the changed ones were."""
    return list(iter_runs(repo, content))


def iter_runs(repo: Repository, content: Sequence[bytes]) -> Iterator[Run]:
    """``group_runs``, a run at a time, made from the index's entries as they are sent:
    no object per blob (the runs of a database made at once held ~220 bytes a blob, 40
    MB for 184 000; and the restore's parent makes them while the workers need both
    cores)."""
    locate = repo.locate_entry
    data = fmt.BlobType.DATA
    pack: bytes = b""
    entries: list[BlobEntry] = []
    start = end = plaintext = 0
    for blob_id in content:
        pack_id, entry = locate(blob_id, data)
        _, offset, length, uncompressed = entry
        if (
            entries
            and pack_id == pack
            and 0 <= offset - end <= _RUN_GAP_BYTES
            and offset + length - start <= _RUN_BYTES
        ):
            entries.append(entry)
        else:
            if entries:
                yield Run(pack, entries, plaintext, end - start)
            pack, entries, start, plaintext = pack_id, [entry], offset, 0
        end = offset + length
        plaintext += length - OVERHEAD if uncompressed is None else uncompressed
    if entries:
        yield Run(pack, entries, plaintext, end - start)
