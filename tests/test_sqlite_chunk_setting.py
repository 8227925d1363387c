"""The SQLite chunk size is a setting of the repository (its config), not of the machine
that backs up: every backup to a repository cuts its databases alike. A repository whose
config does not name one (every repository made before) uses 8 KiB, as always."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from unittest import mock

import pytest

from backvault.engine.archiver import Backup
from backvault.repo import format as fmt
from backvault.repo.format import Config
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend


def database(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.execute("PRAGMA page_size=4096")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body BLOB)")
    db.executemany("INSERT INTO m(body) VALUES (?)", ([os.urandom(3000)] for _ in range(100)))
    db.commit()
    db.close()
    return path


def chunk_sizes(repo: Repository, snapshot_id: str, name: str) -> set[int]:
    tree = repo.find_snapshot(snapshot_id)[1].tree
    node = None
    for part in [*Path(name).parts[1:]]:
        node = next(n for n in repo.load_tree(tree) if n.name == part)
        tree = node.subtree or tree
    assert node is not None and node.content
    sizes = [repo.locate(blob).blob.plaintext_length for blob in node.content]
    return set(sizes[:-1])  # the last chunk holds what is left


def test_config_keeps_the_chunk_size_and_leaves_it_out_when_default() -> None:
    plain = Config(2, "ab" * 32, "3da3358b4dc173")
    assert "backvault_sqlite_chunk_kib" not in plain.to_json()
    assert Config.from_json(plain.to_json()) == plain
    assert plain.sqlite_chunk_bytes == 8 * 1024
    sized = Config(2, "ab" * 32, "3da3358b4dc173", sqlite_chunk_kib=16)
    assert Config.from_json(sized.to_json()) == sized and sized.sqlite_chunk_bytes == 16 * 1024
    for bad in (0, -1, 10**9, "8", 8.0, True):
        with pytest.raises(fmt.FormatError):
            Config.from_json({**plain.to_json(), "backvault_sqlite_chunk_kib": bad})


@pytest.mark.parametrize("kib", [None, 16])
def test_backups_cut_databases_by_the_repository_setting(tmp_path: Path, kib: int | None) -> None:
    (tmp_path / "src").mkdir()
    path = database(tmp_path / "src" / "chat.db")
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32, sqlite_chunk_kib=kib)
    reopened = Repository.open(LocalBackend(tmp_path / "repo"), [b"k" * 32])
    assert reopened.config.sqlite_chunk_kib == kib
    with mock.patch.dict(os.environ):
        os.environ.pop("BACKVAULT_SQLITE_CHUNK_KIB", None)
        result = Backup(reopened, temp_dir=tmp_path).run([str(path)])
    assert chunk_sizes(repo, result.snapshot_id, str(path)) == {(kib or 8) * 1024}


def test_the_environment_overrides_the_setting_for_one_backup(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    path = database(tmp_path / "src" / "chat.db")
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    with mock.patch.dict(os.environ, {"BACKVAULT_SQLITE_CHUNK_KIB": "32"}):
        result = Backup(repo, temp_dir=tmp_path).run([str(path)])
    assert chunk_sizes(repo, result.snapshot_id, str(path)) == {32 * 1024}


def test_a_backup_without_a_temporary_folder_copies_into_a_new_private_one(
    tmp_path: Path,
) -> None:
    """Through the Python API, with a state file but no ``temp_dir``: the database copy goes
    into a fresh 0700 folder beside the state file (made by tempfile, so nobody could have
    prepared it), which the run removes; the state file's folder keeps only the state."""
    (tmp_path / "src").mkdir()
    path = database(tmp_path / "src" / "chat.db")
    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    state = tmp_path / "state" / "sqlite.json"
    seen: list[Path] = []
    real_copy = Backup._temp_root

    def recording(self: Backup) -> Path:
        folder = real_copy(self)
        seen.append(folder)
        return folder

    with mock.patch.object(Backup, "_temp_root", recording):
        Backup(repo, sqlite_state_file=state).run([str(path)])
    assert len(seen) == 1 and seen[0].parent == state.parent and seen[0] != state.parent
    assert not seen[0].exists()
    assert {p.name for p in state.parent.iterdir()} <= {state.name}
