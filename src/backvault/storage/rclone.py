"""rclone remotes (Google Drive, OneDrive, Dropbox, … ~70 providers), the way restic reaches
them: it runs `rclone serve restic --stdio REMOTE:PATH` and speaks restic's REST protocol
over HTTP/2 on the child's standard input and output. No port is opened.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import threading
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from backvault.hardening import scrubbed_env
from backvault.storage.base import BackendSpec, StorageError
from backvault.storage.rest import RestBackend


class _PipeStream(httpcore.NetworkStream):
    """A byte stream over the rclone child's stdout (read) and stdin (write)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._in = proc.stdin
        self._out = proc.stdout.fileno()
        self._write_lock = threading.Lock()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            raise httpcore.ReadTimeout("rclone did not answer in time")
        data = os.read(self._out, max_bytes)
        if not data:
            raise httpcore.ReadError("rclone closed its output")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            with self._write_lock:
                self._in.write(buffer)
                self._in.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise httpcore.WriteError("rclone is gone") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._in.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("no TLS over a pipe")

    def get_extra_info(self, info: str) -> Any:
        return None


class _Http2OverPipe(httpx.BaseTransport):
    """httpx transport: HTTP/2 with prior knowledge over one pipe.

    Requests go one at a time, each read to its end before the next: with requests
    interleaved on one pipe, a thread blocked writing a large body can stop the reads that
    rclone's flow control is waiting for, and both sides wait forever.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._connection = httpcore.HTTP2Connection(
            origin=httpcore.Origin(b"http", b"localhost", 80), stream=_PipeStream(proc)
        )
        self._one_at_a_time = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=b"http", host=b"localhost", port=80, target=request.url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with self._one_at_a_time:
            try:
                response = self._connection.handle_request(core)
                assert isinstance(response.stream, Iterable)
                body = b"".join(response.stream)
            except httpcore.TimeoutException as exc:
                raise httpx.ReadTimeout(str(exc), request=request) from exc
            except httpcore.NetworkError as exc:
                raise httpx.ConnectError(str(exc), request=request) from exc
            except httpcore.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        return httpx.Response(status_code=response.status, headers=response.headers, content=body)

    def close(self) -> None:
        self._connection.close()


class RcloneBackend(RestBackend):
    def __init__(
        self,
        remote: str,
        extra_args: list[str] | None = None,
        timeout: float = 300.0,
        program: str = "rclone",
    ) -> None:
        self._options = {
            "remote": remote,
            "extra_args": extra_args,
            "timeout": timeout,
            "program": program,
        }
        binary = shutil.which(program)
        if binary is None:
            raise StorageError(
                "rclone is not installed: install it (Debian: apt install rclone) to use "
                "rclone: repositories"
            )
        args = [
            binary,
            "serve",
            "restic",
            "--stdio",
            "--b2-hard-delete",
            *(extra_args or []),
            remote,
        ]
        self._stderr = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the child
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            env=scrubbed_env(),  # rclone needs its own settings, none of our secrets
        )
        client = httpx.Client(transport=_Http2OverPipe(self._proc), timeout=timeout)
        super().__init__("http://localhost/", client, location=f"rclone:{remote}")

    def spec(self) -> BackendSpec:
        return BackendSpec(RcloneBackend, tuple(self._options.items()))

    def _request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        if self._proc.poll() is not None:
            message = (
                self._proc.stderr.read().decode(errors="replace").strip()
                if self._proc.stderr
                else ""
            )
            raise StorageError(
                f"rclone exited ({self._proc.returncode}): {message.splitlines()[-1] if message else 'no message'}"
            )
        return super()._request(method, url, **kwargs)

    def close(self) -> None:
        super().close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._stderr.close()
