"""restic's REST protocol (v2), as spoken by rest-server and `rclone serve restic`.

POST /?create=true                create a repository
HEAD|GET|POST /config             the config object
GET  /{type}/                     list (v2: JSON [{"name", "size"}])
HEAD|GET|POST|DELETE /{type}/{name}   one object; GET takes a Range header
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from backvault.storage.base import (
    Backend,
    BackendSpec,
    FileType,
    ObjectNotFound,
    StorageAccessDenied,
    StorageError,
    StorageRefused,
    TransientStorageError,
    without_password,
)

V2 = "application/vnd.x.restic.rest.v2"


# The password runs to the LAST "@" before the path: it may itself hold "@" or spaces.
class RestBackend(Backend):
    def __init__(
        self,
        base_url: str,
        client: httpx.Client | None = None,
        location: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.base = base_url.rstrip("/") + "/"
        self.location = location or f"rest:{self.base}"
        # What messages say: the location without the password a URL may carry.
        self.shown = without_password(self.location)
        self._http = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=15.0))
        self._timeout = timeout

    def spec(self) -> BackendSpec:
        # A worker opens a client of its own (a client given here cannot cross processes).
        options = {"base_url": self.base, "location": self.location, "timeout": self._timeout}
        return BackendSpec(RestBackend, tuple(options.items()))

    def _url(self, kind: FileType, name: str = "") -> str:
        if kind is FileType.CONFIG:
            return self.base + "config"
        return f"{self.base}{kind.value}/{name}"

    def _request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.TimeoutException as exc:
            raise TransientStorageError(
                f"{self.shown}: timed out ({method} {without_password(url)})"
            ) from exc
        except httpx.TransportError as exc:
            raise TransientStorageError(
                f"{self.shown}: connection failed: {without_password(str(exc))}"
            ) from exc
        status = response.status_code
        if status == 403 and method == "DELETE":
            raise StorageRefused(
                f"{self.shown} refuses to delete (append-only storage): prune and forget "
                "cannot run there; run them against the storage directly"
            )
        if status in (401, 403):
            raise StorageAccessDenied(
                f"{self.shown} refused the credentials (HTTP {status}); check the user and "
                "password in the URL or the server's configuration"
            )
        if status == 404:
            raise ObjectNotFound(f"{url.removeprefix(self.base)} is missing from the repository")
        if status == 416:  # range beyond the end: an empty read
            return response
        if status >= 500 or status in (408, 429):
            raise TransientStorageError(
                f"{self.shown}: HTTP {status} for {method} {without_password(url)}"
            )
        if status >= 400:
            raise StorageError(
                f"{self.shown}: HTTP {status} for {method} {without_password(url)}: "
                f"{response.text[:200]}"
            )
        return response

    def create(self) -> None:
        if self.exists():
            raise StorageError(f"a repository already exists at {self.shown}")
        self._request("POST", self.base + "?create=true")

    def exists(self) -> bool:
        try:
            self._request("HEAD", self._url(FileType.CONFIG))
        except ObjectNotFound:
            return False
        return True

    def save(self, kind: FileType, name: str, data: bytes) -> None:
        response = self._request(
            "POST",
            self._url(kind, name),
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        del response

    def load(self, kind: FileType, name: str, offset: int = 0, length: int | None = None) -> bytes:
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            if offset < 0:
                headers["Range"] = f"bytes={offset}"
            else:
                headers["Range"] = f"bytes={offset}-{end}"
        response = self._request("GET", self._url(kind, name), headers=headers)
        if response.status_code == 416:
            return b""
        data = response.content
        if response.status_code == 200 and (offset or length is not None) and offset >= 0:
            # A server that ignores Range sends everything: cut what was asked for.
            data = data[offset : None if length is None else offset + length]
        return data

    def stat(self, kind: FileType, name: str) -> int:
        response = self._request("HEAD", self._url(kind, name))
        return int(response.headers.get("Content-Length", "0"))

    def list(self, kind: FileType) -> Iterator[tuple[str, int]]:
        if kind is FileType.CONFIG:
            if self.exists():
                yield "config", self.stat(FileType.CONFIG, "config")
            return
        try:
            response = self._request("GET", self._url(kind), headers={"Accept": V2})
        except ObjectNotFound:
            return
        doc = response.json()
        for entry in doc:
            if isinstance(entry, dict):
                yield str(entry["name"]), int(entry["size"])
            else:  # a v1 server lists names only
                yield str(entry), self.stat(kind, str(entry))

    def remove(self, kind: FileType, name: str) -> None:
        self._request("DELETE", self._url(kind, name))

    def close(self) -> None:
        self._http.close()
