"""Real servers for the tests, all on 127.0.0.1: a throwaway PostgreSQL cluster, a
SoftHSM2 token, and vault nodes run as `backvault vault serve` subprocesses."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _missing(what: str) -> None:
    message = f"{what} is not installed; scripts/test.sh installs it when run as root"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# --- PostgreSQL ----------------------------------------------------------------------


@dataclass
class Postgres:
    url: str
    dump: list[str]  # command prefix for pg_dump
    createdb: list[str]

    def new_database(self, name: str) -> str:
        subprocess.run([*self.createdb, name], check=True, capture_output=True)
        return self.url.rsplit("/", 1)[0] + "/" + name

    def dump_database(self, url: str) -> bytes:
        name = url.rsplit("/", 1)[1]
        return subprocess.run([*self.dump[:-1], name], check=True, capture_output=True).stdout


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        _missing("PostgreSQL")
    return str(path)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    base = Path(tempfile.mkdtemp(prefix="backvault-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        pg = pwd.getpwnam("postgres")
        os.chmod(base, 0o755)
        os.chown(base, pg.pw_uid, pg.pw_gid)
        as_user = ["setpriv", f"--reuid={pg.pw_uid}", f"--regid={pg.pw_gid}", "--init-groups"]
    data = base / "data"
    port = free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "vault", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        env=env,
    )
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} -c max_connections=300 -c fsync=on"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        createdb = [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vault"]
        subprocess.run([*createdb, "vault"], check=True, capture_output=True)
        yield Postgres(
            f"postgresql://vault@127.0.0.1:{port}/vault",
            [_pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(port), "-U", "vault", "vault"],
            createdb,
        )
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


# --- SoftHSM2 --------------------------------------------------------------------------


@dataclass
class SoftHsm:
    env: dict[str, str]
    token_label: str
    pin_file: Path
    pin: str = "4321"


@contextlib.contextmanager
def softhsm_token(tmp: Path, ceremony: bool = True) -> Iterator[SoftHsm]:
    """A fresh SoftHSM2 token; ``ceremony`` also creates the vault's sealing key in it
    (`backvault vault init-hsm`), as an operator does once."""
    if not os.path.exists(SOFTHSM_MODULE) or shutil.which("softhsm2-util") is None:
        _missing("SoftHSM2 (Debian package softhsm2)")
    (tmp / "tokens").mkdir(parents=True)
    conf = tmp / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "backvault-test",
            "--pin",
            "4321",
            "--so-pin",
            "87654321",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    pin_file = tmp / "pin"
    pin_file.write_text("4321\n")
    os.chmod(pin_file, 0o600)
    # The key ceremony: create the sealing key once, before any node starts.
    if not ceremony:
        yield SoftHsm(env, "backvault-test", pin_file)
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "backvault.cli",
            "vault",
            "init-hsm",
            "--sealing",
            "pkcs11",
            "--pkcs11-token-label",
            "backvault-test",
            "--pkcs11-pin-file",
            str(pin_file),
            "--data-dir",
            str(tmp / "unused"),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    yield SoftHsm(env, "backvault-test", pin_file)


@contextlib.contextmanager
def softhsm_in_this_process(token: SoftHsm) -> Iterator[SoftHsm]:
    """Point this process's SoftHSM2 at ``token``: PKCS#11 is initialised once per
    process and reads SOFTHSM2_CONF then, so initialise it again."""
    import pkcs11

    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ.update(token.env)
    pkcs11.lib(SOFTHSM_MODULE).reinitialize()
    try:
        yield token
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


# --- vault nodes -------------------------------------------------------------------------


@dataclass
class VaultNode:
    args: list[str]
    env: dict[str, str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sealing_key(self) -> Path:
        """The default sealing key file (under the node's XDG_CONFIG_HOME)."""
        return Path(self.env["XDG_CONFIG_HOME"]) / "backvault-vault" / "sealing.key"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "backvault.cli", "vault", *args]

    def start(self) -> VaultNode:
        handle = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            self.command("serve", "--listen", f"127.0.0.1:{self.port}", *self.args),
            env=self.env,
            stdout=handle,
            stderr=handle,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vault exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"vault did not become ready: {self.log.read_text()[-2000:]}")

    def add_account(self, name: str) -> str:
        out = subprocess.run(
            self.command("add-account", *self.args, name),
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def make_node(tmp: Path, db: str, *extra: str, env: dict[str, str] | None = None) -> VaultNode:
    tmp.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        "HOME": str(tmp),
        "XDG_CONFIG_HOME": str(tmp / "config"),
        "XDG_DATA_HOME": str(tmp / "share"),
        "BACKVAULT_SERVER_RATE_PER_IP_PER_MINUTE": "0",
        "BACKVAULT_SERVER_RATE_PER_ACCOUNT_PER_MINUTE": "0",
        **(env or {}),
    }
    args = ["--db", db, "--data-dir", str(tmp / "data"), *extra]
    port = free_port()
    return VaultNode(args, full_env, port, tmp / f"vault-{port}.log")
