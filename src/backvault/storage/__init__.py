"""Storage backends: named objects in a restic repository layout, behind one interface."""

from .base import Backend, FileType, ObjectNotFound, StorageError
from .local import LocalBackend


def open_backend(location: str) -> Backend:
    """A backend for a repository location (a local path for now)."""
    if location.startswith(("s3:", "rest:", "rclone:", "sftp:", "b2:", "azure:", "gs:")):
        scheme = location.split(":", 1)[0]
        raise StorageError(
            f"the {scheme}: backend is not available in this version; use a local folder"
        )
    return LocalBackend(location.removeprefix("local:"))


__all__ = [
    "Backend",
    "FileType",
    "LocalBackend",
    "ObjectNotFound",
    "StorageError",
    "open_backend",
]
