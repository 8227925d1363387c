"""Storage servers for the tests, on 127.0.0.1: moto's S3 server, `rclone serve restic`,
and a fault-injecting HTTP proxy."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed ({package}); scripts/test.sh installs it as root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        handle = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args, stdout=handle, stderr=handle, env={**os.environ, **self.env}
        )
        _wait_http(f"http://127.0.0.1:{self.port}/", self.proc, self.log)


def start_moto(tmp: Path) -> Server:
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.skip("moto_server is not installed")
    port = free_port()
    log = tmp / "moto.log"
    args = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    _wait_http(f"http://127.0.0.1:{port}/", proc, log)
    return Server(proc, port, args, log)


def start_rclone_rest(tmp: Path, *extra: str, port: int | None = None) -> Server:
    rclone = _need("rclone", "Debian package rclone")
    port = port or free_port()
    log = tmp / f"rclone-{port}.log"
    root = tmp / f"rest-root-{port}"
    root.mkdir(parents=True, exist_ok=True)
    args = [rclone, "serve", "restic", "--addr", f"127.0.0.1:{port}", *extra, str(root)]
    proc = subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    _wait_http(f"http://127.0.0.1:{port}/", proc, log)
    return Server(proc, port, args, log)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 that, for a share of requests, answers 503 without
    forwarding, waits before forwarding, or cuts the connection in the middle of the
    response. One request per connection (it answers `Connection: close`)."""

    def __init__(
        self, upstream_port: int, rate: float = 0.1, seed: int = 7, delay: float = 0.3
    ) -> None:
        self.upstream = upstream_port
        self.rate = rate
        self.delay = delay
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"ok": 0, "fail": 0, "delay": 0, "cut": 0}
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _choose(self) -> str:
        with self.lock:
            roll = self.rng.random()
            kind = "ok"
            if roll < self.rate:
                kind = self.rng.choice(["fail", "delay", "cut"])
            self.counts[kind] += 1
            return kind

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = conn.recv(min(1 << 20, length - len(body)))
            if not chunk:
                return None
            body += chunk
        lines = [
            line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")
        ]
        return b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body

    def _handle(self, client: socket.socket) -> None:
        with client:
            request = self._read_request(client)
            if request is None:
                return
            kind = self._choose()
            if kind == "fail":
                client.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return
            if kind == "delay":
                time.sleep(self.delay)
            with socket.create_connection(("127.0.0.1", self.upstream)) as up:
                up.sendall(request)
                response = b""
                while True:
                    chunk = up.recv(1 << 20)
                    if not chunk:
                        break
                    response += chunk
            if kind == "cut":
                client.sendall(response[: max(1, len(response) // 2)])
                return  # closing mid-response
            client.sendall(response)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
