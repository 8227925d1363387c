"""Attacks on `backvault import whatsapp` / `export whatsapp`, each performed through the real
command line and shown to fail.

Two attackers. Whoever holds the repository's master key can write any snapshot, tagged
``whatsapp``, with any manifest and any path (here: with `backvault backup` of a folder laid
out by hand, or a snapshot rewritten with the repository's own writer); the export of such
a snapshot must write nothing outside ``--target``, overwrite nothing, read nothing outside
the snapshot, and leave nothing half-written. Whoever can change a backup folder can plant
symlinks, FIFOs, files whose names clash, and headers whose text is anyone's; whoever holds
the WhatsApp key can make a file that inflates without end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import resource
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backvault.app.whatsapp import MANIFEST, MAX_FOLDER_DEPTH, key_check
from backvault.repo.repository import Repository
from backvault.source.whatsapp import crypt15
from backvault.storage import LocalBackend
from tests.conftest import Cli, CliResult, InitRepo
from tests.test_hostile_snapshots import remove_tree
from tests.test_whatsapp import encrypt_file, make_database, repo_listing

KEY = random.Random(20).randbytes(32)
ENV = {"BACKVAULT_WHATSAPP_KEY": KEY.hex()}


# --- helpers ---------------------------------------------------------------------------


def digest(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (itself included): type, mode, link target, a file's
    mtime and content (a folder's mtime changes when the export's staging folder comes and
    goes beside the target)."""
    entries: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(folder) / name
            st = path.lstat()
            entry: tuple[Any, ...] = (st.st_mode,)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISREG(st.st_mode):
                entry += (
                    st.st_mtime_ns,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
            entries[str(path.relative_to(root))] = entry
    return entries


def one_line(result: CliResult, code: int, starts: str) -> None:
    lines = result.err.strip().splitlines()
    assert result.code == code, result.err
    assert len(lines) == 1 and lines[0].startswith(f"backvault: {starts}"), result.err


def export(cli: Cli, repo: InitRepo, ref: str, target: Path) -> CliResult:
    return cli.run(
        "-r", str(repo.path), "export", "whatsapp", ref, "--target", str(target),
        key=repo.key, env=ENV,
    )  # fmt: skip


def import_(cli: Cli, repo: InitRepo, path: Path, **kwargs: Any) -> CliResult:
    return cli.run(
        "-r", str(repo.path), "import", "whatsapp", str(path), key=repo.key, env=ENV, **kwargs
    )  # fmt: skip


def genuine_manifest(stored: str = "msgstore.db") -> dict[str, Any]:
    """A manifest as `import whatsapp` writes it (the attacker copies the key check from a
    genuine import: it is in the snapshot, readable with the master key)."""
    info = crypt15.default_info("2.24.1.1", "42")
    entry = {"source": stored + ".crypt15", "key_type": 1, "info": info.hex()}
    entry.update({"payload": "zlib", "trailer": True})
    return {"version": 1, "key_check": key_check(KEY), "files": {stored: entry}}


@dataclasses.dataclass
class Scene:
    """A repository, a victim folder beside the export target, and the target's parent."""

    root: Path
    victim: Path
    parent: Path

    @property
    def target(self) -> Path:
        return self.parent / "out"

    @classmethod
    def make(cls, base: Path) -> Scene:
        victim = base / "victim"
        (victim / "sub").mkdir(parents=True)
        (victim / "victim.txt").write_text("original\n")
        (victim / "sub" / "msgstore.db.crypt15").write_text("the phone's own backup\n")
        parent = base / "exports"
        parent.mkdir()
        return cls(base, victim, parent)

    def untouched(self) -> dict[str, Any]:
        return {"victim": digest(self.victim), "parent": digest(self.parent)}


def hostile_backup(
    cli: Cli, repo: InitRepo, folder: Path, manifest: Any, files: dict[str, bytes]
) -> str:
    """A snapshot tagged ``whatsapp`` holding ``files`` and ``manifest`` as it is: what
    anyone with the master key can make with `backvault backup`."""
    folder.mkdir(parents=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (folder / MANIFEST).write_text(text)
    done = cli.ok(
        "--json", "-r", str(repo.path), "backup", str(folder), "--tag", "whatsapp", key=repo.key
    ).json()
    return str(done["snapshot_id"])


def rewrite_paths(repo: InitRepo, ref: str, paths: list[str]) -> str:
    """The snapshot ``ref`` saved again with other ``paths`` (the repository's own writer)."""
    opened = Repository.open(LocalBackend(repo.path), [repo.key.encode()])
    _, snap = opened.find_snapshot(ref)
    return opened.save_snapshot(dataclasses.replace(snap, paths=paths))


def genuine_import(cli: Cli, repo: InitRepo, base: Path) -> tuple[str, Path]:
    folder = base / "phone" / "WhatsApp"
    make_database(base / "msgstore.db", 300)
    encrypt_file(base / "msgstore.db", folder / "Databases" / "msgstore.db.crypt15", KEY)
    (folder / "Media").mkdir()
    (folder / "Media" / "photo.jpg").write_bytes(random.Random(3).randbytes(5000))
    done = cli.ok(
        "--json", "-r", str(repo.path), "import", "whatsapp", str(folder), key=repo.key, env=ENV
    ).json()
    return str(done["snapshot"]), folder


# --- 1. export writes nothing outside --target ----------------------------------------

DB = b"the chats, decrypted\n" * 200


def _escape(victim: Path) -> dict[str, Any]:
    doc = genuine_manifest()
    doc["files"]["msgstore.db"]["source"] = "../../victim/victim.txt"  # from exports/out
    return doc


def _absolute(victim: Path) -> dict[str, Any]:
    doc = genuine_manifest()
    doc["files"]["msgstore.db"]["source"] = str(victim / "victim.txt")
    return doc


def _stored_escape(victim: Path) -> dict[str, Any]:
    doc = genuine_manifest()
    doc["files"]["../../victim/sub/msgstore.db"] = doc["files"].pop("msgstore.db")
    doc["files"]["../../victim/sub/msgstore.db"]["source"] = "../../victim/sub/msgstore.db.crypt15"
    return doc


def _field(name: str, value: Any) -> Any:
    def build(victim: Path) -> dict[str, Any]:
        doc = genuine_manifest()
        doc["files"]["msgstore.db"][name] = value
        return doc

    return build


def _top(name: str, value: Any) -> Any:
    def build(victim: Path) -> dict[str, Any]:
        doc = genuine_manifest()
        if value is None:
            del doc[name]
        else:
            doc[name] = value
        return doc

    return build


HOSTILE_MANIFESTS = {
    "source climbs out (..)": (_escape, "the entry of 'msgstore.db': source"),
    "source absolute": (_absolute, "the entry of 'msgstore.db': source"),
    "stored name climbs out": (_stored_escape, "a file name '../../victim"),
    "source with a newline": (_field("source", "msgstore.db\n.crypt15"), "the entry of"),
    "key_type out of range": (_field("key_type", 7), "the entry of 'msgstore.db': key_type"),
    "key_type as text": (_field("key_type", "1"), "the entry of 'msgstore.db': key_type"),
    "key_type negative": (_field("key_type", -1), "the entry of 'msgstore.db': key_type"),
    "info not hex": (_field("info", "zz"), "the entry of 'msgstore.db': info"),
    "info too long": (_field("info", "0a" * 5000), "the entry of 'msgstore.db': info"),
    "info not protobuf": (_field("info", "ff" * 12), "the entry of 'msgstore.db': info"),
    "info with an escape": (
        _field("info", crypt15.default_info("2.2\x1b[2J\n").hex()),
        "the entry of 'msgstore.db': info",
    ),
    "payload unknown": (_field("payload", "gzip"), "the entry of 'msgstore.db': payload"),
    "trailer not a bool": (_field("trailer", "yes"), "the entry of 'msgstore.db': trailer"),
    "an extra field": (_field("mode", 0o4755), "the entry of 'msgstore.db': does not hold"),
    "no key check": (_top("key_check", None), "it does not hold exactly"),
    "version 2": (_top("version", 2), "version"),
    "files a list": (_top("files", ["msgstore.db"]), "files is not a mapping"),
    "not JSON": (lambda victim: "{not json", "it is not JSON"),
    "a list": (lambda victim: "[1, 2]", "it does not hold exactly"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_export_refuses_a_hostile_manifest_and_writes_nothing(
    cli: Cli, repo: InitRepo, tmp_path: Path, case: str
) -> None:
    scene = Scene.make(tmp_path / "scene")
    build, expected = HOSTILE_MANIFESTS[case]
    snap = hostile_backup(
        cli, repo, tmp_path / "evil" / "WhatsApp", build(scene.victim), {"msgstore.db": DB}
    )
    before = scene.untouched()
    result = export(cli, repo, snap[:8], scene.target)
    assert scene.untouched() == before  # no file replaced, nothing left beside the target
    assert not scene.target.exists()
    one_line(result, 1, f"the snapshot's WhatsApp manifest is damaged: {expected}")


def test_export_refuses_two_files_for_one_name(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    """A decrypted file and a file of the snapshot both written as msgstore.db.crypt15:
    one would replace the other."""
    scene = Scene.make(tmp_path / "scene")
    snap = hostile_backup(
        cli,
        repo,
        tmp_path / "evil" / "WhatsApp",
        genuine_manifest(),
        {"msgstore.db": DB, "msgstore.db.crypt15": b"planted"},
    )
    result = export(cli, repo, snap[:8], scene.target)
    one_line(result, 1, "the snapshot's WhatsApp manifest is damaged: ")
    assert "would both be written as 'msgstore.db.crypt15'" in result.err
    assert not scene.target.exists()


def test_export_refuses_a_manifest_naming_a_file_the_snapshot_lacks(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    scene = Scene.make(tmp_path / "scene")
    snap = hostile_backup(cli, repo, tmp_path / "evil" / "WhatsApp", genuine_manifest(), {})
    result = export(cli, repo, snap[:8], scene.target)
    one_line(result, 1, "the snapshot's WhatsApp manifest is damaged: it names 'msgstore.db'")


def test_export_refuses_a_target_that_is_a_symlink(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    snap, _ = genuine_import(cli, repo, tmp_path)
    scene = Scene.make(tmp_path / "scene")
    empty = scene.victim / "empty"
    empty.mkdir()
    os.symlink(empty, scene.target)
    before = scene.untouched()
    one_line(export(cli, repo, snap[:8], scene.target), 2, f"{scene.target} is a symbolic link")
    assert scene.untouched() == before


def test_an_export_that_fails_midway_leaves_nothing(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """The second file cannot be written (the process may not write files over a size the
    restore stays under, but an uncompressed crypt15 file exceeds): the first one, already
    written, must not stay behind."""
    folder = tmp_path / "phone" / "WhatsApp"
    folder.mkdir(parents=True)
    (folder / "a-photo.jpg").write_bytes(b"x" * 1000)
    plain = tmp_path / "z.backup"
    plain.write_bytes(random.Random(4).randbytes(200_000))
    encrypt_file(plain, folder / "z.backup.crypt15", KEY, compress=False, trailer=False)
    import_(cli, repo, folder)
    scene = Scene.make(tmp_path / "scene")
    before = scene.untouched()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_020, 200_020))

    args = ["-r", str(repo.path), "export", "whatsapp", "latest", "--target", str(scene.target)]
    proc = subprocess.run(
        [sys.executable, "-m", "backvault.cli", *args],
        capture_output=True,
        text=True,
        env={**cli.env, **ENV, "BACKVAULT_KEY": repo.key},
        preexec_fn=limit,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    one_line(CliResult(proc.returncode, proc.stdout, proc.stderr), 1, "cannot write z.backup")
    assert "nothing was exported" in proc.stderr
    assert scene.untouched() == before  # no target, no staging folder, no a-photo.jpg
    assert not scene.target.exists()


def test_exported_files_are_private(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    snap, _ = genuine_import(cli, repo, tmp_path)
    target = tmp_path / "out"
    target.mkdir()  # an empty folder is accepted, and replaced by the export's
    assert export(cli, repo, snap[:8], target).code == 0
    written = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
    assert [str(p) for p in written] == ["Databases/msgstore.db.crypt15", "Media/photo.jpg"]
    for path in target.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.export-")]


# --- 2. the snapshot's path stays inside the restored snapshot ------------------------


def test_a_snapshot_path_climbing_out_does_not_make_export_read_a_local_folder(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    snap, _ = genuine_import(cli, repo, tmp_path)
    scene = Scene.make(tmp_path / "scene")
    # A local folder laid out as an import (its manifest names its file), to be read.
    (scene.victim / "msgstore.db").write_bytes(b"local secrets")
    (scene.victim / MANIFEST).write_text(json.dumps(genuine_manifest()))
    (scene.victim / "sub" / "msgstore.db.crypt15").unlink()
    climbing = "/" + "../" * 40 + str(scene.victim).lstrip("/")
    forged = rewrite_paths(repo, snap, [climbing])
    result = export(cli, repo, forged[:8], scene.target)
    assert not scene.target.exists()  # the local secrets were not encrypted into it
    one_line(result, 1, f"snapshot {forged[:8]} is not a WhatsApp import: its path climbs out")


def test_a_snapshot_path_through_a_symlink_is_refused(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    scene = Scene.make(tmp_path / "scene")
    (scene.victim / "msgstore.db").write_bytes(b"local secrets")
    (scene.victim / MANIFEST).write_text(json.dumps(genuine_manifest()))
    (scene.victim / "sub" / "msgstore.db.crypt15").unlink()
    evil = tmp_path / "evil"
    evil.mkdir()
    os.symlink(scene.victim, evil / "WhatsApp")  # restored as a symlink, as it should be
    done = cli.ok(
        "--json", "-r", str(repo.path), "backup", str(evil), "--tag", "whatsapp", key=repo.key
    ).json()
    forged = rewrite_paths(repo, done["snapshot_id"], [str(evil / "WhatsApp")])
    result = export(cli, repo, forged[:8], scene.target)
    assert not scene.target.exists()  # the local secrets were not encrypted into it
    one_line(result, 1, f"snapshot {forged[:8]} is not a WhatsApp import: its path")
    assert "does not lead to a folder" in result.err


# --- 3. an import that decrypts nothing fails ------------------------------------------


def test_a_symlink_as_path_is_refused_by_name(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    make_database(tmp_path / "msgstore.db", 50)
    real = tmp_path / "real" / "msgstore.db.crypt15"
    encrypt_file(tmp_path / "msgstore.db", real, KEY)
    link = tmp_path / "msgstore.db.crypt15"
    os.symlink(real, link)
    before = repo_listing(repo)
    one_line(import_(cli, repo, link), 2, f"{link} is a symbolic link; give the file")
    assert repo_listing(repo) == before


def test_a_folder_whose_backups_are_all_symlinks_or_fifos_imports_nothing(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    make_database(tmp_path / "msgstore.db", 50)
    real = tmp_path / "elsewhere" / "msgstore.db.crypt15"
    encrypt_file(tmp_path / "msgstore.db", real, KEY)
    folder = tmp_path / "WhatsApp" / "Databases"
    folder.mkdir(parents=True)
    os.symlink(real, folder / "msgstore.db.crypt15")
    os.mkfifo(folder / "wa.db.crypt15")
    (tmp_path / "WhatsApp" / "Media").mkdir()
    (tmp_path / "WhatsApp" / "Media" / "photo.jpg").write_bytes(b"jpg")
    before = repo_listing(repo)
    result = import_(cli, repo, tmp_path / "WhatsApp", timeout=60)
    one_line(result, 1, "nothing was imported")
    assert "Databases/msgstore.db.crypt15: not a regular file" in result.err
    assert repo_listing(repo) == before
    # Nor does --info wait on the FIFO, or read through the symlink.
    info = cli.run("import", "whatsapp", "--info", str(tmp_path / "WhatsApp"), timeout=60)
    assert info.code == 2
    assert "Databases/wa.db.crypt15 is not a regular file" in info.err
    assert "Databases/msgstore.db.crypt15 is not a regular file" in info.err


@pytest.mark.parametrize("command", ["import", "--info"])
def test_a_backup_folder_nested_deeper_than_the_recursion_limit_is_refused_in_one_line(
    cli: Cli, repo: InitRepo, tmp_path: Path, command: str
) -> None:
    """Its listing recursed (``os.walk``): a Media folder 1500 levels deep ended the
    import in "internal error". A WhatsApp backup is a few levels deep: one line now,
    nothing imported; a folder at the limit is imported."""
    folder = tmp_path / "WhatsApp"
    (folder / "Databases").mkdir(parents=True)
    make_database(tmp_path / "msgstore.db", 50)
    encrypt_file(tmp_path / "msgstore.db", folder / "Databases" / "msgstore.db.crypt15", KEY)
    deep = folder / "Media"
    deep.mkdir()
    for _ in range(1500):  # a level at a time: Path.mkdir(parents=True) recurses too
        deep = deep / "d"
        deep.mkdir()
        if len(deep.relative_to(folder).parts) == MAX_FOLDER_DEPTH:
            (deep / "photo.jpg").write_bytes(b"at the limit")
    before = repo_listing(repo)
    try:
        if command == "import":
            result = import_(cli, repo, folder, timeout=120)
        else:
            result = cli.run("import", "whatsapp", "--info", str(folder), timeout=120)
        one_line(result, 2, f"{folder} has folders nested more than {MAX_FOLDER_DEPTH} deep")
        assert repo_listing(repo) == before
    finally:  # (shutil.rmtree, and pytest's clean-up, recurse: cut the tree first)
        remove_tree(
            folder / "Media" / Path(*["d"] * (MAX_FOLDER_DEPTH - 1)) / "d", tmp_path / "spare"
        )
    # At the limit: imported, the deepest photo with it.
    if command == "import":
        cli.ok("-r", str(repo.path), "import", "whatsapp", str(folder), key=repo.key, env=ENV)


# --- 4. header text, tampering, name clashes, bombs -----------------------------------


def test_header_text_is_escaped_and_kept_out_of_tags(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    make_database(tmp_path / "msgstore.db", 50)
    bad = tmp_path / "in" / "msgstore.db.crypt15"
    bad.parent.mkdir()
    info = crypt15.default_info("2.22\x1b[31mRED\x1b[0m\nFAKE LINE, whatsapp-9", "6\n7")
    with open(tmp_path / "msgstore.db", "rb") as src, open(bad, "wb") as out:
        crypt15.encrypt(src, out, KEY, info=info)
    result = import_(cli, repo, bad)
    assert result.code == 0, result.err
    for text in (result.out, result.err):
        assert "\x1b" not in text
        assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert "\\x1b[31mRED" in result.out
    assert "not a plain version number: the snapshot is not tagged with it" in result.err
    [snap] = cli.ok("--json", "-r", str(repo.path), "snapshots", key=repo.key).json()
    assert snap["tags"] == ["whatsapp"]
    shown = cli.ok("import", "whatsapp", "--info", str(bad))
    assert "\x1b" not in shown.out and "\\x0aFAKE LINE" in shown.out
    assert "…6\\x0a7" in shown.out


def test_a_tampered_file_with_a_recomputed_checksum_is_not_blamed_on_the_key(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    make_database(tmp_path / "msgstore.db", 200)
    path = tmp_path / "msgstore.db.crypt15"
    encrypt_file(tmp_path / "msgstore.db", path, KEY)
    body = bytearray(path.read_bytes()[:-16])
    body[-1] ^= 1  # in the GCM tag: the content still decrypts and inflates
    path.write_bytes(bytes(body) + hashlib.md5(body, usedforsecurity=False).digest())
    before = repo_listing(repo)
    result = import_(cli, repo, path)
    one_line(result, 1, "msgstore.db.crypt15 opens with this key but fails authentication")
    assert "another key" not in result.err
    assert repo_listing(repo) == before


@pytest.mark.parametrize(
    ("planted", "named"),
    [
        ("Databases/msgstore.db", "Databases/msgstore.db.crypt15 would be stored as"),
        (MANIFEST, f"{MANIFEST} would be stored as {MANIFEST}"),
        (MANIFEST + ".crypt15", f"{MANIFEST}.crypt15 would be stored as {MANIFEST}"),
        ("Databases.crypt15", "Databases.crypt15 would be stored as Databases, the name of"),
    ],
)
def test_names_that_clash_are_refused_naming_the_file(
    cli: Cli, repo: InitRepo, tmp_path: Path, planted: str, named: str
) -> None:
    make_database(tmp_path / "msgstore.db", 50)
    folder = tmp_path / "WhatsApp"
    encrypt_file(tmp_path / "msgstore.db", folder / "Databases" / "msgstore.db.crypt15", KEY)
    if planted.endswith(".crypt15"):
        encrypt_file(tmp_path / "msgstore.db", folder / planted, KEY)
    else:
        (folder / planted).write_bytes(b"planted")
    before = repo_listing(repo)
    result = import_(cli, repo, folder)
    one_line(result, 2, named)
    assert repo_listing(repo) == before


def test_a_file_that_inflates_beyond_the_limit_is_refused(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    """The limit is 64 GiB; lowered here to 4 MiB (in the command's own process, by a
    sitecustomize module) so that a 5 MiB stream shows the refusal in a second."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "from backvault.source.whatsapp import crypt15\ncrypt15.MAX_PLAIN_BYTES = 4 << 20\n"
    )
    plain = tmp_path / "zeros"
    plain.write_bytes(bytes(5 << 20))
    bomb = tmp_path / "msgstore.db.crypt15"
    encrypt_file(plain, bomb, KEY)
    assert bomb.stat().st_size < 50_000
    before = repo_listing(repo)
    path_env = os.pathsep.join(filter(None, [str(patch), os.environ.get("PYTHONPATH")]))
    result = cli.run(
        "-r", str(repo.path), "import", "whatsapp", str(bomb),
        key=repo.key, env={**ENV, "PYTHONPATH": path_env},
    )  # fmt: skip
    one_line(result, 1, "msgstore.db.crypt15 decompresses to more than 4194304 bytes")
    assert repo_listing(repo) == before
    assert not list((cli.home / "cache").rglob("msgstore.db"))
