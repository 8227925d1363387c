"""Backing up paths into a repository as a restic snapshot.

- ``walk``: what a file-system entry becomes in a tree, and the layout above the targets
- ``files_cache``: what need not be read again (unchanged files, the SQLite state cache)
- ``databases``: consistent copies of live SQLite databases, on a thread of their own
- ``pipeline``: file data to sealed chunks (workers) to packs (the packer thread)
- ``archiver``: ``Backup``, which walks the targets and writes the snapshot
"""

from backvault.engine.archiver.archiver import Backup, BackupResult

__all__ = ["Backup", "BackupResult"]
