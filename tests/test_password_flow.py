"""Password-protected backups end to end, through the CLI, with a real vault process on
loopback: turning it on, restoring on a new device, wrong passwords, both slots, changing,
checking, disabling, settings, schedules, an unreachable vault — and proof that nothing
derived from the password is stored anywhere."""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2.low_level import Type, hash_secret_raw

from backvault.crypto.keyfile import KeyFile, WrongSecret
from backvault.vaultclient.http import VaultClient
from tests.conftest import Cli, make_tree, tree_digest
from tests.servers import VaultNode, make_node

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a different long passphrase 42"


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultNode]:
    node = make_node(tmp_path / "vault", f"sqlite:///{tmp_path / 'vault' / 'vault.db'}").start()
    yield node
    node.stop()


@pytest.fixture
def phone(cli: Cli, vault: VaultNode, tmp_path: Path) -> Cli:
    token = vault.add_account("ana")
    cli.env.update(
        BACKVAULT_REPO=str(tmp_path / "repo"),
        BACKVAULT_VAULT_URL=vault.url,
        BACKVAULT_ACCOUNT="ana",
        BACKVAULT_VAULT_TOKEN=token,
    )
    return cli


def new_device(phone: Cli, tmp_path: Path, name: str = "new-phone") -> Cli:
    device = Cli(tmp_path / name)
    (tmp_path / name).mkdir()
    for key in (
        "BACKVAULT_REPO",
        "BACKVAULT_VAULT_URL",
        "BACKVAULT_ACCOUNT",
        "BACKVAULT_VAULT_TOKEN",
    ):
        device.env[key] = phone.env[key]
    return device


def with_password(password: str, **more: str) -> dict[str, str]:
    return {"BACKVAULT_PASSWORD": password, **more}


def test_turn_on_back_up_lose_the_phone_restore_with_the_password(
    phone: Cli, tmp_path: Path
) -> None:
    init = phone.ok("--json", "init", "--password", env=with_password(PASSWORD)).json()
    assert init["password_key_id"] and init["recovery_key"] and init["account"] == "ana"
    source = make_tree(tmp_path / "src")
    expected = tree_digest(source)
    phone.ok("backup", str(source))
    kinds = [k["kind"] for k in phone.ok("--json", "key", "list").json()]
    assert kinds[0] == "recovery key" and kinds[1].startswith("password (vault ")
    device = new_device(phone, tmp_path)
    target = tmp_path / "restored"
    device.ok("restore", "latest", "--target", str(target), env=with_password(PASSWORD))
    assert tree_digest(target / source.relative_to("/")) == expected
    # The new device now remembers the key: daily backups need no password.
    device.ok("snapshots")


def test_nothing_derived_from_the_password_is_stored(
    phone: Cli, vault: VaultNode, tmp_path: Path
) -> None:
    phone.ok("init", "--password", env=with_password(PASSWORD))
    source = make_tree(tmp_path / "src")
    phone.ok("backup", str(source))
    device = new_device(phone, tmp_path)
    device.ok("restore", "latest", "--target", str(tmp_path / "out"), env=with_password(PASSWORD))
    phone.ok("password", "check", env=with_password(PASSWORD))
    vault.stop()  # flush the vault's database files

    # No key file of the repository opens with the password.
    for path in (tmp_path / "repo" / "keys").iterdir():
        with pytest.raises(WrongSecret):
            KeyFile.from_bytes(path.read_bytes()).open(PASSWORD.encode())

    # Values derived from the password that an attacker could test guesses against.
    pw = PASSWORD.encode()
    derived = [pw, pw.hex().encode(), base64.b64encode(pw)]
    for name in ("md5", "sha1", "sha256", "sha512", "sha3_256", "blake2b"):
        digest = hashlib.new(name, pw).digest()
        derived += [digest, digest.hex().encode(), base64.b64encode(digest)]
    argon = hash_secret_raw(pw, bytes(16), 3, 65536, 4, 64, Type.ID)
    derived += [argon, argon.hex().encode()]
    vault_node = make_node(
        tmp_path / "vault2",
        f"sqlite:///{tmp_path / 'vault' / 'vault.db'}",
        "--sealing-key-file",
        str(vault.sealing_key),
    ).start()
    try:
        with VaultClient(vault_node.url, phone.env["BACKVAULT_VAULT_TOKEN"]) as vc:
            export_key = vc.login(pw).export_key  # what the password yields through OPAQUE
    finally:
        vault_node.stop()
    derived += [export_key, export_key.hex().encode(), base64.b64encode(export_key)]

    written = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and p.relative_to(tmp_path).parts[0] not in ("src", "out")
    ]
    places = {p.relative_to(tmp_path).parts[0] for p in written}
    assert {"repo", "vault", "home", "new-phone"} <= places, places  # repository, vault, devices
    assert any(p.name == "vault.db" for p in written)
    for path in written:
        data = path.read_bytes()
        lowered = data.lower()
        for value in derived:
            assert value not in data and value.lower() not in lowered, (
                f"{path} holds a value derived from the password"
            )


def test_wrong_passwords_count_down_warn_and_end_in_erasure(phone: Cli, tmp_path: Path) -> None:
    phone.ok(
        "--json", "init", "--password", "--max-attempts", "3", env=with_password(PASSWORD)
    ).json()
    recovery = phone.ok("--json", "key", "add").json()["recovery_key"]
    phone.ok("forget-device")
    first = phone.run("snapshots", env=with_password("not the password"))
    assert first.code == 10 and first.err.strip() == "backvault: wrong password — 2 attempts left"
    second = phone.run("snapshots", env=with_password("still not it"))
    assert second.code == 10
    assert "wrong password — 1 attempt left; careful: one more wrong password" in second.err
    third = phone.run("snapshots", env=with_password("nope nope nope"))
    assert "warning: this is the last attempt the vault allows" in third.err
    assert (
        third.err.strip()
        .splitlines()[-1]
        .startswith(
            "backvault: the vault has erased this key; restore with your 64-digit key if you have one"
        )
    )
    assert "choose a different one" in third.err
    assert third.code == 10
    again = phone.run("snapshots", env=with_password(PASSWORD))
    assert again.code == 10 and "the vault has erased this key" in again.err
    phone.ok("snapshots", key=recovery)  # the 64-digit key still works


def test_both_slots_and_removing_the_vault_slot_deletes_the_record(
    phone: Cli, tmp_path: Path
) -> None:
    phone.ok("init", "--password", env=with_password(PASSWORD))
    slots = phone.ok("--json", "key", "list").json()
    password_slot = next(s for s in slots if s["kind"].startswith("password"))
    with VaultClient(phone.env["BACKVAULT_VAULT_URL"], phone.env["BACKVAULT_VAULT_TOKEN"]) as vc:
        assert vc.status()["exists"] is True
        phone.ok("key", "remove", password_slot["id"][:8])
        assert vc.status()["exists"] is False
    assert [s["kind"] for s in phone.ok("--json", "key", "list").json()] == ["recovery key"]


def test_password_change_with_cached_key_recovery_key_or_current_password(
    phone: Cli, tmp_path: Path
) -> None:
    init = phone.ok("--json", "init", "--password", env=with_password(PASSWORD)).json()
    # 1. with this device's cached key
    phone.ok("password", "change", env={"BACKVAULT_NEW_PASSWORD": NEW_PASSWORD})
    phone.ok("forget-device")
    old = phone.run("snapshots", env=with_password(PASSWORD))
    assert old.code == 10 and "wrong password" in old.err
    phone.ok("snapshots", env=with_password(NEW_PASSWORD))
    # 2. with the current password on a device that holds no key
    phone.ok("forget-device")
    phone.ok("password", "change", env=with_password(NEW_PASSWORD, BACKVAULT_NEW_PASSWORD=PASSWORD))
    phone.ok("forget-device")
    phone.ok("snapshots", env=with_password(PASSWORD))
    # 3. with the 64-digit key
    phone.ok("forget-device")
    phone.ok(
        "password", "change", key=init["recovery_key"], env={"BACKVAULT_NEW_PASSWORD": NEW_PASSWORD}
    )
    phone.ok("forget-device")
    phone.ok("snapshots", env=with_password(NEW_PASSWORD))
    kinds = [s["kind"] for s in phone.ok("--json", "key", "list").json()]
    assert sorted(k.split(" ")[0] for k in kinds) == ["password", "recovery"]  # old slots removed


def test_password_check_and_disable(phone: Cli) -> None:
    phone.ok("init", "--password", env=with_password(PASSWORD))
    wrong = phone.run("password", "check", env=with_password("bad guess here"))
    assert wrong.code == 10 and "9 attempts left" in wrong.err
    assert "counts as one until it succeeds" in wrong.out
    good = phone.ok("password", "check", env=with_password(PASSWORD))
    assert "allows 10 wrong guesses now" in good.out
    assert "1 of this device's wrong tries forgiven" in good.out
    phone.ok("password", "disable")
    with VaultClient(phone.env["BACKVAULT_VAULT_URL"], phone.env["BACKVAULT_VAULT_TOKEN"]) as vc:
        assert vc.status()["exists"] is False
    assert [s["kind"] for s in phone.ok("--json", "key", "list").json()] == ["recovery key"]


def test_password_only_repository_and_refusals(phone: Cli, tmp_path: Path) -> None:
    weak = phone.run("init", "--password", env=with_password("123456"))
    assert weak.code == 2 and "too easy to guess" in weak.err
    short = phone.run("init", "--password", env=with_password("abc"))
    assert short.code == 2 and "at least 6 characters" in short.err
    doc = phone.ok(
        "--json", "init", "--password", "--no-recovery-key", env=with_password(PASSWORD)
    ).json()
    assert doc["recovery_key"] is None and doc["password_key_id"]
    assert [s["kind"].split(" ")[0] for s in phone.ok("--json", "key", "list").json()] == [
        "password"
    ]
    refused = phone.run("password", "disable")
    assert refused.code == 1 and "only key" in refused.err


def test_unreachable_vault_restore_fails_clearly_and_daily_backup_still_runs(
    phone: Cli, vault: VaultNode, tmp_path: Path
) -> None:
    phone.ok("init", "--password", env=with_password(PASSWORD))
    source = make_tree(tmp_path / "src")
    vault.stop()
    phone.ok("backup", str(source))  # the cached key needs no vault
    device = new_device(phone, tmp_path)
    result = device.run(
        "restore", "latest", "--target", str(tmp_path / "out"), env=with_password(PASSWORD)
    )
    assert result.code == 13
    assert result.err.strip() == (
        f"backvault: cannot reach the vault at {phone.env['BACKVAULT_VAULT_URL']}; check the "
        "network and try again, or restore with your 64-digit key"
    )


# `backvault password check` in a child process whose vault dies the moment it has counted
# the login: between the login's start (the right password's KE1) and its finish.
KILL_THE_VAULT_MID_LOGIN = """
import os, signal, sys, time
from backvault.vaultclient import http

started = http.VaultClient.login_start


def login_start(self, ke1):
    answer = started(self, ke1)
    pid = int(os.environ["VAULT_PID"])
    os.kill(pid, signal.SIGKILL)
    while os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read():
        time.sleep(0.01)
    return answer


http.VaultClient.login_start = login_start
from backvault.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_vault_outage_in_the_middle_of_password_check_is_reported_as_an_outage(
    phone: Cli, vault: VaultNode
) -> None:
    phone.ok("init", "--password", env=with_password(PASSWORD))
    assert vault.proc is not None
    result = subprocess.run(
        [sys.executable, "-c", KILL_THE_VAULT_MID_LOGIN, "password", "check"],
        capture_output=True,
        text=True,
        env={**phone.env, **with_password(PASSWORD), "VAULT_PID": str(vault.proc.pid)},
        timeout=120,
    )
    assert vault.proc.poll() is not None, "the vault was killed mid-login"
    assert result.returncode == 13, result.stderr
    assert result.stderr.strip() == (
        f"backvault: cannot reach the vault at {phone.env['BACKVAULT_VAULT_URL']}; check the "
        "network and try again, or restore with your 64-digit key"
    )
    assert "internal error" not in result.stderr
    # The other vault commands say the same, through the same exit-code table.
    for command in (("password", "check"), ("password", "disable")):
        other = phone.run(*command, env=with_password(PASSWORD))
        assert (other.code, other.err) == (13, result.stderr), command


def test_settings_file_and_overrides(cli: Cli, tmp_path: Path) -> None:
    cli.ok("config", "set", "repository", str(tmp_path / "from-file"))
    cli.ok("config", "set", "vault.url", "https://vault.example")
    stored = subprocess.run(
        [sys.executable, "-m", "backvault.cli", "config", "set", "vault.token", "-"],
        input="bvt_secret_token_value\n",
        env=cli.env,
        capture_output=True,
        text=True,
    )
    assert stored.returncode == 0, stored.stderr
    path = cli.home / "config" / "config.toml"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert "bvt_secret" not in path.read_text()  # the token lives in the keyring (or its file)
    shown = cli.ok("--json", "config").json()
    assert shown["repository"] == str(tmp_path / "from-file") and shown["vault.token"] == "<hidden>"
    over = cli.ok(
        "--json", "--repo", "/flag/repo", "config", env={"BACKVAULT_VAULT_URL": "https://env"}
    ).json()
    assert over["repository"] == "/flag/repo" and over["sources"]["repository"] == "flag"
    assert (
        over["vault.url"] == "https://env"
        and over["sources"]["vault.url"] == "$BACKVAULT_VAULT_URL"
    )
    cli.ok("config", "unset", "vault.url")
    assert cli.ok("--json", "config").json()["vault.url"] is None
    bad = cli.run("config", "set", "colour", "blue")
    assert bad.code == 2 and "unknown setting 'colour'" in bad.err
    # The repository from the file is used when no flag or variable names one.
    cli.ok("init")
    assert (tmp_path / "from-file" / "config").exists()


def test_schedule_install_writes_a_systemd_timer_or_a_cron_line(
    cli: Cli, repo: object, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src")
    repo_path = str(tmp_path / "repo")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    if shutil.which("systemctl"):
        result = cli.ok(
            "--json", "-r", repo_path, "schedule", "install", str(source), "--at", "02:30", env=env
        ).json()
        assert result["how"] == "systemd"
        # Private: the command names the repository, whose URL may hold a password.
        assert all(Path(f).stat().st_mode & 0o077 == 0 for f in result["files"])
        service = Path(result["files"][0]).read_text()
        timer = Path(result["files"][1]).read_text()
        assert f"backup {source}" in service and "--repo " + repo_path in service
        assert "OnCalendar=*-*-* 02:30:00" in timer and "Persistent=true" in timer
        if shutil.which("systemd-analyze"):
            check = subprocess.run(
                ["systemd-analyze", "verify", *result["files"]], capture_output=True, text=True
            )
            assert "error" not in check.stderr.lower() or "Failed to" in check.stderr, check.stderr
        removed = cli.ok("--json", "schedule", "remove", env=env).json()["removed"]
        assert len(removed) == 2 and not Path(result["files"][0]).exists()
    cron = cli.ok(
        "--json", "-r", repo_path, "schedule", "install", str(source), "--cron", env=env
    ).json()
    assert cron["how"] == "cron" and cron["cron_line"].startswith("0 3 * * * ")
    line = cron["cron_line"]
    assert " backup " in line and str(source) in line
    # The scheduled command really runs a backup with the cached key, no password.
    command = line.split(" ", 5)[5].removesuffix(" >/dev/null 2>&1")
    run = subprocess.run(
        shlex.split(command), env={**cli.env, **env}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert len(cli.ok("--json", "-r", repo_path, "snapshots").json()) == 1


def test_schedule_needs_a_cached_key(cli: Cli, repo: object, tmp_path: Path) -> None:
    cli.ok("-r", str(tmp_path / "repo"), "forget-device")
    refused = cli.run("-r", str(tmp_path / "repo"), "schedule", "install", str(tmp_path), "--cron")
    assert refused.code == 1 and "holds no key" in refused.err


def _run_on_terminal(
    argv: list[str], env: dict[str, str], answers: list[tuple[str, str]], timeout: float = 60
) -> tuple[int, str]:
    """Run a command on a pseudo-terminal, answering each prompt as it appears."""
    import pty
    import select
    import sys
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execve(sys.executable, [sys.executable, "-m", "backvault.cli", *argv], env)  # noqa: S606
    output = ""
    pending = list(answers)
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if pending and pending[0][0] in output.split("\n")[-1]:
            os.write(fd, (pending.pop(0)[1] + "\n").encode())
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_password_prompts_on_a_terminal(phone: Cli, tmp_path: Path) -> None:
    env = {k: v for k, v in phone.env.items() if k != "BACKVAULT_PASSWORD"}
    code, out = _run_on_terminal(
        ["init", "--password"],
        env,
        [
            ("New password", "password"),
            ("New password", PASSWORD),
            ("Repeat", "typo " + PASSWORD),
            ("New password", PASSWORD),
            ("Repeat", PASSWORD),
        ],
    )
    assert code == 0, out
    assert "too easy to guess" in out and "the two passwords differ" in out
    assert "password strength:" in out and PASSWORD not in out  # never echoed
    phone.ok("forget-device")
    code, out = _run_on_terminal(["snapshots"], env, [("Password", PASSWORD)])
    assert code == 0, out
    assert "0 snapshots" in out
