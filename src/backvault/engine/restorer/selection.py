"""What a restore selects (restic-style include patterns) and how it reads a file's
data (its blobs grouped into runs, one read each)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence

from backvault.repo import format as fmt
from backvault.repo.blobs import BlobLocation
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


def group_runs(repo: Repository, content: Sequence[bytes]) -> list[list[BlobLocation]]:
    """Group a file's blobs into runs that lie close together in one pack, so each run
    is one read (skipping what lies between): small SQLite chunks would otherwise cost
    a request each, and after an incremental backup a database's chunks sit in the
    older packs with gaps where the changed ones were."""
    return list(iter_runs(repo, content))


def iter_runs(repo: Repository, content: Sequence[bytes]) -> Iterator[list[BlobLocation]]:
    """``group_runs``, a run at a time (a caller that keeps runs in another form need not
    hold a location object per blob of a big database: ~35 MB for 184 000)."""
    run: list[BlobLocation] = []
    for blob_id in content:
        location = repo.locate(blob_id, fmt.BlobType.DATA)
        if run:
            first, prev = run[0].blob, run[-1].blob
            gap = location.blob.offset - (prev.offset + prev.length)
            if (
                run[-1].pack_id == location.pack_id
                and 0 <= gap <= _RUN_GAP_BYTES
                and location.blob.offset + location.blob.length - first.offset <= _RUN_BYTES
            ):
                run.append(location)
                continue
            yield run
        run = [location]
    if run:
        yield run
