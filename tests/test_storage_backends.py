"""Every storage backend against a real server on loopback: moto's S3 server, `rclone serve
restic` (plain and append-only, and with credentials), rclone remotes over --stdio; stock
restic reads what we wrote there; faults, a dying server and bad credentials."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backvault.storage import FileType, StorageAccessDenied, open_backend
from tests.conftest import Cli, make_tree, require_restic, tree_digest
from tests.storage_servers import S3_ENV, FaultProxy, Server, start_moto, start_rclone_rest


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_rclone_rest(tmp_path_factory.mktemp("rest"))
    yield server
    server.stop()


def restic(
    location: str, key: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    binary = require_restic()
    full = {**os.environ, "RESTIC_PASSWORD": key, **(env or {})}
    return subprocess.run(
        [binary, "-r", location, *args], capture_output=True, text=True, env=full, timeout=600
    )


def round_trip(cli: Cli, location: str, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """init, backup, restore through backvault; returns the recovery key."""
    source = make_tree(tmp_path / "src")
    expected = tree_digest(source)
    key = cli.ok("--json", "-r", location, "init", env=env).json()["recovery_key"]
    cli.ok("-r", location, "backup", str(source), env=env)
    (source / "notes.txt").write_text("second day\n")
    expected = tree_digest(source)
    cli.ok("-r", location, "backup", str(source), env=env)
    target = tmp_path / "restored"
    cli.ok("-r", location, "restore", "latest", "--target", str(target), env=env)
    assert tree_digest(target / source.relative_to("/")) == expected
    cli.ok("-r", location, "check", "--read-data", env=env)
    return str(key)


def test_s3_backend_and_stock_restic(cli: Cli, moto: Server, tmp_path: Path) -> None:
    location = f"s3:http://127.0.0.1:{moto.port}/bucket-{os.getpid()}/chat/repo"
    key = round_trip(cli, location, tmp_path, S3_ENV)
    checked = restic(location, key, "check", "--read-data", env=S3_ENV)
    assert checked.returncode == 0 and "no errors were found" in checked.stdout, checked.stderr
    out = tmp_path / "by-restic"
    assert (
        restic(location, key, "restore", "latest", "--target", str(out), env=S3_ENV).returncode == 0
    )
    assert tree_digest(out / (tmp_path / "src").relative_to("/")) == tree_digest(tmp_path / "src")


def test_s3_multipart_upload_of_a_large_pack(moto: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    backend = open_backend(f"s3:http://127.0.0.1:{moto.port}/multipart/repo")
    backend.create()
    data = os.urandom(20 * 1024 * 1024)  # over the 8 MiB multipart threshold
    backend.save(FileType.DATA, "ab" * 32, data)
    assert backend.stat(FileType.DATA, "ab" * 32) == len(data)
    assert backend.load(FileType.DATA, "ab" * 32, 10_000_000, 100) == data[10_000_000:10_000_100]
    assert backend.load(FileType.DATA, "ab" * 32, -4) == data[-4:]
    assert [n for n, _ in backend.list(FileType.DATA)] == ["ab" * 32]
    backend.close()


def test_rest_backend_and_stock_restic(cli: Cli, rest: Server, tmp_path: Path) -> None:
    location = f"rest:http://127.0.0.1:{rest.port}/repo-{os.getpid()}"
    key = round_trip(cli, location, tmp_path)
    checked = restic(location, key, "check", "--read-data")
    assert checked.returncode == 0 and "no errors were found" in checked.stdout, checked.stderr
    out = tmp_path / "by-restic"
    assert restic(location, key, "restore", "latest", "--target", str(out)).returncode == 0
    assert tree_digest(out / (tmp_path / "src").relative_to("/")) == tree_digest(tmp_path / "src")


def test_rclone_remote_over_stdio(cli: Cli, tmp_path: Path) -> None:
    if not __import__("shutil").which("rclone"):
        pytest.skip("rclone is not installed")
    env = {"RCLONE_CONFIG_MYDRIVE_TYPE": "local"}  # stands in for Google Drive & co
    location = f"rclone:mydrive:{tmp_path / 'drive' / 'backups'}"
    key = round_trip(cli, location, tmp_path, env)
    assert (tmp_path / "drive" / "backups" / "config").exists()
    # Several full 16 MiB packs through one pipe (large bodies once deadlocked HTTP/2 flow
    # control when requests were interleaved).
    big = tmp_path / "big"
    big.mkdir()
    for i in range(12):
        (big / f"clip{i}.mp4").write_bytes(os.urandom(5 * 1024 * 1024))
    cli.ok("-r", location, "backup", str(big), env=env, timeout=300)
    checked = restic(location, key, "check", "--read-data", env=env)
    assert checked.returncode == 0, checked.stderr


def test_append_only_rest_server(cli: Cli, tmp_path: Path) -> None:
    server = start_rclone_rest(tmp_path, "--append-only")
    try:
        location = f"rest:http://127.0.0.1:{server.port}/ao"
        cli.ok("--json", "-r", location, "init")
        source = make_tree(tmp_path / "src")
        cli.ok("-r", location, "backup", str(source))
        cli.ok("-r", location, "backup", str(source))  # locks can still be removed
        added = cli.ok("--json", "-r", location, "key", "add").json()
        refused = cli.run("-r", location, "key", "remove", added["key_id"][:8])
        assert refused.code == 1
        assert "refuses to delete (append-only storage)" in refused.err
        assert len(refused.err.strip().splitlines()) == 1
    finally:
        server.stop()


def test_wrong_credentials_are_not_retried(cli: Cli, tmp_path: Path) -> None:
    server = start_rclone_rest(tmp_path, "--user", "ana", "--pass", "right-secret")
    try:
        good = f"rest:http://ana:right-secret@127.0.0.1:{server.port}/r"
        cli.ok("-r", good, "init")
        bad = f"rest:http://ana:wrong@127.0.0.1:{server.port}/r"
        started = time.monotonic()
        result = cli.run("-r", bad, "snapshots")
        assert time.monotonic() - started < 10  # no backoff loop on a refusal
        assert result.code == 1 and "refused the credentials (HTTP 401)" in result.err
        backend = open_backend(bad)
        with pytest.raises(StorageAccessDenied):
            backend.exists()
        assert getattr(backend, "retries", 0) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_200_mb_backup_through_a_proxy_that_fails_delays_or_cuts_10_percent(
    cli: Cli, rest: Server, tmp_path: Path
) -> None:
    proxy = FaultProxy(rest.port, rate=0.10)
    try:
        location = f"rest:http://127.0.0.1:{proxy.port}/faulty-{os.getpid()}"
        key = cli.ok("--json", "-r", location, "init").json()["recovery_key"]
        source = tmp_path / "big"
        source.mkdir()
        for i in range(25):
            (source / f"video{i}.mp4").write_bytes(os.urandom(8 * 1024 * 1024))
        cli.ok("-r", location, "backup", str(source), timeout=900)
        assert proxy.counts["fail"] and proxy.counts["cut"] and proxy.counts["delay"], proxy.counts
        direct = f"rest:http://127.0.0.1:{rest.port}/faulty-{os.getpid()}"
        checked = restic(direct, key, "check", "--read-data")
        assert checked.returncode == 0 and "no errors were found" in checked.stdout, checked.stderr
        out = tmp_path / "out"
        cli.ok("-r", location, "restore", "latest", "--target", str(out), timeout=900)
        assert tree_digest(out / source.relative_to("/")) == tree_digest(source)
    finally:
        proxy.close()


def test_server_killed_during_a_backup_then_the_rerun_completes(cli: Cli, tmp_path: Path) -> None:
    server = start_rclone_rest(tmp_path)
    location = f"rest:http://127.0.0.1:{server.port}/dies"
    env = {"BACKVAULT_RETRY_ATTEMPTS": "3"}
    try:
        key = cli.ok("--json", "-r", location, "init").json()["recovery_key"]
        small = make_tree(tmp_path / "small")
        cli.ok("-r", location, "backup", str(small))
        big = tmp_path / "big"
        big.mkdir()
        for i in range(24):
            (big / f"clip{i}.mp4").write_bytes(os.urandom(4 * 1024 * 1024))
        proc = cli.popen("-r", location, "backup", str(big))
        root = tmp_path / f"rest-root-{server.port}" / "dies" / "data"
        deadline = time.time() + 60
        while time.time() < deadline and len([p for p in root.rglob("*") if p.is_file()]) < 2:
            time.sleep(0.05)
        server.kill()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        message = err.strip().splitlines()[-1]
        assert (
            "kept failing" in message
            and "connection failed" in message
            and "run the command again" in message
        )
        server.restart()
        cli.ok("-r", location, "backup", str(big), env=env)
        snaps = cli.ok("--json", "-r", location, "snapshots").json()
        assert len(snaps) == 2
        checked = restic(location, key, "check", "--read-data")
        assert checked.returncode == 0, checked.stderr
    finally:
        server.stop()
