"""Storage backends: named objects in a restic repository layout, behind one interface.

Locations use restic's syntax: a folder path (or ``local:PATH``), ``s3:URL/BUCKET/PATH``,
``rest:URL``, ``rclone:REMOTE:PATH``.

A new backend subclasses ``Backend`` (``base``): the object operations, a ``spec()`` to
reopen it in a worker process, and ``capabilities`` if it can do more than the interface
(``direct_file_io``), and ``spool`` if it can write an object a part at a time;
``open_backend`` maps its location prefix to it. Wrappers that add
behaviour around any backend (retries, fault injection) subclass ``BackendWrapper``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from backvault.storage.base import (
    Backend,
    BackendSpec,
    BackendWrapper,
    Capabilities,
    FileType,
    ObjectNotFound,
    RangeReader,
    Spool,
    StorageAccessDenied,
    StorageError,
    StorageRefused,
    TransientStorageError,
    without_password,
)
from backvault.storage.local import LocalBackend

UNSUPPORTED = ("sftp:", "b2:", "azure:", "gs:", "swift:")


# How often a transient failure is tried, and the rclone program: see configure().
_retry_attempts = 8
_rclone_program = "rclone"


def configure(*, retry_attempts: int = 8, rclone: str = "rclone") -> None:
    """The client's settings (``BACKVAULT_RETRY_ATTEMPTS``, ``BACKVAULT_RCLONE``, read by
    device.settings), for the backends ``open_backend`` opens from now on."""
    global _retry_attempts, _rclone_program
    _retry_attempts, _rclone_program = max(1, retry_attempts), rclone


def _retrying(inner: Backend, connections: int = 4) -> Backend:
    from backvault.storage.retry import RetryingBackend

    return RetryingBackend(inner, attempts=_retry_attempts, connections=connections)


def open_backend(location: str) -> Backend:
    """A backend for a repository location (remote ones wrapped in retries)."""
    backend = _open_backend(location)
    kill_after = os.environ.get("BACKVAULT_FAULT_KILL_AFTER_WRITES")
    if kill_after:
        from backvault.storage.faults import KillAfterWrites

        return KillAfterWrites(backend, int(kill_after))
    return backend


def open_backend_from_spec(spec: BackendSpec) -> Backend:
    """The same backend stack ``open_backend`` built (wrappers included), opened again from
    its ``Backend.spec()``: what a worker process uses."""
    return spec.open()


def _open_backend(location: str) -> Backend:
    if location.startswith(UNSUPPORTED):
        scheme = location.split(":", 1)[0]
        raise StorageError(
            f"the {scheme}: backend is not built in; reach it through rclone "
            f"(rclone:REMOTE:PATH) or use s3:, rest: or a local folder"
        )
    if location.startswith("s3:"):
        from backvault.storage.s3 import S3Backend

        rest = location[3:]
        if "://" not in rest:
            rest = "https://" + rest
        parts = urlsplit(rest)
        bucket, _, prefix = parts.path.lstrip("/").partition("/")
        if not bucket:
            raise StorageError(f"{location}: expected s3:https://HOST[:PORT]/BUCKET[/PATH]")
        endpoint = f"{parts.scheme}://{parts.netloc}"
        return _retrying(S3Backend(endpoint, bucket, prefix, location))
    if location.startswith("rest:"):
        from backvault.storage.rest import RestBackend

        url = location[5:]
        if not url.startswith(("http://", "https://")):
            raise StorageError(f"{location}: expected rest:http(s)://HOST[:PORT]/PATH")
        return _retrying(RestBackend(url, location=location))
    if location.startswith("rclone:"):
        from backvault.storage.rclone import RcloneBackend

        remote = location[7:]
        if ":" not in remote:
            raise StorageError(f"{location}: expected rclone:REMOTE:PATH")
        return _retrying(RcloneBackend(remote, program=_rclone_program), connections=2)
    return LocalBackend(location.removeprefix("local:"))


__all__ = [
    "Backend",
    "BackendSpec",
    "BackendWrapper",
    "Capabilities",
    "FileType",
    "LocalBackend",
    "ObjectNotFound",
    "RangeReader",
    "Spool",
    "StorageAccessDenied",
    "StorageError",
    "StorageRefused",
    "TransientStorageError",
    "open_backend",
    "open_backend_from_spec",
    "without_password",
]
