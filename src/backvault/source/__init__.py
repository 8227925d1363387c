"""What to back up: consistent SQLite snapshots and plain files."""
