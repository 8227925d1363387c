"""The engine: backup (archiver), restore (restorer), check and prune over an open repository."""
