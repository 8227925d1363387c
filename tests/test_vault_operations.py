"""Vault operations: configuration file and environment, TLS, rate limits, graceful stop."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backvault.opaque import IdentityKSF, OpaqueConfig
from backvault.vault.config import SettingsError, load_settings
from backvault.vaultclient.http import VaultClient
from tests.servers import free_port, make_node

CONFIG = OpaqueConfig(ksf=IdentityKSF())


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_a_config_file(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = tmp_path / "vault.toml"
    config.write_text(f'[vault]\ntls_cert = "{cert}"\ntls_key = "{key}"\nmax_attempts = 4\n')
    node = make_node(tmp_path / "v", f"sqlite:///{tmp_path / 'v.db'}", "--config", str(config))
    token = node.add_account("tls")
    handle = open(node.log, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        node.command("serve", "--listen", f"127.0.0.1:{node.port}", *node.args),
        env=node.env,
        stdout=handle,
        stderr=handle,
    )
    try:
        url = f"https://127.0.0.1:{node.port}"
        import time

        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                context = ssl.create_default_context(cafile=str(cert))
                if httpx.get(url + "/readyz", verify=context, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with VaultClient(url, token, CONFIG, verify=str(cert)) as vc:
            vc.register(b"pw", lambda _k: b"x" * 32)
            assert vc.status()["max_attempts"] == 4  # from the config file
        # Plain HTTP is not served on the TLS port.
        try:
            plain = httpx.get(f"http://127.0.0.1:{node.port}/healthz", timeout=2).status_code
        except httpx.TransportError:
            plain = 0
        assert plain != 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_rate_limits_answer_429_with_retry_after(tmp_path: Path) -> None:
    node = make_node(
        tmp_path / "v",
        f"sqlite:///{tmp_path / 'v.db'}",
        env={
            "BACKVAULT_SERVER_RATE_PER_ACCOUNT_PER_MINUTE": "12",
        },
    ).start()
    try:
        token = node.add_account("busy")
        codes = [
            httpx.get(
                node.url + "/v1/record", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            for _ in range(5)
        ]
        assert codes[:2] == [200, 200] and 429 in codes
        limited = httpx.get(node.url + "/v1/record", headers={"Authorization": f"Bearer {token}"})
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"] == "rate_limited"
    finally:
        node.stop()


def test_bad_settings_fail_with_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[vault]\nlisten_port = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "backvault.cli", "vault", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"backvault: vault settings: {config}: unknown setting 'listen_port'"
    )


def test_server_settings_come_from_backvault_server_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BACKVAULT_SERVER_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("BACKVAULT_SERVER_METRICS", "off")
    # The client's own variables share the old prefix: the vault neither reads nor warns.
    monkeypatch.setenv("BACKVAULT_VAULT_URL", "https://vault.example")
    monkeypatch.setenv("BACKVAULT_VAULT_TOKEN", "bvt_client")
    settings = load_settings(None, {"listen": "127.0.0.1:1", "db": None})
    assert (settings.max_attempts, settings.metrics, settings.listen) == (7, False, "127.0.0.1:1")
    assert capsys.readouterr().err == ""


def test_old_backvault_vault_variables_still_work_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BACKVAULT_VAULT_MAX_ATTEMPTS", "6")
    monkeypatch.setenv("BACKVAULT_VAULT_GUESS_CAP", "50")
    monkeypatch.setenv("BACKVAULT_SERVER_GUESS_CAP", "40")  # the new name wins
    settings = load_settings(None)
    assert (settings.max_attempts, settings.guess_cap) == (6, 40)
    assert capsys.readouterr().err.splitlines() == [  # in the settings' order
        "backvault: BACKVAULT_VAULT_MAX_ATTEMPTS is deprecated for the vault server; set "
        "BACKVAULT_SERVER_MAX_ATTEMPTS instead",
        "backvault: BACKVAULT_VAULT_GUESS_CAP is deprecated and ignored: "
        "BACKVAULT_SERVER_GUESS_CAP is set",
    ]


def test_an_old_variable_reaches_a_vault_command(tmp_path: Path) -> None:
    """End to end, through the CLI (which withdraws secret variables first): the old name
    still configures the vault, with one line on stderr naming the new one."""
    env = {
        **os.environ,
        "BACKVAULT_VAULT_DB": f"sqlite:///{tmp_path / 'old-name.db'}",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "share"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "backvault.cli", "vault", "add-account", "ana"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "old-name.db").exists()
    deprecations = [line for line in proc.stderr.splitlines() if "deprecated" in line]
    assert deprecations == [
        "backvault: BACKVAULT_VAULT_DB is deprecated for the vault server; set "
        "BACKVAULT_SERVER_DB instead"
    ]


def test_settings_are_validated_on_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKVAULT_SERVER_MAX_ATTEMPTS", "ten")
    with pytest.raises(SettingsError, match="max_attempts"):
        load_settings(None)


def test_missing_hsm_token_is_reported(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backvault.cli",
            "vault",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path),
            "--sealing",
            "pkcs11",
            "--pkcs11-token-label",
            "no-such-token",
            "--pkcs11-module",
            "/nonexistent/libpkcs11.so",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "sealing: cannot reach the HSM token 'no-such-token'" in proc.stderr
