"""Issue 12, section 6: what the client lets slip, tried as an attacker would.

- the storage provider reads key files: they must name no account, vault or device;
- a network attacker sits between the client and an `http://` vault;
- other local users read process lists (argv) and world-readable /tmp;
- child processes (rclone, worker processes, systemctl) inherit the environment;
- a crash writes a core dump holding the keys;
- a repr() of a secret-holding object ends up in a log or a traceback.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, InitRepo, make_tree, require_restic, tree_digest
from tests.servers import VaultNode, make_node

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a different long passphrase 42"
ACCOUNT = "ana-from-the-chat-service"


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultNode]:
    node = make_node(tmp_path / "vault", f"sqlite:///{tmp_path / 'vault' / 'vault.db'}").start()
    yield node
    node.stop()


@pytest.fixture
def phone(cli: Cli, vault: VaultNode, tmp_path: Path) -> Cli:
    cli.env.update(
        BACKVAULT_REPO=str(tmp_path / "repo"),
        BACKVAULT_VAULT_URL=vault.url,
        BACKVAULT_ACCOUNT=ACCOUNT,
        BACKVAULT_VAULT_TOKEN=vault.add_account(ACCOUNT),
    )
    return cli


def new_device(phone: Cli, tmp_path: Path, name: str) -> Cli:
    (tmp_path / name).mkdir()
    device = Cli(tmp_path / name)
    for key in ("BACKVAULT_REPO", "BACKVAULT_VAULT_URL", "BACKVAULT_ACCOUNT"):
        device.env[key] = phone.env[key]
    device.env["BACKVAULT_VAULT_TOKEN"] = phone.env["BACKVAULT_VAULT_TOKEN"]
    return device


def run_with_stdin(cli: Cli, stdin: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "backvault.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**cli.env, **(env or {})},
        timeout=120,
    )


def run_on_terminal(
    argv: list[str],
    env: dict[str, str],
    answers: list[tuple[str, str]],
    at_prompt: Any = None,
    timeout: float = 60,
) -> tuple[int, str]:
    """Run a command on a pseudo-terminal, answering each prompt as it appears;
    ``at_prompt(pid)`` runs once, while the process waits at its first prompt."""
    import pty
    import select

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
            if at_prompt is not None:
                at_prompt(pid)
                at_prompt = None
            os.write(fd, (pending.pop(0)[1] + "\n").encode())
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


# --- key files name no account, vault or device ----------------------------------------


def key_documents(repo: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_bytes()) for p in (repo / "keys").iterdir()}


def restic_run(repo: Path, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RESTIC_PASSWORD": password, "RESTIC_CACHE_DIR": str(repo.parent / "rc")}
    proc = subprocess.run(
        [require_restic(), "-r", str(repo), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"restic {args}: {proc.stderr}"
    return proc


def test_key_files_show_the_storage_provider_no_account_vault_or_device(
    phone: Cli, vault: VaultNode, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    init = phone.ok("--json", "init", "--password", env={"BACKVAULT_PASSWORD": PASSWORD}).json()
    phone.ok("key", "add")  # a second 64-digit key
    documents = key_documents(repo)
    assert len(documents) == 3
    leaks = [ACCOUNT, vault.url, f"127.0.0.1:{vault.port}", "recovery", "password"]
    device = {getpass.getuser(), socket.gethostname()}
    for name, doc in documents.items():
        raw = (repo / "keys" / name).read_text()
        for leak in leaks:
            assert leak not in raw, f"keys/{name} shows {leak!r} to the storage provider"
        assert doc["username"] not in device and doc["hostname"] not in device, doc
    # Every slot looks the same from outside: the same names, the same label size.
    assert len({(d["username"], d["hostname"]) for d in documents.values()}) == 1
    assert len({len(d["backvault_label"]) for d in documents.values()}) == 1
    # Once the repository is open, the slots say again what they are.
    slots = {s["id"]: s["kind"] for s in phone.ok("--json", "key", "list").json()}
    assert slots[init["password_key_id"]] == f"password (vault {vault.url}, account {ACCOUNT})"
    assert sorted(slots.values()).count("recovery key") == 2
    # Stock restic still opens the repository and lists its keys.
    keys = restic_run(repo, init["recovery_key"], "key", "list").stdout
    rows = [line[1:].split() for line in keys.splitlines() if line[:1] in " *" and "-" in line]
    rows = [row for row in rows if len(row) >= 4 and len(row[0]) == 8]
    assert [row[1:3] for row in rows] == [["backvault", "backvault"]] * 3, keys
    restic_run(repo, init["recovery_key"], "snapshots")
    # A new device finds the password slot by trying the slots with the secret.
    source = make_tree(tmp_path / "src", big=200_000)
    phone.ok("backup", str(source))
    fresh = new_device(phone, tmp_path, "new-phone")
    target = tmp_path / "restored"
    fresh.ok("restore", "latest", "--target", str(target), env={"BACKVAULT_PASSWORD": PASSWORD})
    assert tree_digest(target / source.relative_to("/")) == tree_digest(source)


def rewrite_in_old_form(repo: Path, kinds: dict[str, str], vault_url: str) -> dict[str, str]:
    """Turn the key files back into what earlier versions wrote (names in clear, no
    label); the key file's name is the SHA-256 of its bytes. Returns old id -> new id."""
    renamed = {}
    for path in list((repo / "keys").iterdir()):
        doc = json.loads(path.read_bytes())
        doc.pop("backvault_label")
        if kinds[path.name].startswith("password"):
            doc["username"], doc["hostname"] = f"backvault-password:{ACCOUNT}", vault_url
        else:
            doc["username"], doc["hostname"] = "backvault-recovery-key", "anas-phone"
        raw = json.dumps(doc, separators=(",", ":")).encode()
        name = hashlib.sha256(raw).hexdigest()
        (repo / "keys" / name).write_bytes(raw)
        path.unlink()
        renamed[path.name] = name
    return renamed


@pytest.mark.parametrize("how", ["password change", "key add --password"])
def test_repositories_with_old_key_file_names_keep_working_and_lose_them(
    phone: Cli, vault: VaultNode, tmp_path: Path, how: str
) -> None:
    repo = tmp_path / "repo"
    phone.ok("init", "--password", env={"BACKVAULT_PASSWORD": PASSWORD})
    kinds = {s["id"]: s["kind"] for s in phone.ok("--json", "key", "list").json()}
    renamed = rewrite_in_old_form(repo, kinds, vault.url)
    old_password_slot = next(renamed[i] for i, k in kinds.items() if k.startswith("password"))
    listed = {s["id"]: s["kind"] for s in phone.ok("--json", "key", "list").json()}
    assert listed[old_password_slot] == f"password (vault {vault.url}, account {ACCOUNT})"
    assert sorted(listed.values())[-1] == "recovery key"
    # The old password slot still opens the repository on a new device.
    fresh = new_device(phone, tmp_path, "new-phone")
    fresh.ok("snapshots", env={"BACKVAULT_PASSWORD": PASSWORD})

    if how == "password change":
        result = phone.ok(
            "--json", "password", "change", env={"BACKVAULT_NEW_PASSWORD": NEW_PASSWORD}
        )
        assert result.json()["removed"] == []
    else:
        result = phone.ok(
            "--json", "key", "add", "--password", env={"BACKVAULT_PASSWORD": NEW_PASSWORD}
        )
        assert result.json()["replaced"] == []
    # The old slot's kind came from clear names: it is left in place, and said so.
    assert f"key slot {old_password_slot[:8]} was named a password slot" in result.err
    # What is written now names nothing; the old names are gone from the storage.
    for name, doc in key_documents(repo).items():
        raw = (repo / "keys" / name).read_text()
        assert ACCOUNT not in raw and vault.url not in raw and "anas-phone" not in raw, doc
    password_kind = f"password (vault {vault.url}, account {ACCOUNT})"
    listed = sorted(s["kind"] for s in phone.ok("--json", "key", "list").json())
    assert listed == [password_kind, password_kind, "recovery key"]
    # Removing the old slot leaves the vault's record (the new password's) alone.
    relabelled = result.json()["renamed"][old_password_slot]
    removed = phone.ok("key", "remove", relabelled[:8])
    assert "left alone" in removed.err
    listed = sorted(s["kind"] for s in phone.ok("--json", "key", "list").json())
    assert listed == [password_kind, "recovery key"]
    other = new_device(phone, tmp_path, "other-phone")
    other.ok("snapshots", env={"BACKVAULT_PASSWORD": NEW_PASSWORD})


def test_a_recovery_key_renamed_in_clear_as_a_password_slot_is_never_removed(
    phone: Cli, vault: VaultNode, tmp_path: Path
) -> None:
    """Whoever can write the storage strips the recovery key file's label and gives it
    the clear name earlier versions gave password slots, hoping that `password change`
    or `password disable` removes it."""
    repo = tmp_path / "repo"
    init = phone.ok("--json", "init", "--password", env={"BACKVAULT_PASSWORD": PASSWORD}).json()
    path = repo / "keys" / init["key_id"]
    doc = json.loads(path.read_bytes())
    doc.pop("backvault_label")
    doc["username"], doc["hostname"] = f"backvault-password:{ACCOUNT}", vault.url
    raw = json.dumps(doc, separators=(",", ":")).encode()
    forged = hashlib.sha256(raw).hexdigest()
    (repo / "keys" / forged).write_bytes(raw)
    path.unlink()
    changed = phone.ok("--json", "password", "change", env={"BACKVAULT_NEW_PASSWORD": NEW_PASSWORD})
    assert changed.json()["removed"] == [init["password_key_id"]]
    assert "cannot verify" in changed.err
    phone.ok("password", "disable")
    phone.ok("forget-device")
    phone.ok("snapshots", key=init["recovery_key"])  # the recovery key still opens


def test_a_label_moved_to_another_key_file_is_not_believed(phone: Cli, tmp_path: Path) -> None:
    """The storage provider copies the password slot's label into the recovery slot's key
    file, hoping that `password change` removes the recovery key as an old password slot."""
    repo = tmp_path / "repo"
    init = phone.ok("--json", "init", "--password", env={"BACKVAULT_PASSWORD": PASSWORD}).json()
    documents = key_documents(repo)
    recovery = documents[init["key_id"]]
    recovery["backvault_label"] = documents[init["password_key_id"]]["backvault_label"]
    (repo / "keys" / init["key_id"]).write_text(json.dumps(recovery))
    kinds = {s["id"]: s["kind"] for s in phone.ok("--json", "key", "list").json()}
    assert not kinds[init["key_id"]].startswith("password"), kinds
    done = phone.ok(
        "--json", "password", "change", env={"BACKVAULT_NEW_PASSWORD": NEW_PASSWORD}
    ).json()
    assert done["removed"] == [init["password_key_id"]]
    phone.ok("forget-device")
    phone.ok("snapshots", key=init["recovery_key"])


# --- plain-http vaults -----------------------------------------------------------------


def test_vault_urls_loopback_or_https_only() -> None:
    from backvault.device.settings import InsecureVaultUrl, check_vault_url
    from backvault.vaultclient.http import VaultClient

    for url in (
        "https://vault.example",
        "http://127.0.0.1:8750",
        "http://127.9.9.9",
        "http://localhost:1/",
        "http://[::1]:8750",
    ):
        check_vault_url(url, allow_plain_http=False)
    for url in (
        "http://vault.example",
        "http://10.0.0.1:8750",
        "http://localhost.attacker.example",
        "http://127.0.0.1.nip.io",
        "http://[::ffff:10.0.0.1]",
        "ftp://vault.example",
        "vault.example",
    ):
        with pytest.raises(InsecureVaultUrl):
            check_vault_url(url, allow_plain_http=False)
    check_vault_url("http://10.0.0.1:8750", allow_plain_http=True)
    with pytest.raises(InsecureVaultUrl):
        VaultClient("http://10.0.0.1:8750", "token")


def outward_address() -> str:
    """This machine's address on its network (not loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        except OSError:
            pytest.skip("this machine has no network interface besides loopback")
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("this machine has no network interface besides loopback")
    return address


class OpenVaultNode(VaultNode):
    """A vault node that listens on every interface, not only on loopback."""

    def command(self, *args: str) -> list[str]:
        return [a.replace("127.0.0.1:", "0.0.0.0:") for a in super().command(*args)]


def test_plain_http_vault_off_loopback_is_refused_unless_insecure_vault(
    cli: Cli, tmp_path: Path
) -> None:
    node = OpenVaultNode(**vars(make_node(tmp_path / "vault", f"sqlite:///{tmp_path / 'v.db'}")))
    node.start()
    try:
        url = f"http://{outward_address()}:{node.port}"
        cli.env.update(
            BACKVAULT_REPO=str(tmp_path / "repo"),
            BACKVAULT_VAULT_URL=url,
            BACKVAULT_ACCOUNT="ana",
            BACKVAULT_VAULT_TOKEN=node.add_account("ana"),
            BACKVAULT_PASSWORD=PASSWORD,
        )
        refused = cli.run("init", "--password")
        assert refused.code == 2, refused.err
        message = refused.err.strip()
        assert "\n" not in message and url in message
        assert "https://" in message and "--insecure-vault" in message
        assert not (tmp_path / "repo").exists()  # nothing half-written
        checked = cli.run("password", "check")
        assert checked.code == 2 and "--insecure-vault" in checked.err
        # Asked for explicitly, before or after the command name, it goes ahead.
        cli.ok("--insecure-vault", "init", "--password")
        cli.ok("password", "check", "--insecure-vault")
        cli.ok("forget-device")
        cli.ok("snapshots", "--insecure-vault")  # opened with the password through the vault
    finally:
        node.stop()


# --- the vault token -------------------------------------------------------------------


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_vault_token_is_never_taken_from_the_command_line(cli: Cli) -> None:
    token = "bvt_" + secrets.token_urlsafe(24)
    refused = cli.run("config", "set", "vault.token", token)
    assert refused.code == 2
    assert "command line" in refused.err and "vault.token -" in refused.err
    assert token not in refused.err and token[:8] not in refused.err
    assert files_holding(cli.home, token) == []


def test_vault_token_from_stdin_goes_to_a_private_file_without_a_keyring(cli: Cli) -> None:
    token = "bvt_" + secrets.token_urlsafe(24)
    stored = run_with_stdin(cli, token + "\n", "config", "set", "vault.token", "-")
    assert stored.returncode == 0, stored.stderr
    assert token not in stored.stdout + stored.stderr
    holders = files_holding(cli.home, token)
    assert len(holders) == 1 and holders[0].name != "config.toml", holders
    assert stat.S_IMODE(holders[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(holders[0].parent.stat().st_mode) == 0o700
    shown = cli.ok("--json", "config").json()
    assert token[4:10] not in json.dumps(shown)
    assert shown["vault.token"] == "<hidden>"
    assert str(holders[0]) in shown["sources"]["vault.token"]
    text = cli.ok("config").out
    assert token[4:10] not in text and str(holders[0]) in text
    # The token read back is the one stored: the environment still overrides it.
    assert shown["sources"]["vault.token"] != "$BACKVAULT_VAULT_TOKEN"
    over = cli.ok("--json", "config", env={"BACKVAULT_VAULT_TOKEN": "x"}).json()
    assert over["sources"]["vault.token"] == "$BACKVAULT_VAULT_TOKEN"
    cli.ok("config", "unset", "vault.token")
    assert files_holding(cli.home, token) == []
    assert cli.ok("--json", "config").json()["vault.token"] is None


def test_vault_token_goes_to_the_os_keyring(cli: Cli, tmp_path: Path) -> None:
    env = {
        "BACKVAULT_KEYRING": "",
        "PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring",
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    token = "bvt_" + secrets.token_urlsafe(24)
    stored = run_with_stdin(cli, token, "config", "set", "vault.token", "-", env=env)
    assert stored.returncode == 0, stored.stderr
    assert files_holding(cli.home, token) == []  # not in config.toml, not in a file
    assert list((tmp_path / "data").rglob("keyring_pass.cfg"))
    shown = cli.ok("--json", "config", env=env).json()
    assert shown["sources"]["vault.token"] == "the OS keyring (PlaintextKeyring)"


def test_vault_token_at_a_hidden_prompt(cli: Cli) -> None:
    token = "bvt_" + secrets.token_urlsafe(24)
    code, out = run_on_terminal(["config", "set", "vault.token"], cli.env, [("Vault token", token)])
    assert code == 0, out
    assert token not in out  # never echoed
    assert len(files_holding(cli.home, token)) == 1


def test_an_old_token_in_config_toml_keeps_working_and_moves_to_the_keyring(
    cli: Cli, vault: VaultNode, tmp_path: Path
) -> None:
    token = vault.add_account("ana")
    config = cli.home / "config" / "config.toml"
    config.parent.mkdir(mode=0o700)
    config.write_text(f'[vault]\nurl = "{vault.url}"\naccount = "ana"\ntoken = "{token}"\n')
    cli.env.update(BACKVAULT_REPO=str(tmp_path / "repo"), BACKVAULT_PASSWORD=PASSWORD)
    shown = cli.ok("--json", "config").json()
    assert shown["sources"]["vault.token"] == str(config)
    cli.ok("init", "--password")  # the vault accepts the token from the old place
    moved = run_with_stdin(cli, token, "config", "set", "vault.token", "-")
    assert moved.returncode == 0, moved.stderr
    assert token not in config.read_text() and "ana" in config.read_text()
    assert cli.ok("--json", "config").json()["sources"]["vault.token"] != str(config)
    cli.ok("password", "check")


# --- child processes -------------------------------------------------------------------

SECRETS_IN_ENV = {
    "BACKVAULT_PASSWORD": "pw-" + secrets.token_hex(8),
    "BACKVAULT_NEW_PASSWORD": "npw-" + secrets.token_hex(8),
    "BACKVAULT_VAULT_TOKEN": "bvt_" + secrets.token_hex(8),
    "BACKVAULT_VAULT_PKCS11_PIN": "pin-" + secrets.token_hex(8),
}

# Every Python process started with this on its path records, at start, its command line
# and environment, and at exit whether it could still dump core.
PROBE = """
import atexit, ctypes, json, os, resource, sys
_out = os.environ.get("PROBE_DIR")
if _out:
    _record = {"argv": list(sys.orig_argv), "env": dict(os.environ)}
    _started = os.getpid()
    def _at_exit():
        _record["dumpable"] = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)
        _record["core_limit"] = list(resource.getrlimit(resource.RLIMIT_CORE))
        _record["forked"] = os.getpid() != _started
        with open(os.path.join(_out, f"python-{os.getpid()}.json"), "w") as handle:
            json.dump(_record, handle)
    atexit.register(_at_exit)
    # A child forked from this interpreter (a fork server's worker) ends with os._exit,
    # which runs no atexit handler: record it there.
    _real_exit = os._exit
    def _exit(code):
        if os.getpid() != _started:
            _at_exit()
        _real_exit(code)
    os._exit = _exit
"""

# And so does every rclone and systemctl, through a wrapper that then runs the real one.
RECORDER = """#!/bin/sh
env > "$PROBE_DIR/{name}-$$.env"
exec {real} "$@"
"""


@pytest.fixture
def probe(tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "probe"
    out.mkdir()
    site = tmp_path / "probe-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PROBE)
    bin_dir = tmp_path / "probe-bin"
    bin_dir.mkdir()
    for name in ("rclone", "systemctl"):
        real = subprocess.run(["sh", "-c", f"command -v {name}"], capture_output=True, text=True)
        wrapper = bin_dir / name
        wrapper.write_text(RECORDER.format(name=name, real=real.stdout.strip() or "false"))
        wrapper.chmod(0o755)
    return {
        "PROBE_DIR": str(out),
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
    }


def probe_records(probe: dict[str, str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in sorted(Path(probe["PROBE_DIR"]).iterdir()):
        if path.suffix == ".json":
            records.append({"what": "python", "file": path.name, **json.loads(path.read_text())})
        else:
            env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            records.append({"what": path.name.split("-")[0], "file": path.name, "env": env})
    return records


def is_worker(record: dict[str, Any]) -> bool:
    return record["what"] == "python" and any(
        "multiprocessing" in part for part in record.get("argv", [])
    )


def test_child_processes_get_no_secrets_in_their_environment(
    cli: Cli, tmp_path: Path, probe: dict[str, str]
) -> None:
    # rclone: a repository on an rclone remote (here rclone's own local-disk remote).
    remote = "rclone::local:" + str(tmp_path / "remote-repo")
    cli.env["BACKVAULT_RCLONE"] = "rclone"  # found on PATH: the recording wrapper
    remote_key = cli.ok("--json", "-r", remote, "init", "--no-remember").json()["recovery_key"]
    # Worker processes: a backup into a local folder, on two of them.
    local = str(tmp_path / "repo")
    key = cli.ok("--json", "-r", local, "init", "--no-remember").json()["recovery_key"]
    source = make_tree(tmp_path / "src", big=2_000_000)
    env = {
        **probe,
        **SECRETS_IN_ENV,
        "BACKVAULT_WORKER_PROCESSES": "2",
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    cli.ok("-r", remote, "backup", str(source), env={**env, "BACKVAULT_KEY": remote_key})
    cli.ok("-r", local, "backup", str(source), env={**env, "BACKVAULT_KEY": key})
    # systemctl: the daily timer (the key is cached by now).
    cli.ok("-r", local, "schedule", "install", str(source), env={**env, "BACKVAULT_KEY": key})
    records = probe_records(probe)
    children = [r for r in records if r["what"] in ("rclone", "systemctl") or is_worker(r)]
    assert {r["what"] for r in children} >= {"rclone", "systemctl", "python"}, records
    assert any(is_worker(r) for r in children)
    secret_values = [*SECRETS_IN_ENV.values(), key, remote_key]
    for record in children:
        names = set(record["env"]) & {*SECRETS_IN_ENV, "BACKVAULT_KEY"}
        assert not names, f"{record['file']} inherited {sorted(names)}"
        for value in secret_values:
            assert value not in json.dumps(record["env"]), record["file"]


def test_scrubbed_environment() -> None:
    from backvault.hardening import scrubbed_env

    base = {
        "PATH": "/usr/bin",
        "HOME": "/home/ana",
        "BACKVAULT_REPO": "/repo",
        "BACKVAULT_KEYRING": "file",
        "RCLONE_CONFIG": "/home/ana/rclone.conf",
        "BACKVAULT_KEY": "k",
        "BACKVAULT_PASSWORD": "p",
        "BACKVAULT_NEW_PASSWORD": "n",
        "BACKVAULT_VAULT_TOKEN": "t",
        "BACKVAULT_VAULT_PKCS11_PIN": "1234",
        "BACKVAULT_SOMETHING_SECRET": "s",
    }
    assert scrubbed_env(base) == {
        "PATH": "/usr/bin",
        "HOME": "/home/ana",
        "BACKVAULT_REPO": "/repo",
        "BACKVAULT_KEYRING": "file",
        "RCLONE_CONFIG": "/home/ana/rclone.conf",
    }


# --- core dumps ------------------------------------------------------------------------

AFTER_A_COMMAND = """
import ctypes, resource, sys
from backvault.cli import main
libc = ctypes.CDLL(None)
before = libc.prctl(3, 0, 0, 0, 0)
code = main(sys.argv[1:])
print(code, before, libc.prctl(3, 0, 0, 0, 0), *resource.getrlimit(resource.RLIMIT_CORE))
"""


def test_commands_that_hold_keys_cannot_dump_core(
    cli: Cli, repo: InitRepo, tmp_path: Path, probe: dict[str, str]
) -> None:
    # The command line itself, run in a helper process exactly as the entry point runs it.
    helper = subprocess.run(
        [sys.executable, "-c", AFTER_A_COMMAND, "-r", str(repo.path), "snapshots"],
        capture_output=True,
        text=True,
        env=cli.env,
        timeout=120,
    )
    assert helper.stdout.split()[-5:] == ["0", "1", "0", "0", "0"], helper.stdout + helper.stderr

    # A real `backvault` waiting at its key prompt: its limits, as anyone can read them.
    limits: list[str] = []

    def read_limits(pid: int) -> None:
        limits.extend(
            line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if "core" in line
        )

    cli.ok("-r", str(repo.path), "forget-device")
    code, out = run_on_terminal(
        ["-r", str(repo.path), "snapshots"],
        cli.env,
        [("64-digit key", repo.key)],
        at_prompt=read_limits,
    )
    assert code == 0, out
    assert len(limits) == 1 and limits[0].split()[4:6] == ["0", "0"], limits

    # Worker processes hold the master key too.
    source = make_tree(tmp_path / "src", big=2_000_000)
    cli.ok(
        "-r",
        str(repo.path),
        "backup",
        str(source),
        env={**probe, "BACKVAULT_WORKER_PROCESSES": "2"},
    )
    # Spawned ones, or forked by the fork server (recorded at their os._exit), and the
    # fork server itself (its children are born with its dumpable flag).
    workers = [
        r
        for r in probe_records(probe)
        if is_worker(r) and ("spawn_main" in str(r["argv"]) or "forkserver" in str(r["argv"]))
    ]
    assert any(r.get("forked") or "spawn_main" in str(r["argv"]) for r in workers), workers
    for worker in workers:
        assert worker["dumpable"] == 0 and worker["core_limit"] == [0, 0], worker


# --- reprs -----------------------------------------------------------------------------


def encodings(secret: bytes) -> list[str]:
    forms = [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret)[2:-1],
        secret.decode("latin-1"),
    ]
    # Any 8 characters in a row of any of them is a leak (a "prefix" shown, say).
    return [form[i : i + 8] for form in forms for i in range(len(form) - 7)]


def assert_redacted(obj: object, *secrets_held: bytes) -> None:
    for text in (repr(obj), str(obj)):
        for secret in secrets_held:
            for piece in encodings(secret):
                assert piece not in text, f"{type(obj).__name__} shows {piece!r}: {text}"


def test_secret_holding_objects_have_redacted_reprs() -> None:
    from backvault.crypto.aead import Key
    from backvault.crypto.keyfile import KeyFile
    from backvault.crypto.slotlabel import SlotLabel
    from backvault.device.keycache import CachedKey
    from backvault.device.settings import Settings, VaultSettings
    from backvault.vaultclient.http import (
        LoginFinished,
        LoginResult,
        Registration,
        RegistrationStart,
    )

    wrapped, export_key = secrets.token_bytes(61), secrets.token_bytes(64)
    assert_redacted(LoginResult(wrapped, export_key, 5, 0, 0, None), wrapped, export_key)
    assert_redacted(LoginFinished(wrapped, 5, 0, 0, None), wrapped)
    assert_redacted(Registration(export_key, "ab" * 32), export_key)
    handle = secrets.token_urlsafe(24)
    assert_redacted(RegistrationStart(handle, wrapped), handle.encode(), wrapped)

    token = "bvt_" + secrets.token_urlsafe(32)
    vault = VaultSettings("https://vault.example", "ana", token)
    assert_redacted(vault, token.encode())
    assert "ana" in repr(vault)  # what is not secret still shows
    settings = Settings(
        repository="/repo",
        vault_url="https://vault.example",
        vault_account="ana",
        vault_token=token,
    )
    assert_redacted(settings, token.encode())

    master = Key.generate()
    parts = (master.encrypt, master.mac_k, master.mac_r)
    assert_redacted(master, *parts)
    assert_redacted(CachedKey("repo-id", master, "file x"), *parts)
    # The OPAQUE client's states (the password, the blind, the key share) and results.
    from backvault.opaque import client as opaque_client

    password = b"correct horse battery staple"
    _, registration = opaque_client.create_registration_request(password)
    _, login = opaque_client.generate_ke1(password)
    for state in (registration, login):
        assert_redacted(state, password, *(v for v in vars(state).values() if isinstance(v, bytes)))
    slot_secret = secrets.token_bytes(32)
    label = SlotLabel.password("https://vault.example", "ana")
    key_file = KeyFile.create(
        master, slot_secret.hex().encode(), created="2024-01-01T00:00:00Z", label=label, n=1024
    )
    assert_redacted(key_file, *parts, slot_secret, slot_secret.hex().encode())


# --- the consistent copy of a SQLite database ------------------------------------------


def make_database(path: Path, megabytes: int) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body BLOB)")
    db.executemany(
        "INSERT INTO m(body) VALUES (?)", ([os.urandom(4000)] for _ in range(megabytes * 256))
    )
    db.commit()
    db.close()


def database_copies(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".backvault-sqlite-")]


def copies_in_shared_tmp() -> set[Path]:
    """Copies where earlier versions made them: the top of the shared temporary folder."""
    return set(Path(tempfile.gettempdir()).glob(".backvault-sqlite-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_database_copy_is_private_and_removed_when_interrupted(
    cli: Cli, repo: InitRepo, tmp_path: Path, sig: signal.Signals
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    make_database(source / "chat.db", 40)
    in_tmp_before = copies_in_shared_tmp()
    # The chat app is in the middle of a write: the copy waits for it, mid-way.
    app = sqlite3.connect(source / "chat.db", isolation_level=None)
    app.execute("BEGIN EXCLUSIVE")
    proc = cli.popen("-r", str(repo.path), "backup", str(source))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not database_copies(cli.home / "cache"):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        copies = database_copies(cli.home / "cache")
        assert copies, "no copy of the database was made under the user's cache folder"
        folder = copies[0].parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert folder.stat().st_uid == os.getuid()
        proc.send_signal(sig)
    finally:
        app.execute("ROLLBACK")
        app.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    assert "interrupted" in err or "terminated" in err
    assert database_copies(cli.home / "cache") == []
    assert copies_in_shared_tmp() <= in_tmp_before
    # The next backup runs as usual, and makes and removes its copy in the same place.
    cli.ok("-r", str(repo.path), "backup", str(source))
    assert database_copies(cli.home / "cache") == []


# --- storage credentials in a repository URL ---------------------------------------------


def test_a_password_in_a_rest_url_stays_out_of_messages_and_unit_files(
    cli: Cli, tmp_path: Path
) -> None:
    secret = "s3cr3t-rest-password"
    location = f"rest:http://ana:{secret}@127.0.0.1:9/repo/"  # nothing listens on port 9
    failed = cli.run("-r", location, "init", env={"BACKVAULT_RETRY_ATTEMPTS": "1"})
    assert failed.code != 0 and secret not in failed.err + failed.out
    assert "ana:***@127.0.0.1" in failed.err


@pytest.mark.parametrize(
    "url",
    [
        "rest:https://ana:s3cr3t@host/repo/",
        "rest:https://ana:s3@cr3t@host/repo/",  # an "@" in the password
        "rest:https://ana:s3 cr3t@host:8000/repo/",  # a space
    ],
)
def test_the_password_of_a_repository_url_is_masked_whatever_it_holds(url: str) -> None:
    from backvault.storage import without_password

    shown = without_password(f"{url} failed: {url}config")
    assert "s3" not in shown and "cr3t" not in shown
    assert shown.count("ana:***@host") == 2


def test_a_damaged_vault_state_file_does_not_stop_a_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backvault.device import vault_state

    monkeypatch.setenv("BACKVAULT_CONFIG_DIR", str(tmp_path))
    for damaged in ('{"vaults": []}', '{"vaults": {"https://v ana": 3}}', "not json"):
        vault_state.state_path().write_text(damaged)
        assert vault_state.earlier_attempts("https://v", "ana") == []
        vault_state.add_attempt("https://v", "ana", "id-1")
        assert vault_state.earlier_attempts("https://v", "ana") == ["id-1"]
        assert vault_state.registered_fingerprint("https://v", "ana") is None
