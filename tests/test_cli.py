"""The command line, end to end, in subprocesses: every flow and every failure message."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backvault.crypto import recovery_key
from backvault.repo.format import BlobType
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
from tests.conftest import Cli, InitRepo, make_tree, tree_digest


def open_repo(repo: InitRepo) -> Repository:
    return Repository.open(LocalBackend(repo.path), [repo.key.encode()])


def test_init_shows_the_key_once_in_16_groups_and_caches_the_device_key(
    cli: Cli, tmp_path: Path
) -> None:
    result = cli.ok("-r", str(tmp_path / "r"), "init")
    groups = re.findall(r"\b[0-9a-f]{4}\b", result.out)
    assert len(groups) >= 16
    assert "shown only this once" in result.out
    assert "no OS keyring" in result.out  # says which cache was used
    cached = list((cli.home / "config" / "device-keys").iterdir())
    assert len(cached) == 1
    assert stat.S_IMODE(cached[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(cached[0].parent.stat().st_mode) == 0o700
    # The recovery key itself is not stored anywhere on the device.
    key_text = "".join(groups[:16])
    for path in cli.home.rglob("*"):
        if path.is_file():
            assert key_text not in path.read_text(errors="ignore")


def test_init_json_and_refuses_existing_repository(cli: Cli, repo: InitRepo) -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", repo.key)
    assert recovery_key.parse(repo.groups).hex() == repo.key
    again = cli.run("-r", str(repo.path), "init")
    assert again.code == 1 and "already exists" in again.err


def test_backup_snapshots_ls_restore_round_trip(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    expected = tree_digest(source)
    result = cli.ok("--json", "-r", str(repo.path), "backup", str(source), "--tag", "daily").json()
    assert result["files_new"] == 6 and result["sqlite_databases"] == 1
    snaps = cli.ok("--json", "-r", str(repo.path), "snapshots").json()
    assert [s["id"] for s in snaps] == [result["snapshot_id"]]
    assert snaps[0]["tags"] == ["daily"] and snaps[0]["paths"] == [str(source)]
    listing = cli.ok("--json", "-r", str(repo.path), "ls", "latest").json()
    paths = {e["path"] for e in listing["entries"]}
    assert f"{source}/media/voice/note.opus" in paths
    target = tmp_path / "out"
    done = cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(target))
    assert "restored snapshot" in done.out
    assert tree_digest(target / source.relative_to("/")) == expected


def test_restore_include_pattern(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    cli.ok("-r", str(repo.path), "backup", str(source))
    target = tmp_path / "out"
    cli.ok(
        "-r", str(repo.path), "restore", "latest", "--target", str(target), "--include", "*.opus"
    )
    files = [p for p in target.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["note.opus"]


def test_unchanged_backup_reads_nothing_and_dedupes(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src")
    (source / "copy-of-photo.jpg").write_bytes((source / "media" / "photo1.jpg").read_bytes())
    first = cli.ok("--json", "-r", str(repo.path), "backup", str(source)).json()
    photo = (source / "media" / "photo1.jpg").stat().st_size
    # The duplicate photo is stored once.
    trees = 20_000  # tree blobs are added too, and are not read from files
    assert first["bytes_added"] < first["bytes_read"] - photo + trees
    second = cli.ok("--json", "-r", str(repo.path), "backup", str(source)).json()
    assert second["bytes_read"] == 0
    # Only tree metadata can change (atime, the folder that got SQLite's -shm file).
    assert second["bytes_added"] < trees
    assert second["files_unmodified"] == 7 and second["parent_id"] == first["snapshot_id"]


def test_sqlite_change_uploads_only_the_changed_pages(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    db = sqlite3.connect(source / "chat.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE m(id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany(
        "INSERT INTO m(body) VALUES (?)", [(os.urandom(300).hex(),) for _ in range(20000)]
    )
    db.commit()
    first = cli.ok("--json", "-r", str(repo.path), "backup", str(source)).json()
    db.executemany("INSERT INTO m(body) VALUES (?)", [(os.urandom(300).hex(),) for _ in range(20)])
    db.execute("UPDATE m SET body = 'edited' WHERE id = 5")
    db.commit()
    size = (source / "chat.db").stat().st_size
    second = cli.ok("--json", "-r", str(repo.path), "backup", str(source)).json()
    db.close()
    assert first["bytes_added"] >= size * 0.9
    # 20 new rows and one edit touch a handful of 64 KiB chunks of a ~13 MB database.
    assert second["bytes_added"] <= 8 * 64 * 1024, second
    target = tmp_path / "out"
    cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(target))
    restored = sqlite3.connect(target / source.relative_to("/") / "chat.db")
    assert restored.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert restored.execute("SELECT count(*), max(id) FROM m").fetchone() == (20020, 20020)
    assert restored.execute("SELECT body FROM m WHERE id = 5").fetchone()[0] == "edited"


def test_live_sqlite_database_is_copied_consistently(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """A writer moves money between accounts while we back up: every copy must balance."""
    source = tmp_path / "src"
    source.mkdir()
    db_path = source / "bank.db"
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INT, pad TEXT)")
    db.executemany("INSERT INTO acct VALUES (?, 100, ?)", [(i, "p" * 500) for i in range(5000)])
    db.commit()
    db.close()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3,random,time\n"
            f"db=sqlite3.connect({str(db_path)!r}, timeout=30)\n"
            "end=time.time()+30\n"
            "while time.time()<end:\n"
            "  a,b=random.randrange(5000),random.randrange(5000)\n"
            "  db.execute('UPDATE acct SET balance=balance-7 WHERE id=?',(a,))\n"
            "  db.execute('UPDATE acct SET balance=balance+7 WHERE id=?',(b,))\n"
            "  db.commit()\n",
        ]
    )
    try:
        time.sleep(0.5)
        for _ in range(3):
            cli.ok("-r", str(repo.path), "backup", str(source))
    finally:
        writer.kill()
        writer.wait()
    snaps = cli.ok("--json", "-r", str(repo.path), "snapshots").json()
    for snap in snaps:
        target = tmp_path / f"out-{snap['short_id']}"
        cli.ok("-r", str(repo.path), "restore", snap["id"], "--target", str(target))
        restored = sqlite3.connect(target / db_path.relative_to("/"))
        assert restored.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert restored.execute("SELECT sum(balance), count(*) FROM acct").fetchone() == (
            500000,
            5000,
        )
        restored.close()
    assert not any(p.name.endswith("-wal") for p in (tmp_path).rglob("out-*/**/*"))


# --- keys ------------------------------------------------------------------------------


def test_forget_device_then_key_from_env_in_any_layout(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    cli.ok("-r", str(repo.path), "snapshots")  # the cached key works
    gone = cli.ok("-r", str(repo.path), "forget-device")
    assert "no longer holds a key" in gone.out
    assert not list((cli.home / "config" / "device-keys").iterdir())
    denied = cli.run("-r", str(repo.path), "snapshots")
    assert denied.code == 10 and "no key for this repository on this device" in denied.err
    typed = "\n".join(repo.groups.upper().split(" ")[i] + "-" for i in range(16))
    cli.ok("-r", str(repo.path), "snapshots", key=typed)
    cli.ok("-r", str(repo.path), "snapshots")  # remembered again after the key opened it


def test_wrong_and_malformed_keys(cli: Cli, repo: InitRepo) -> None:
    cli.ok("-r", str(repo.path), "forget-device")
    wrong = cli.run("-r", str(repo.path), "snapshots", key=recovery_key.display(os.urandom(32)))
    assert wrong.code == 10
    assert wrong.err.strip() == "backvault: this key does not open this repository"
    groups = repo.groups.split(" ")
    groups[9] = "12x4"
    malformed = cli.run("-r", str(repo.path), "snapshots", key=" ".join(groups))
    assert malformed.code == 10
    assert "group 10 contains 'x'" in malformed.err
    short = cli.run("-r", str(repo.path), "snapshots", key=repo.key[:-1])
    assert short.code == 10 and "63 digits" in short.err
    assert len(short.err.strip().splitlines()) == 1


def test_missing_or_non_repository(cli: Cli, tmp_path: Path) -> None:
    missing = cli.run("-r", str(tmp_path / "nowhere"), "snapshots", key="x")
    assert missing.code == 11 and "there is no repository at" in missing.err
    (tmp_path / "plain").mkdir()
    plain = cli.run("-r", str(tmp_path / "plain"), "snapshots")
    assert plain.code == 11 and "there is no repository at" in plain.err
    no_repo = cli.run("snapshots")
    assert no_repo.code == 2 and "--repo" in no_repo.err


def test_key_list_add_remove_show(cli: Cli, repo: InitRepo) -> None:
    slots = cli.ok("--json", "-r", str(repo.path), "key", "list").json()
    assert [s["kind"] for s in slots] == ["recovery key"]
    refused = cli.run("-r", str(repo.path), "key", "remove", slots[0]["id"][:8])
    assert refused.code == 1 and "last key slot" in refused.err
    added = cli.ok("--json", "-r", str(repo.path), "key", "add").json()
    assert len(cli.ok("--json", "-r", str(repo.path), "key", "list").json()) == 2
    cli.ok("-r", str(repo.path), "forget-device")
    cli.ok("-r", str(repo.path), "snapshots", key=added["recovery_key"])
    cli.ok("-r", str(repo.path), "key", "remove", slots[0]["id"][:8])
    cli.ok("-r", str(repo.path), "forget-device")
    old = cli.run("-r", str(repo.path), "snapshots", key=repo.key)
    assert old.code == 10
    shown = cli.ok(
        "-r",
        str(repo.path),
        "key",
        "show",
        "--restic",
        key=recovery_key.display(bytes.fromhex(added["recovery_key"])).upper(),
    )
    assert added["recovery_key"] in shown.out and "restic -r" in shown.out


# --- damage, full disks, interruptions, concurrency ----------------------------------


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_pack_restore_names_the_file_and_restores_the_rest(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src")
    expected = tree_digest(source)
    cli.ok("-r", str(repo.path), "backup", str(source))
    r = open_repo(repo)
    r.load_index()
    photo_node = next(
        n for n in r.load_tree(_subtree(r, source / "media")) if n.name == "photo1.jpg"
    )
    location = r.lookup(photo_node.content[0])  # type: ignore[index]
    assert location is not None and location.blob.type is BlobType.DATA
    pack = repo.path / "data" / location.pack_id.hex()[:2] / location.pack_id.hex()
    flip_byte(pack, location.blob.offset + 100)

    target = tmp_path / "out"
    result = cli.run("-r", str(repo.path), "restore", "latest", "--target", str(target))
    assert result.code == 3
    assert "media/photo1.jpg" in result.err and location.pack_id.hex() in result.err
    restored = tree_digest(target / source.relative_to("/"))
    assert "media/photo1.jpg" not in restored
    del expected["media/photo1.jpg"]
    assert {k: v for k, v in restored.items() if k != "media"} == {
        k: v for k, v in expected.items() if k != "media"
    }
    assert not list(target.rglob(".*backvault-*"))  # no half-written temporary files

    check = cli.run("-r", str(repo.path), "check", "--read-data")
    assert check.code == 3 and f"data/{location.pack_id.hex()}" in check.err


def _subtree(r: Repository, path: Path) -> bytes:
    _, snap = r.find_snapshot("latest")
    tree = snap.tree
    for part in path.parts[1:]:
        tree = next(n for n in r.load_tree(tree) if n.name == part).subtree  # type: ignore[assignment]
    return tree


def test_damaged_index_and_snapshot_are_named(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    cli.ok("-r", str(repo.path), "backup", str(source))
    (source / "new.txt").write_text("second snapshot\n")
    cli.ok("-r", str(repo.path), "backup", str(source))
    snap_file = sorted((repo.path / "snapshots").iterdir())[0]
    flip_byte(snap_file, 20)
    listing = cli.run("--json", "-r", str(repo.path), "snapshots")
    assert listing.code == 3 and f"snapshots/{snap_file.name} is damaged" in listing.err
    assert len(json.loads(listing.out)) == 1  # the intact snapshot is still listed
    index_file = next((repo.path / "index").iterdir())
    flip_byte(index_file, 30)
    check = cli.run("-r", str(repo.path), "check")
    assert check.code == 3 and f"index/{index_file.name} is damaged" in check.err


def test_restore_refuses_a_non_empty_target_unless_overwrite(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src")
    cli.ok("-r", str(repo.path), "backup", str(source))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    refused = cli.run("-r", str(repo.path), "restore", "latest", "--target", str(target))
    assert refused.code == 1 and "is not empty" in refused.err and "--overwrite" in refused.err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(target), "--overwrite")
    cli.ok("-r", str(repo.path), "restore", "latest", "--target", str(target), "--overwrite")
    assert tree_digest(target / source.relative_to("/")) == tree_digest(source)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_restore_onto_a_full_disk(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    cli.ok("-r", str(repo.path), "backup", str(source))
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        # Refused before anything is written: it does not fit.
        result = cli.run("-r", str(repo.path), "restore", "latest", "--target", str(small / "out"))
        assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
        assert "free; free space or use --ignore-free-space" in result.err
        assert os.listdir(small / "out") == []
        # Told to go ahead, it meets the full disk: stops with one line, leaves nothing.
        result = cli.run(
            "-r", str(repo.path), "restore", "latest", "--target", str(small / "out"),
            "--ignore-free-space",
        )  # fmt: skip
        assert result.code == 1
        assert "is full" in result.err and "--overwrite" in result.err
        assert len(result.err.strip().splitlines()) == 1
        assert not list(small.rglob(".*backvault-*"))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _big_source(root: Path, megabytes: int) -> Path:
    root.mkdir()
    for i in range(megabytes // 4):
        (root / f"video{i}.mp4").write_bytes(os.urandom(4 * 1024 * 1024))
    return root


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_interrupted_backup_leaves_earlier_snapshots_intact(
    cli: Cli, repo: InitRepo, tmp_path: Path, how: str
) -> None:
    small = make_tree(tmp_path / "small")
    cli.ok("-r", str(repo.path), "backup", str(small))
    expected = tree_digest(small)
    big = _big_source(tmp_path / "big", 160)
    proc = cli.popen("-r", str(repo.path), "backup", str(big))
    deadline = time.time() + 60
    while time.time() < deadline and len(list((repo.path / "data").rglob("*"))) < 256 + 3:
        time.sleep(0.02)
    assert proc.poll() is None, "the backup finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if how == "ctrl-c":
        assert proc.returncode == 130 and "interrupted" in err
    snaps = cli.ok("--json", "-r", str(repo.path), "snapshots").json()
    assert len(snaps) == 1  # no half snapshot is visible
    check = cli.run("-r", str(repo.path), "check", "--read-data")
    assert check.code == 0, check.err
    target = tmp_path / "out"
    cli.ok("-r", str(repo.path), "restore", snaps[0]["id"], "--target", str(target))
    assert tree_digest(target / small.relative_to("/")) == expected
    if how == "kill -9":
        # A stale lock of a dead process on this host does not block the next run.
        assert list((repo.path / "locks").iterdir())
    rerun = cli.ok("--json", "-r", str(repo.path), "backup", str(big)).json()
    if how == "ctrl-c":
        # What was uploaded before Ctrl-C was indexed and is reused.
        assert rerun["bytes_added"] < 160 * 1024 * 1024
    assert len(cli.ok("--json", "-r", str(repo.path), "snapshots").json()) == 2
    cli.ok("-r", str(repo.path), "check", "--read-data")


def test_two_backups_at_once_both_succeed(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a", seed=1)
    b = make_tree(tmp_path / "b", seed=2)
    procs = [cli.popen("-r", str(repo.path), "backup", str(p)) for p in (a, b)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    snaps = cli.ok("--json", "-r", str(repo.path), "snapshots").json()
    assert sorted(s["paths"][0] for s in snaps) == sorted([str(a), str(b)])
    cli.ok("-r", str(repo.path), "check", "--read-data")
    for src in (a, b):
        target = tmp_path / f"out-{src.name}"
        snap = next(s for s in snaps if s["paths"] == [str(src)])
        cli.ok("-r", str(repo.path), "restore", snap["id"], "--target", str(target))
        assert tree_digest(target / src.relative_to("/")) == tree_digest(src)


def _nobody_prefix() -> list[str] | None:
    """setpriv arguments that run a command as `nobody`, if that user can run our Python."""
    import pwd
    import shutil

    if shutil.which("setpriv") is None:
        return None
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import backvault.cli"], capture_output=True
    )
    return prefix if probe.returncode == 0 else None


def test_unreadable_file_makes_the_snapshot_incomplete(cli: Cli, tmp_path: Path) -> None:
    """A file the user cannot read is named, the rest is saved, and the exit code is 3."""
    prefix: list[str] = []
    work = tmp_path
    if os.geteuid() == 0:
        # Root reads everything: run the command as `nobody` where it can, else check the
        # same code path in-process with the read refused.
        found = _nobody_prefix()
        if found is None:
            _unreadable_file_in_process(tmp_path)
            return
        import tempfile

        prefix = found
        work = Path(tempfile.mkdtemp(prefix="backvault-nobody-"))
        os.chmod(work, 0o755)
    uid, gid = (int(prefix[1].split("=")[1]), int(prefix[2].split("=")[1])) if prefix else (-1, -1)
    home = work / "home"
    source = work / "src"
    try:
        if prefix:
            os.chown(work, uid, gid)
        source.mkdir()
        (source / "readable.txt").write_text("fine\n")
        blocked = source / "blocked.txt"
        blocked.write_text("x")
        os.chmod(blocked, 0)
        if prefix:
            for path in (source, source / "readable.txt", blocked):
                os.chown(path, uid, gid)
        env = {
            **cli.env,
            "HOME": str(home),
            "BACKVAULT_CONFIG_DIR": str(home / "config"),
            "BACKVAULT_CACHE_DIR": str(home / "cache"),
        }

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*prefix, sys.executable, "-m", "backvault.cli", "-r", str(work / "repo"), *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                cwd=work,
            )

        assert run("init").returncode == 0
        result = run("backup", str(source))
        assert result.returncode == 3, result.stderr
        assert "blocked.txt" in result.stderr and "Permission denied" in result.stderr
        listing = run("--json", "ls", "latest")
        names = {Path(e["path"]).name for e in json.loads(listing.stdout)["entries"]}
        assert "readable.txt" in names and "blocked.txt" not in names
    finally:
        if work is not tmp_path:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _unreadable_file_in_process(tmp_path: Path) -> None:
    import builtins
    from unittest import mock

    from backvault.engine.archiver import Backup

    source = tmp_path / "src"
    source.mkdir()
    (source / "readable.txt").write_text("fine\n")
    (source / "blocked.txt").write_text("x")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).endswith("blocked.txt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    repo = Repository.init(LocalBackend(tmp_path / "repo"), b"k" * 32)
    with mock.patch("builtins.open", refusing_open):
        result = Backup(repo).run([str(source)])
    assert [(Path(p).name, e) for p, e in result.errors] == [("blocked.txt", "Permission denied")]
    _, snap = repo.find_snapshot("latest")
    tree = snap.tree
    for part in source.parts[1:]:
        tree = next(n for n in repo.load_tree(tree) if n.name == part).subtree  # type: ignore[assignment]
    assert [n.name for n in repo.load_tree(tree)] == ["readable.txt"]


def test_global_options_work_after_the_command_name(cli: Cli, tmp_path: Path) -> None:
    repo = str(tmp_path / "r")
    doc = cli.ok("init", "--json", "-r", repo).json()
    assert len(doc["recovery_key"]) == 64
    assert cli.ok("snapshots", "-r", repo, "--json").json() == []
    assert cli.ok("snapshots", "-q", "-r", repo).out == ""


def test_config_names_the_environment_as_the_source_of_backvault_repo(
    cli: Cli, tmp_path: Path
) -> None:
    env = {"BACKVAULT_REPO": str(tmp_path / "from-env")}
    doc = cli.ok("--json", "config", env=env).json()
    assert doc["repository"] == str(tmp_path / "from-env")
    assert doc["sources"]["repository"] == "$BACKVAULT_REPO"
    assert "($BACKVAULT_REPO)" in cli.ok("config", env=env).out
    # A flag still beats the variable, and is named as the source.
    flagged = cli.ok("--json", "-r", str(tmp_path / "flag"), "config", env=env).json()
    assert flagged["repository"] == str(tmp_path / "flag")
    assert flagged["sources"]["repository"] == "flag"
    # The variable still opens the repository.
    cli.ok("init", env=env)
    assert (tmp_path / "from-env" / "config").exists()


def test_config_sets_realms_their_threshold_and_one_token_per_realm(cli: Cli) -> None:
    cli.ok(
        "config", "set", "vault.realms", "https://r1.example,https://r2.example https://r3.example"
    )
    cli.ok("config", "set", "vault.threshold", "2")
    cli.ok("config", "set", "vault.account", "alice")
    bad = cli.run("config", "set", "vault.realms", "r1.example")
    assert bad.code == 2 and "vault.realms 'r1.example' is not a realm" in bad.err
    assert (
        "goes with vault.token only"
        in cli.run("config", "set", "vault.url", "x", "--realm", "y").err
    )
    for n in (1, 2, 3):
        url = f"https://r{n}.example"
        cli.ok("config", "set", "vault.token", "-", "--realm", url, stdin_text=f"bvt_token{n}\n")
    doc = cli.ok("--json", "config").json()
    assert doc["vault.realms"] == ["https://r1.example", "https://r2.example", "https://r3.example"]
    assert doc["vault.threshold"] == 2
    shown = cli.ok("config").out
    assert "https://r1.example, https://r2.example" in shown and "bvt_token" not in shown
    tokens = list((cli.home / "config" / "realm-tokens").iterdir())
    assert len(tokens) == 3 and all(stat.S_IMODE(t.stat().st_mode) == 0o600 for t in tokens)
    cli.ok("config", "unset", "vault.token", "--realm", "https://r2.example")
    assert len(list((cli.home / "config" / "realm-tokens").iterdir())) == 2


def test_every_listed_command_loads_under_its_name() -> None:
    """The lazily loaded commands (cli/commands COMMANDS): each entry names a click command
    of that name, so `backvault NAME` and `--help` agree."""
    import click

    from backvault.cli.commands import COMMANDS
    from backvault.cli.main import cli as group

    ctx = click.Context(group)
    assert group.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = group.get_command(ctx, name)
        assert command is not None and command.name == name


def test_check_names_a_missing_pack_and_a_pack_of_the_wrong_size(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "src")
    run = ("-r", str(repo.path))
    cli.ok(*run, "backup", str(source), key=repo.key)
    packs = sorted(p for p in (repo.path / "data").rglob("*") if p.is_file())
    assert len(packs) >= 2
    missing, grown = packs[0], packs[1]
    os.chmod(missing, 0o600)
    missing.unlink()
    os.chmod(grown, 0o600)
    size = grown.stat().st_size
    with grown.open("ab") as handle:
        handle.write(b"\0" * 7)
    checked = cli.run(*run, "check", key=repo.key)
    assert checked.code != 0
    assert f"data/{missing.name} is missing (listed in the index)" in checked.err
    assert f"data/{grown.name} has {size + 7} bytes, the index implies {size}" in checked.err


def test_a_backup_that_reads_files_does_not_make_the_next_one_store_new_trees(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """Reading a file (or listing a folder) moves its access time once after a change
    (relatime). The tree records the time as it is after the backup's own read, so a
    backup right after, with nothing changed, keeps the same root tree."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "photo.jpg").write_bytes(os.urandom(200_000))
    db = sqlite3.connect(source / "chat.db")
    db.execute("CREATE TABLE m(body TEXT)")
    db.executemany("INSERT INTO m VALUES (?)", [("x" * 300,)] * 500)
    db.commit()
    db.close()
    old = time.time_ns() - 10 * 86400 * 10**9
    for path in (source / "photo.jpg", source / "chat.db", source):
        st = path.stat()
        os.utime(path, ns=(old, st.st_mtime_ns))  # read long ago: the next read moves it
    before = (source / "photo.jpg").stat().st_atime_ns
    run = ("-r", str(repo.path))
    cli.ok(*run, "backup", str(source), key=repo.key)
    if (source / "photo.jpg").stat().st_atime_ns == before:
        pytest.skip("this file system does not update access times on reads")
    cli.ok(*run, "backup", str(source), key=repo.key)
    trees = [s["tree"] for s in cli.ok("--json", *run, "snapshots", key=repo.key).json()]
    assert len(trees) == 2 and trees[0] == trees[1]
