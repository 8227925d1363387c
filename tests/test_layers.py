"""Layers point one way (docs/architecture.md): cli -> app -> (engine, vaultclient, device)
-> (repo, source) -> (crypto, opaque, storage). Protocol and format code does no I/O."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "backvault"

# For each package: the backvault packages it may import (docs/architecture.md).
ALLOWED = {
    "crypto": set(),
    "opaque": set(),
    "storage": set(),
    "source": set(),
    "repo": {"crypto", "storage"},
    "engine": {"repo", "crypto", "storage", "source"},
    "device": {"crypto"},
    "vaultclient": {"opaque", "crypto", "repo", "storage", "device", "realms"},
    "realms": {"opaque", "crypto"},
    "vault": {"opaque", "crypto", "realms"},
    "app": {
        "engine",
        "device",
        "vaultclient",
        "repo",
        "crypto",
        "storage",
        "source",
        "opaque",
        "realms",
    },
    "cli": {
        "app",
        "engine",
        "device",
        "vaultclient",
        "repo",
        "crypto",
        "storage",
        "source",
        "opaque",
        "realms",
        "vault",
        "demo",
        "demo_realms",
    },
    "hardening": set(),
}
# Imported by every package: process hardening (no core dumps, no secrets for children,
# private files).
EVERYWHERE = {"hardening"}
NO_IO_PACKAGES = {"opaque", "realms"}
IO_MODULES = {"os", "socket", "subprocess", "shutil", "pathlib", "urllib", "http", "httpx"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = path.relative_to(SRC).parts[0]
                base = ["backvault", package] if node.level == 1 else ["backvault"]
                module = ".".join(base + ([node.module] if node.module else []))
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


def test_packages_import_only_lower_layers() -> None:
    for package, allowed in ALLOWED.items():
        for path in (SRC / package).rglob("*.py") if (SRC / package).exists() else []:
            for name in imports_of(path):
                parts = name.split(".")
                if (
                    parts[0] != "backvault"
                    or len(parts) < 2
                    or parts[1] == package
                    or parts[1].startswith("__")  # the package's own metadata (__version__)
                ):
                    continue
                assert parts[1] in allowed | EVERYWHERE, f"{path.relative_to(SRC)} imports {name}"


def test_protocol_packages_do_no_io() -> None:
    """opaque (OPRF, OPAQUE) and realms (the threshold realm protocol) are pure: byte strings
    in, byte strings out, so they can be tested against vectors and reused on both sides."""
    for package in sorted(NO_IO_PACKAGES):
        paths = list((SRC / package).rglob("*.py"))
        assert paths, f"no modules in {package}"
        for path in paths:
            where = path.relative_to(SRC)
            for name in imports_of(path):
                assert name.split(".")[0] not in IO_MODULES, f"{where} imports {name}"
            assert "open(" not in path.read_text(), where


def test_nothing_in_src_uses_the_deterministic_opaque_path() -> None:
    for path in SRC.rglob("*.py"):
        if path.name == "testing.py" and path.parent.name == "opaque":
            continue
        assert "backvault.opaque.testing" not in imports_of(path), path


PRESENTATION = {"click", "rich"}


def test_only_the_command_line_uses_click_and_rich() -> None:
    """Workflows (app/) and everything below them return data and raise errors; only cli/
    turns them into text, tables, prompts and exit codes."""
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] == "cli":
            continue
        used = {name.split(".")[0] for name in imports_of(path)} & PRESENTATION
        assert not used, f"{path.relative_to(SRC)} imports {', '.join(sorted(used))}"


def test_app_imports_neither_click_nor_rich() -> None:
    paths = list((SRC / "app").rglob("*.py"))
    assert paths
    for path in paths:
        used = {name.split(".")[0] for name in imports_of(path)} & PRESENTATION
        assert not used, f"{path.relative_to(SRC)} imports {', '.join(sorted(used))}"


def test_a_backup_loads_no_vault_opaque_or_pydantic_code() -> None:
    """Start-up is most of a backup that finds nothing changed (docs/architecture.md, "What a
    command loads"): the backup command, with its settings resolved, must not load the vault
    server, OPAQUE, the HTTP client or pydantic (~0.1 s each for some of them)."""
    probe = """
import json, sys
import click
from backvault.cli.main import cli
cli.get_command(click.Context(cli), "backup")
from backvault.device.settings import Settings
Settings.resolve()
print(json.dumps(sorted(sys.modules)))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKVAULT_")}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(done.stdout))
    assert "backvault.engine.archiver" in loaded  # the probe did load the backup command
    heavy = {"pydantic", "pydantic_settings", "httpx", "fastapi", "sqlalchemy"}
    ours = ("backvault.vault.", "backvault.opaque", "backvault.vaultclient.slots")
    found = {m for m in loaded if m.split(".")[0] in heavy or m.startswith(ours)}
    assert not found, f"a backup loads {', '.join(sorted(found))}"
