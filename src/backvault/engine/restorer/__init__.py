"""Restoring a snapshot into a folder (see ``restorer`` for how, and why so).

- ``restorer``: ``Restorer``: the target, the plan, the walk, folders and other entries
- ``selection``: include patterns, and a file's blobs grouped into runs
- ``files``: writing files on the workers (``restore_runs``), hard links
- ``staging``: the staging folders, and putting an entry in place
- ``metadata``: owner, mode and times
- ``common``: the result, errors and jobs the parts share
"""

from backvault.engine.errors import DiskFull, NotEnoughSpace, TargetNotEmpty
from backvault.engine.restorer.common import (
    MAX_LISTED,
    MAX_LISTED_PATH,
    EntryRefused,
    RestoreResult,
)
from backvault.engine.restorer.files import RunNotWritten, restore_runs
from backvault.engine.restorer.restorer import Restorer
from backvault.engine.restorer.selection import could_contain_match, matches
from backvault.engine.restorer.staging import STAGING_PREFIX
from backvault.engine.walk import TooManyEntries

__all__ = [
    "MAX_LISTED",
    "MAX_LISTED_PATH",
    "STAGING_PREFIX",
    "DiskFull",
    "EntryRefused",
    "NotEnoughSpace",
    "RestoreResult",
    "Restorer",
    "RunNotWritten",
    "TargetNotEmpty",
    "TooManyEntries",
    "could_contain_match",
    "matches",
    "restore_runs",
]
