"""What two red teams found in restore, each performed for real and shown to fail.

A local user who can write into a folder the restore writes into (her home, restored by
root; a target she made; a folder kept by ``--overwrite``) races the restore from a real
second process, as the red teams did: it watches the folder with inotify and renames a
symlink, or a hard link of its own file, over every name the restore makes there; it
plants hard links under the temporary names it predicts; it swaps the restore's private
folder, or the target itself, for its own. Whatever it does, nothing outside the target
changes. Then: ``--overwrite`` keeps what it replaces until the replacement is complete,
and one entry that cannot be made never stops the restore; out-of-range numbers in a tree
are damage, not a crash; a snapshot whose folders share subtrees 2^40 times over is refused
at once (and named by ``check``); nesting thousands deep costs a few opens per folder;
device nodes and setuid bits come back only when asked for.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backvault.engine import parallel
from backvault.engine.check import Checker
from backvault.engine.restorer import Restorer
from backvault.engine.restorer.selection import group_runs
from backvault.repo import blobs as blobs_module
from backvault.repo import format as fmt
from backvault.repo.errors import RepositoryError
from backvault.repo.format import BlobType
from backvault.repo.repository import Repository
from backvault.storage import FileType, LocalBackend
from tests.conftest import Cli
from tests.test_hostile_snapshots import PROCESSES, THREADS, Hostile, World, link, remove_tree

ROOT = os.geteuid() == 0
ATTACKER = 65534  # nobody: the local user who races the restore
needs_root = pytest.mark.skipif(not ROOT, reason="the racer drops from root to another user")
MODES = [PROCESSES, THREADS]
MODE_IDS = ["processes", "threads"]


def fingerprint(root: Path) -> dict[str, Any]:
    """Type, mode, owner, mtime and content of everything below ``root`` (not link
    counts: a racer may link its own file as often as it likes)."""
    found: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(folder) / name
            st = path.lstat()
            entry: tuple[Any, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISREG(st.st_mode):
                entry += (path.read_bytes(),)
            found[str(path.relative_to(root))] = entry
    return found


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".backvault-" in p.name]


# --- the racer ---------------------------------------------------------------------------

RACER = r"""
import ctypes, os, re, select, struct, sys
mode, folder, victim, uid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init()
IN_OPEN, IN_MOVED_TO, IN_CREATE = 0x20, 0x80, 0x100
libc.inotify_add_watch(watch, folder.encode(), IN_OPEN if mode == "swap-target" else IN_CREATE | IN_MOVED_TO)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
print("ready", flush=True)
count = 0
done = False
while True:
    select.select([watch], [], [])
    events = os.read(watch, 65536)
    pos = 0
    while pos < len(events):
        _, mask, _, length = struct.unpack_from("iIII", events, pos)
        name = events[pos + 16 : pos + 16 + length].rstrip(b"\0").decode(errors="surrogateescape")
        pos += 16 + length
        if name.startswith(".racer"):
            continue
        count += 1
        mine = os.path.join(folder, f".racer{count}")
        try:
            if mode == "swap-target" and not name and not done:
                done = True
                os.rename(folder, folder + ".moved")
                os.symlink(victim, folder)
            elif mode == "symlink" and name:
                os.symlink(victim, mine)
                os.rename(mine, os.path.join(folder, name))
            elif mode == "own-file" and name:
                os.link(victim, mine)
                os.rename(mine, os.path.join(folder, name))
            elif mode == "plant" and name.startswith(".backvault-") and not done:
                done = True
                prefix, number = re.fullmatch(r"(.*?)(\d*)", name).groups()
                first = int(number) + 1 if number else 0
                for k in range(first, first + 300):
                    try:
                        os.link(victim, os.path.join(folder, f"{prefix}{k}"))
                    except OSError:
                        pass
            elif mode == "swap-staging" and name.startswith(".backvault-") and not done:
                done = True
                os.rename(os.path.join(folder, name), os.path.join(folder, ".racer-stolen"))
                os.mkdir(os.path.join(folder, name))
        except OSError as exc:
            print("missed", name, exc, flush=True)
"""


def start_racer(mode: str, folder: Path, victim: Path) -> subprocess.Popen[str]:
    """The racer starts as root (to import what it needs), then drops to ATTACKER."""
    racer = subprocess.Popen(
        [sys.executable, "-c", RACER, mode, str(folder), str(victim), str(ATTACKER)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
    return racer


def stop(racer: subprocess.Popen[str]) -> None:
    racer.kill()
    racer.communicate()


def racy_snapshot(h: Hostile, owner: int, mode: int) -> str:
    """Thirty 1 MB files, fifos and hard-link pairs, all owned by ``owner`` with ``mode``:
    what root's restore chowns and chmods, and the racer tries to turn on its victim."""
    nodes = [
        h.file(f"f{i:02d}", os.urandom(1_000_000), mode=mode, uid=owner, gid=owner)
        for i in range(30)
    ]
    for i in range(5):
        nodes.append(
            {
                "name": f"pipe{i}",
                "type": "fifo",
                "mode": fmt.GO_MODE_NAMED_PIPE | (mode & 0o777),
                "uid": owner,
                "gid": owner,
                "content": None,
            }
        )
        shared = {"links": 2, "inode": 1000 + i, "device_id": 1, "uid": owner, "gid": owner}
        nodes.append(h.file(f"same{i}a", b"linked\n", mode=mode, **shared))
        nodes.append(h.file(f"same{i}b", b"linked\n", mode=mode, **shared))
    return h.snapshot(nodes)


@needs_root
@pytest.mark.parametrize("env", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("racer_mode", ["symlink", "own-file", "plant", "swap-staging"])
def test_a_local_user_racing_a_root_restore_changes_nothing_outside_the_target(
    open_dir: Path, cli: Cli, env: dict[str, str], racer_mode: str
) -> None:
    """Root restores into a folder the attacker can write (her home, say). The racer
    renames a symlink to a root-only file (``symlink``), or a hard link of her own
    program (``own-file``), over every name the restore makes there; or plants hard links
    of her file under the temporary names it predicts from the first one (``plant``); or
    swaps the restore's private folder for one of hers (``swap-staging``). Before the fix,
    root chmod'ed the root-only file 0666, made her program root-owned setuid, and wrote
    the snapshot's data into her file."""
    outside = open_dir / "outside"
    outside.mkdir()
    shadow = outside / "shadow"
    shadow.write_text("root:$6$secret\n")
    os.chmod(shadow, 0o600)
    hers = outside / "alice"
    hers.mkdir()
    program = hers / "program"
    program.write_bytes(b"#!/bin/sh\necho alice\n" * 1000)
    os.chmod(program, 0o755)
    for path in (hers, program):
        os.chown(path, ATTACKER, ATTACKER)
    target = open_dir / "target"
    target.mkdir()
    os.chown(target, ATTACKER, ATTACKER)
    h = Hostile(open_dir / "repo")
    if racer_mode == "symlink":
        snapshot_id, victim = racy_snapshot(h, owner=ATTACKER, mode=0o666), shadow
    else:
        snapshot_id, victim = racy_snapshot(h, owner=0, mode=0o755 | fmt.GO_MODE_SETUID), program
    before = fingerprint(outside)
    racer = start_racer(racer_mode, target, victim)
    try:
        result = cli.run(
            "-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key, env=env
        )
    finally:
        stop(racer)
    assert fingerprint(outside) == before, result.err
    assert "internal error" not in result.err, result.err
    assert result.code in (0, 1, 3), result.err


@needs_root
@pytest.mark.parametrize("env", MODES, ids=MODE_IDS)
def test_a_target_swapped_for_a_symlink_after_the_restore_opened_it_is_not_followed(
    open_dir: Path, cli: Cli, env: dict[str, str]
) -> None:
    """Root restores into /home/alice/restored; alice owns /home/alice. The moment the
    restore opens the (empty) target, she replaces it with a symlink to a root-owned
    folder (``etc``). Before the fix the restore checked the target by path and opened it
    by path again later, so it wrote the snapshot into ``etc``."""
    etc = open_dir / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    home = open_dir / "home-alice"
    home.mkdir()
    os.chown(home, ATTACKER, ATTACKER)
    target = home / "restored"
    target.mkdir()
    os.chown(target, ATTACKER, ATTACKER)
    h = Hostile(open_dir / "repo")
    nodes = [h.file("ld.so.preload", b"/home/alice/evil.so\n")]
    nodes += [
        h.folder(f"d{i}", [h.file(f"f{j}", os.urandom(3000)) for j in range(3)]) for i in range(100)
    ]
    snapshot_id = h.snapshot(nodes)
    before = fingerprint(etc)
    racer = start_racer("swap-target", target, etc)
    try:
        result = cli.run(
            "-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key, env=env
        )
    finally:
        stop(racer)
    assert target.is_symlink(), "the racer did not get to swap the target"
    assert fingerprint(etc) == before, result.err
    assert "internal error" not in result.err, result.err
    if result.code == 0:  # what was restored went into the folder the restore opened
        assert (home / "restored.moved" / "ld.so.preload").read_bytes() == b"/home/alice/evil.so\n"
    else:
        assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
        assert "moved or replaced" in result.err, result.err


@needs_root
def test_root_is_warned_when_other_users_can_change_the_target(open_dir: Path, cli: Cli) -> None:
    h = Hostile(open_dir / "repo")
    snapshot_id = h.snapshot([h.file("a.txt", b"a\n")])
    home = open_dir / "home-alice"
    home.mkdir()
    os.chown(home, ATTACKER, ATTACKER)
    shared = open_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    safe = open_dir / "safe"
    for target, culprit in ((home / "restored", home), (shared / "out", shared), (safe, None)):
        result = cli.ok(
            "-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key
        )
        warnings = [line for line in result.err.splitlines() if "other users" in line]
        if culprit is None:
            assert warnings == [], result.err
        else:
            assert len(warnings) == 1 and str(culprit) in warnings[0], result.err
        assert (target / "a.txt").read_bytes() == b"a\n"


# --- a worker writes only into the file this restore created ---------------------------


def staged_file(world: World) -> Any:
    """A temporary file as the restore makes one: in a private folder of the target,
    created once (O_EXCL), its identity recorded."""
    from backvault.engine.target_folders import StagedFile, StagingRef

    staging = world.target / ".backvault-restore-test"
    staging.mkdir(mode=0o700)
    fd = os.open(staging / "f1", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    st = os.fstat(fd)
    os.close(fd)
    folder = staging.stat()
    return StagedFile(
        StagingRef(str(staging), folder.st_dev, folder.st_ino), "f1", st.st_dev, st.st_ino
    )


def test_a_worker_never_writes_into_a_file_it_did_not_create(tmp_path: Path) -> None:
    """The temporary file's name now leads to a hard link of an outside file (planted by
    someone who predicted the name, or renamed over it): the worker refuses it."""
    from backvault.engine.restorer import restore_runs
    from backvault.engine.target_folders import UnsafeTarget
    from backvault.repo.blobs import BlobReader

    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    h.snapshot([h.file("x", b"snapshot data\n")])
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    (run,) = group_runs(repo, [fmt.sha256(b"snapshot data\n")])
    staged = staged_file(world)
    before = world.digest()
    staging = Path(staged.staging.path)
    os.unlink(staging / "f1")
    os.link(world.victim, staging / "f1")
    outcomes = restore_runs(
        BlobReader(repo.backend, repo.key), [(run.pack_id, run.entries, staged, 0)]
    )
    assert len(outcomes) == 1 and isinstance(outcomes[0], UnsafeTarget), outcomes
    assert world.digest() == before


def test_a_worker_refuses_a_private_folder_that_was_replaced(tmp_path: Path) -> None:
    from backvault.engine.restorer import restore_runs
    from backvault.repo.blobs import BlobReader
    from backvault.repo.errors import RepositoryError

    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    h.snapshot([h.file("x", b"snapshot data\n")])
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    (run,) = group_runs(repo, [fmt.sha256(b"snapshot data\n")])
    staged = staged_file(world)
    staging = Path(staged.staging.path)
    os.rename(staging, world.root / "moved")
    os.symlink(world.outside, staging)
    os.link(world.victim, world.outside / "f1")
    before = world.digest()
    with pytest.raises(RepositoryError, match="moved or replaced"):
        restore_runs(BlobReader(repo.backend, repo.key), [(run.pack_id, run.entries, staged, 0)])
    assert world.digest() == before


# --- --overwrite keeps the old until the new is complete --------------------------------


def _lie_in_index(h: Hostile, blob: str, length: int) -> None:
    """Rewrite the index so that ``blob`` claims ``length`` bytes of plaintext."""
    h.rewrite_index_entry(blob, uncompressed_length=length)


def _flip_a_byte(h: Hostile, blob: str) -> None:
    location = h.repo.lookup(bytes.fromhex(blob))
    assert location is not None
    name = location.pack_id.hex()
    pack = h.path / "data" / name[:2] / name
    os.chmod(pack, 0o600)
    data = bytearray(pack.read_bytes())
    data[location.blob.offset + 20] ^= 0xFF
    pack.write_bytes(bytes(data))


def _damaged_db(h: Hostile, how: str) -> dict[str, Any]:
    """The snapshot's version of ``chat.db``, damaged in one of the ways the red team
    found (``check`` without --read-data sees none of them)."""
    if how == "missing blob":
        node = h.file("chat.db", b"")
        node.update(content=["cd" * 32], size=100)
        return node
    if how == "size larger than its content":
        return h.file("chat.db", b"short", size=10**6)
    first = h.writer.add(BlobType.DATA, b"A" * 100_000).hex()
    h.writer.flush()
    second = h.writer.add(BlobType.DATA, os.urandom(50_000)).hex()
    h.writer.flush()
    node = {**h.file("chat.db", b""), "content": [first, second], "size": 150_000}
    if how == "index lies about a blob's length":
        _lie_in_index(h, first, 2**45)
    elif how == "index lies about a later blob's length":
        # Within a blob's limit, so only the file's size shows the lie; its first run is
        # sent before the lie is met (runs are made as they are sent).
        _lie_in_index(h, second, 1_000_000)
    elif how == "missing blob after runs were sent":
        node.update(content=[first, second, "cd" * 32], size=150_100)
    elif how == "index and tree agree on a 32 TiB file":
        _lie_in_index(h, first, 2**45)
        node["size"] = 2**45 + 50_000
    else:
        _flip_a_byte(h, second)
    return node


DAMAGE = [
    "missing blob",
    "size larger than its content",
    "index lies about a blob's length",
    "index lies about a later blob's length",
    "missing blob after runs were sent",
    "index and tree agree on a 32 TiB file",
    "blob altered in its pack",
]


_DAMAGE_MESSAGES = {
    "index lies about a later blob's length": (
        "its blobs hold at least 1100000 bytes by the index, its entry says 150000"
    ),
    "missing blob after runs were sent": "blob cdcdcdcdcdcd is damaged: it is not in any index",
}


@pytest.mark.parametrize("env", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("how", DAMAGE)
def test_overwrite_keeps_a_file_whose_replacement_is_damaged(
    tmp_path: Path, cli: Cli, how: str, env: dict[str, str]
) -> None:
    """Before the fix --overwrite removed the file first: a damaged replacement (or an
    index claiming 2^45 bytes, which aborted the whole restore with EFBIG) left neither."""
    h = Hostile(tmp_path / "repo")
    nodes = [_damaged_db(h, how)]
    nodes += [h.file(f"f{i:02d}", f"new {i}\n".encode() * 20_000) for i in range(20)]
    snapshot_id = h.snapshot(nodes)
    target = tmp_path / "target"
    target.mkdir()
    for name in ["chat.db", *(f"f{i:02d}" for i in range(20))]:
        (target / name).write_text(f"precious {name}\n")
    result = cli.run(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(target), "--overwrite",
        key=h.key, env=env,
    )  # fmt: skip
    assert result.code == 3, result.err
    assert (target / "chat.db").read_text() == "precious chat.db\n"
    for i in range(20):
        assert (target / f"f{i:02d}").read_bytes() == f"new {i}\n".encode() * 20_000
    assert [line for line in result.err.splitlines() if line.startswith("not restored")] == [
        line for line in result.err.splitlines() if line.startswith("not restored: /chat.db: ")
    ]
    if how in _DAMAGE_MESSAGES:  # found while the file's runs were being sent
        assert f"not restored: /chat.db: {_DAMAGE_MESSAGES[how]}" in result.err, result.err
    assert leftovers(target) == []
    if how.startswith("index"):  # the lie is in what check --read-data compares
        checked = cli.run("-r", str(h.path), "check", "--read-data", key=h.key)
        assert checked.code == 3 and "does not match the pack header" in checked.err, checked.err


def test_overwrite_replaces_folders_files_and_symlinks_without_removing_first(
    tmp_path: Path, cli: Cli
) -> None:
    """A file where a folder was, a folder where a file was, a file over a symlink (not
    through it), a symlink over a file; and where the replacement is damaged (a file with
    a missing blob over a folder, a folder with a missing tree over a file) the old entry
    stays as it was."""
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    album = h.file("album", b"")
    album.update(content=["ab" * 32], size=10)
    diary = h.folder("diary", [])
    diary["subtree"] = "cd" * 32
    snapshot_id = h.snapshot(
        [
            h.file("photos", b"now a file\n"),
            h.folder("notes", [h.file("n.txt", b"now a folder\n")]),
            h.file("link", b"now a file, not written through\n"),
            link("doc.txt", "now-a-symlink"),
            album,
            diary,
        ]
    )
    t = world.target
    (t / "photos").mkdir()
    (t / "photos" / "p1.jpg").write_text("old photo\n")
    (t / "notes").write_text("old notes\n")
    os.symlink(world.victim, t / "link")
    (t / "doc.txt").write_text("old doc\n")
    (t / "album").mkdir()
    (t / "album" / "a1.jpg").write_text("keep me\n")
    (t / "diary").write_text("keep me too\n")
    before = world.digest()
    result = cli.run(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(t), "--overwrite", key=h.key
    )
    assert result.code == 3, result.err
    assert world.digest() == before
    assert (t / "photos").read_bytes() == b"now a file\n"
    assert (t / "notes" / "n.txt").read_bytes() == b"now a folder\n"
    assert not (t / "link").is_symlink()
    assert (t / "link").read_bytes() == b"now a file, not written through\n"
    assert os.readlink(t / "doc.txt") == "now-a-symlink"
    assert (t / "album" / "a1.jpg").read_text() == "keep me\n"
    assert (t / "diary").read_text() == "keep me too\n"
    assert "not restored: /album:" in result.err and "not restored: /diary:" in result.err
    assert leftovers(t) == []


def test_overwrite_with_include_puts_back_what_a_folder_walked_for_nothing_replaced(
    tmp_path: Path, cli: Cli
) -> None:
    """--include 'b.txt' walks every folder (one may hold a b.txt); where a walked folder
    of the snapshot holds none, the file that had its name in the target was deleted."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot(
        [h.folder("notes", [h.file("a.txt", b"a\n")]), h.file("b.txt", b"new b\n")]
    )
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes").write_text("my notes\n")
    (target / "b.txt").write_text("old b\n")
    cli.ok(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(target), "--overwrite",
        "--include", "b.txt", key=h.key,
    )  # fmt: skip
    assert (target / "notes").read_text() == "my notes\n"
    assert (target / "b.txt").read_text() == "new b\n"
    assert leftovers(target) == []


def test_one_entry_the_target_refuses_is_reported_and_the_rest_restored(
    tmp_path: Path, cli: Cli
) -> None:
    """A folder kept by --overwrite refuses new entries: immutable (EPERM, even for root)
    or, for another user, not writable (EACCES). Before the fix the first refused entry
    aborted the restore, after --overwrite had removed what it replaced."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot(
        [
            h.file("a.txt", b"new a\n"),
            h.folder(
                "locked",
                [
                    h.file("old.txt", b"new old\n"),
                    link("l", "somewhere"),
                    {"name": "p", "type": "fifo", "mode": fmt.GO_MODE_NAMED_PIPE | 0o600},
                ],
            ),
            h.file("z.txt", b"new z\n"),
        ]
    )
    target = tmp_path / "target"
    (target / "locked").mkdir(parents=True)
    (target / "a.txt").write_text("old a\n")
    (target / "locked" / "old.txt").write_text("precious\n")
    if ROOT:
        lock = subprocess.run(["chattr", "+i", str(target / "locked")], capture_output=True)
        if lock.returncode != 0:
            pytest.skip(f"no immutable folders here: {lock.stderr.decode().strip()}")
    else:
        os.chmod(target / "locked", 0o555)
    try:
        result = cli.run(
            "-r", str(h.path), "restore", snapshot_id, "--target", str(target), "--overwrite",
            key=h.key, env=PROCESSES,
        )  # fmt: skip
    finally:
        subprocess.run(["chattr", "-i", str(target / "locked")], capture_output=True)
        os.chmod(target / "locked", 0o755)
    assert result.code == 3, result.err
    assert (target / "a.txt").read_bytes() == b"new a\n"
    assert (target / "z.txt").read_bytes() == b"new z\n"
    assert sorted(os.listdir(target / "locked")) == ["old.txt"]
    assert (target / "locked" / "old.txt").read_text() == "precious\n"
    refused = sorted(
        line.split(": ")[1] for line in result.err.splitlines() if line.startswith("not restored: ")
    )
    assert refused == ["/locked/l", "/locked/old.txt", "/locked/p"], result.err
    assert leftovers(target) == []


# --- folders that share subtrees, and deep nesting ---------------------------------------


def dag_bomb(h: Hostile, levels: int) -> str:
    """``levels`` trees, each holding two folders that share the next tree: 2^levels
    folders when restored, from a repository of a few kilobytes."""
    sub = h.tree([h.file("leaf", b"x")])
    for _ in range(levels):
        a, b = h.folder("a", []), h.folder("b", [])
        a["subtree"] = b["subtree"] = sub
        sub = h.tree([a, b])
    h.writer.flush()
    from backvault.repo.format import Snapshot
    from backvault.repo.timefmt import format_ns

    snap = Snapshot(time=format_ns(1_700_000_000_000_000_000), tree=bytes.fromhex(sub), paths=["/"])
    return h.repo.save_snapshot(snap)


def test_a_snapshot_whose_folders_share_subtrees_2_to_the_40_times_is_refused(
    tmp_path: Path, cli: Cli
) -> None:
    """Before the fix ``check`` passed it in a second and ``restore`` never ended."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = dag_bomb(h, 40)
    target = tmp_path / "target"
    result = cli.run(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key, timeout=120
    )
    assert result.code == 1, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert snapshot_id[:8] in result.err and "entries" in result.err, result.err
    assert not target.exists() or os.listdir(target) == []
    checked = cli.run("-r", str(h.path), "check", key=h.key, timeout=120)
    assert checked.code == 3 and snapshot_id[:8] in checked.err and "entries" in checked.err, (
        checked.err
    )
    listed = cli.run("-r", str(h.path), "ls", snapshot_id, key=h.key, timeout=120)
    assert listed.code == 3 and "expands to" in listed.err and listed.out == "", listed.err


def test_folders_that_share_a_subtree_restore_each_in_full(tmp_path: Path) -> None:
    """Shared trees are legitimate (every empty folder is the same tree): a snapshot of
    2^10 folders under the limit restores, and a lower limit refuses it before writing."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = dag_bomb(h, 10)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    assert Checker(repo).run().errors == []
    snapshot = repo.find_snapshot(snapshot_id)[1]
    refused = tmp_path / "refused"
    with pytest.raises(RepositoryError, match="entries"):
        Restorer(repo, refused, max_entries=3000).run(snapshot)
    assert not refused.exists() or os.listdir(refused) == []
    target = tmp_path / "target"
    outcome = Restorer(repo, target).run(snapshot)
    assert outcome.damaged == [] and outcome.files == 2**10 and outcome.dirs == 2**11 - 2
    assert (target / ("a/" * 5 + "b/" * 5) / "leaf").read_bytes() == b"x"


DEEP_RESTORE = r"""
import json, os, sys
from pathlib import Path
from backvault.engine.restorer import Restorer
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
repo_path, key, snapshot_id, target = sys.argv[1:5]
opens = {"folders": 0}
def count(event, args):
    if event == "open":
        opens["folders"] += 1
sys.addaudithook(count)
repo = Repository.open(LocalBackend(repo_path), [key.encode()])
outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1])
print(json.dumps({"opens": opens["folders"], "dirs": outcome.dirs, "damaged": outcome.damaged}))
"""


def test_deep_nesting_opens_each_folder_a_few_times(tmp_path: Path) -> None:
    """2500 levels, a file at the bottom: the restore opens each folder a bounded number
    of times (made, left, reached again for the file at the bottom; every open of the
    process is counted), not once per level above it as the deepest-first metadata pass
    did (cubic in the depth: 127 s for 4000 levels)."""
    depth = 2500
    h = Hostile(tmp_path / "repo")
    nodes = [h.file("leaf.txt", b"deep\n")]
    for _ in range(depth):
        nodes = [h.folder("d", nodes, mode=0o750)]
    snapshot_id = h.snapshot(nodes)
    target = tmp_path / "target"
    try:
        probe = subprocess.run(
            [sys.executable, "-c", DEEP_RESTORE, str(h.path), h.key, snapshot_id, str(target)],
            capture_output=True,
            text=True,
            env={**os.environ, **THREADS},
            timeout=600,
        )
        assert probe.returncode == 0, probe.stderr
        outcome = json.loads(probe.stdout)
        assert outcome["damaged"] == [] and outcome["dirs"] == depth
        assert outcome["opens"] <= 4 * depth, outcome
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(depth):
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            assert stat.S_IMODE(os.fstat(inner).st_mode) == 0o750
            os.close(fd)
            fd = inner
        leaf = os.open("leaf.txt", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 10) == b"deep\n"
        os.close(leaf)
        os.close(fd)
    finally:
        if target.exists():
            remove_tree(target, tmp_path / "spare")


# --- device nodes and setuid bits only when asked for -----------------------------------


def special_snapshot(h: Hostile) -> str:
    disk = os.stat("/").st_dev
    return h.snapshot(
        [
            {
                "name": "mem",
                "type": "chardev",
                "mode": fmt.GO_MODE_DEVICE | fmt.GO_MODE_CHAR_DEVICE | 0o666,
                "device": os.makedev(1, 1),
            },
            {"name": "disk", "type": "dev", "mode": fmt.GO_MODE_DEVICE | 0o666, "device": disk},
            h.file("suid", b"#!/bin/sh\nid\n", mode=0o755 | fmt.GO_MODE_SETUID),
            h.file("sgid", b"#!/bin/sh\nid\n", mode=0o755 | fmt.GO_MODE_SETGID),
            h.folder("shared", [h.file("x", b"x\n")], mode=0o775 | fmt.GO_MODE_SETGID),
            h.file("plain", b"plain\n", mode=0o640),
        ]
    )


def test_device_nodes_and_setuid_bits_need_a_flag(tmp_path: Path, cli: Cli) -> None:
    """A chat history never holds device nodes or setuid programs; a hostile snapshot
    restored by root made a 0666 node of /dev/mem and of the root disk, and setuid-root
    files. Without --special-files / --keep-setuid they are skipped or dropped, with a
    warning; a folder's setgid bit (group inheritance) is kept."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = special_snapshot(h)
    plain = tmp_path / "plain"
    result = cli.ok("-r", str(h.path), "restore", snapshot_id, "--target", str(plain), key=h.key)
    assert sorted(os.listdir(plain)) == ["plain", "sgid", "shared", "suid"]
    for name in ("suid", "sgid"):
        assert stat.S_IMODE((plain / name).stat().st_mode) == 0o755
        assert f"warning: /{name}: " in result.err and "--keep-setuid" in result.err
    assert stat.S_IMODE((plain / "shared").stat().st_mode) == 0o2775
    if ROOT:
        assert "warning: /mem: " in result.err and "--special-files" in result.err
    asked = tmp_path / "asked"
    cli.ok(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(asked),
        "--special-files", "--keep-setuid", key=h.key,
    )  # fmt: skip
    assert stat.S_IMODE((asked / "suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((asked / "sgid").stat().st_mode) == 0o2755
    if ROOT:
        mem = (asked / "mem").lstat()
        assert stat.S_ISCHR(mem.st_mode) and mem.st_rdev == os.makedev(1, 1)
        assert stat.S_ISBLK((asked / "disk").lstat().st_mode)


# --- stopped half-way -----------------------------------------------------------------


def test_a_restore_stopped_half_way_leaves_no_partial_file_and_says_what_is_left(
    tmp_path: Path, cli: Cli
) -> None:
    """SIGTERM: what is in place is complete, and the private folder is gone. SIGKILL:
    the private folder stays; the next restore into that target says what it is."""
    import signal
    import time

    h = Hostile(tmp_path / "repo")
    data = {f"v{i:02d}.mp4": os.urandom(2_000_000) for i in range(40)}
    snapshot_id = h.snapshot([h.file(name, content) for name, content in data.items()])
    for how in (signal.SIGTERM, signal.SIGKILL):
        target = tmp_path / f"out-{how.name}"
        target.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "backvault.cli", "-r", str(h.path), "restore", snapshot_id,
             "--target", str(target)],
            env={**cli.env, **PROCESSES, "BACKVAULT_KEY": h.key},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        while proc.poll() is None and not leftovers(target):
            time.sleep(0.01)
        proc.send_signal(how)
        proc.wait(timeout=60)
        for path in target.iterdir():
            if not path.name.startswith(".backvault-"):
                assert path.read_bytes() == data[path.name]
        if how == signal.SIGTERM:
            assert proc.returncode in (0, 143)
            assert leftovers(target) == []
        elif proc.returncode == -signal.SIGKILL:
            assert leftovers(target) != []
        left = leftovers(target)
        rerun = cli.ok(
            "-r", str(h.path), "restore", snapshot_id, "--target", str(target), "--overwrite",
            key=h.key,
        )  # fmt: skip
        for name, content in data.items():
            assert (target / name).read_bytes() == content
        said = [line for line in rerun.err.splitlines() if "interrupted" in line]
        if left:  # named in one line, with the command that removes it
            assert len(said) == 1 and all(Path(p).name in said[0] for p in left), rerun.err
            subprocess.run(shlex.split(said[0].split("with: ", 1)[1]), check=True)
            assert leftovers(target) == []
        else:
            assert said == [], rerun.err
    # A target holding only a killed restore's private folder is empty: restored into,
    # the folder named (before the fix: refused).
    lone = tmp_path / "lone"
    os.makedirs(lone / ".backvault-restore-0123456789abcdef", mode=0o700)
    again = cli.ok("-r", str(h.path), "restore", snapshot_id, "--target", str(lone), key=h.key)
    said = [line for line in again.err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and ".backvault-restore-0123456789abcdef is left" in said[0], again.err
    assert f"rm -rf -- {lone}/.backvault-restore-0123456789abcdef" in said[0], again.err
    assert sorted(os.listdir(lone)) == sorted([*data, ".backvault-restore-0123456789abcdef"])
    # Not empty otherwise: one line, which names the leftover folder too.
    (lone / "v00.mp4").unlink()
    refused = cli.run("-r", str(h.path), "restore", snapshot_id, "--target", str(lone), key=h.key)
    assert refused.code == 1 and len(refused.err.strip().splitlines()) == 1, refused.err
    assert "not empty" in refused.err and "rm -rf -- " in refused.err, refused.err
    replaced = cli.ok(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(lone), "--overwrite",
        key=h.key,
    )  # fmt: skip
    said = [line for line in replaced.err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and ".backvault-restore-0123456789abcdef" in said[0], replaced.err
    assert (lone / ".backvault-restore-0123456789abcdef").is_dir()  # never touched


# --- round two: the private folder is private, whatever the target's ACLs --------------

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def acl_granting(uid: int) -> bytes:
    """The ``system.posix_acl_*`` value of ``setfacl -m u:<uid>:rwx`` (the kernel's
    format: version 2, then tag, permissions and id of each entry, in tag order)."""
    import struct

    entries = [
        (ACL_USER_OBJ, 7, _NO_ID),
        (ACL_USER, 7, uid),
        (ACL_GROUP_OBJ, 5, _NO_ID),
        (ACL_MASK, 7, _NO_ID),
        (ACL_OTHER, 5, _NO_ID),
    ]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def attacker_reaches(folder: Path) -> list[str]:
    """What uid 65534, in a real process of its own, manages in ``folder``."""
    probe = r"""
import os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
folder = sys.argv[1]
for what, act in (("list", lambda: os.listdir(folder)),
                  ("create", lambda: os.close(os.open(os.path.join(folder, "planted"),
                                                      os.O_CREAT | os.O_WRONLY, 0o600)))):
    try:
        act()
        print(what)
    except OSError:
        pass
"""
    done = subprocess.run(
        [sys.executable, "-c", probe, str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@needs_root
@pytest.mark.parametrize("file_system", ["acl-passthrough", "mode-ignored"])
def test_the_private_folder_is_private_despite_a_default_acl_on_the_target(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch, file_system: str
) -> None:
    """The target carries a default ACL granting uid 65534 rwx (``setfacl -d -m
    u:nobody:rwx``). On a file system whose ACL inheritance ignores the create mode (ZFS
    with aclinherit=passthrough: simulated by giving every new folder that ACL with an
    rwx mask), or one that makes folders 0777, the private folder and the folders made in
    it were open to 65534 while the restore worked in them. Each is checked by a real
    process as 65534 the moment the restore made it, and again for a folder made inside
    before it is renamed into place."""
    h = Hostile(open_dir / "repo")
    snapshot_id = h.snapshot([h.folder("docs", [h.file("a.txt", b"a\n")]), h.file("b", b"b\n")])
    target = open_dir / "target"
    target.mkdir()
    os.chmod(target, 0o755)
    try:
        os.setxattr(target, "system.posix_acl_default", acl_granting(ATTACKER))
    except OSError as exc:
        pytest.skip(f"this file system keeps no POSIX ACLs ({exc.strerror})")
    real_mkdir = os.mkdir

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
        try:
            if file_system == "acl-passthrough":
                os.setxattr(fd, "system.posix_acl_access", acl_granting(ATTACKER))
            else:
                os.fchmod(fd, 0o777)
        finally:
            os.close(fd)

    monkeypatch.setattr(os, "mkdir", mkdir)
    reached: dict[str, list[str]] = {}
    real_staging_for = Restorer._staging_for
    real_move_in = Restorer._move_in

    def staging_for(self: Restorer, folder: Any) -> Any:
        staging = real_staging_for(self, folder)
        reached.setdefault("private folder", attacker_reaches(Path(staging.shared.path)))
        return staging

    def move_in(self: Restorer, staging: Any, tmp: str, *args: Any, **kwargs: Any) -> Any:
        reached["folder made in it"] = attacker_reaches(Path(staging.shared.path) / tmp)
        return real_move_in(self, staging, tmp, *args, **kwargs)

    monkeypatch.setattr(Restorer, "_staging_for", staging_for)
    monkeypatch.setattr(Restorer, "_move_in", move_in)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1])
    assert reached == {"private folder": [], "folder made in it": []}
    assert outcome.damaged == []
    assert (target / "docs" / "a.txt").read_bytes() == b"a\n"
    assert sorted(os.listdir(target)) == ["b", "docs"]


@pytest.mark.parametrize("chmod", ["ignored", "refused"])
def test_a_private_folder_the_file_system_keeps_open_to_others_stops_the_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chmod: str
) -> None:
    """A file system that keeps folders 0755 whatever is asked (vfat-like mount options:
    simulated by folders made 0755 and a chmod that changes nothing) cannot hold a
    private folder: the restore stops with one line before anything is written."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot([h.file("a.txt", b"a\n")])
    real_mkdir = os.mkdir

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        os.chmod(path, 0o755, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)

    def fchmod(fd: int, mode: int) -> None:
        if chmod == "refused":  # vfat without the quiet option
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", fchmod)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(RepositoryError) as raised:
        Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1])
    message = str(raised.value)
    assert "\n" not in message and "keeps mode 755" in message, message
    assert os.listdir(target) == []


# --- round two: fifos, device nodes and symlinks get metadata only if they are the ones made


@needs_root
@pytest.mark.parametrize("kind", ["fifo", "device", "symlink"])
def test_an_entry_swapped_in_the_private_folder_is_not_given_the_snapshots_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The moment the fifo (device node, symlink) is made in the private folder, a hard link of an
    outside root-only file takes its name (simulated in the creation step itself: how it
    got there does not matter). Before the fix the restore chown'ed it to the snapshot's
    owner (65534), chmod'ed it 0666 and set its times, by name."""
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    common = {"uid": ATTACKER, "gid": ATTACKER, "mtime": "2001-02-03T04:05:06Z"}
    if kind == "fifo":
        node = {"name": "pipe", "type": "fifo", "mode": fmt.GO_MODE_NAMED_PIPE | 0o666}
    elif kind == "device":
        node = {
            "name": "pipe",
            "type": "chardev",
            "mode": fmt.GO_MODE_DEVICE | fmt.GO_MODE_CHAR_DEVICE | 0o666,
            "device": os.makedev(1, 3),
        }
    else:
        node = {**link("pipe", "anywhere")}
    snapshot_id = h.snapshot([{**node, **common}, h.file("plain", b"plain\n")])
    os.chmod(world.victim, 0o600)
    before = world.digest()
    maker = {"fifo": "mkfifo", "device": "mknod", "symlink": "symlink"}[kind]
    real = getattr(os, maker)

    def make_then_swap(*args: Any, dir_fd: int | None = None, **kwargs: Any) -> None:
        real(*args, dir_fd=dir_fd, **kwargs)
        name = args[1] if kind == "symlink" else args[0]
        os.unlink(name, dir_fd=dir_fd)
        os.link(world.victim, name, dst_dir_fd=dir_fd)

    monkeypatch.setattr(os, maker, make_then_swap)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    restorer = Restorer(repo, world.target, special_files=True)
    outcome = restorer.run(repo.find_snapshot(snapshot_id)[1])
    monkeypatch.undo()
    assert world.digest() == before
    assert [path for path, _ in outcome.damaged] == ["/pipe"], outcome.damaged
    assert "replaced" in outcome.damaged[0][1]
    assert sorted(os.listdir(world.target)) == ["plain"]


# --- round two: the target's path ------------------------------------------------------


@needs_root
def test_a_symlink_of_another_user_on_the_way_to_the_target_is_not_followed(
    open_dir: Path, cli: Cli
) -> None:
    """Root restores into /home/alice/restored (or below it); alice made ``restored`` a
    symlink to a root-owned folder (``etc``) before the restore started. Before the fix
    the path was resolved with ``realpath`` and root restored into ``etc``. A symlink of
    root's own on the way is still followed."""
    etc = open_dir / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    home = open_dir / "home-alice"
    home.mkdir()
    os.chown(home, ATTACKER, ATTACKER)
    restored = home / "restored"
    os.symlink(etc, restored)
    os.chown(restored, ATTACKER, ATTACKER, follow_symlinks=False)
    h = Hostile(open_dir / "repo")
    snapshot_id = h.snapshot([h.file("ld.so.preload", b"/home/alice/evil.so\n")])
    before = fingerprint(etc)
    for target in (restored, restored / "deeper", home / "x" / ".." / "restored"):
        result = cli.run(
            "-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key
        )
        assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
        assert f"{restored}, a symlink that belongs to uid {ATTACKER}" in result.err, result.err
        assert fingerprint(etc) == before
    mine = open_dir / "mine"
    os.symlink(open_dir / "real", mine)  # root's own: followed
    cli.ok("-r", str(h.path), "restore", snapshot_id, "--target", str(mine / "out"), key=h.key)
    assert (open_dir / "real" / "out" / "ld.so.preload").is_file()


USER_RESTORE = r"""
import json, sys
from backvault.engine.restorer import Restorer
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
repo_path, key, snapshot_id, target = sys.argv[1:5]
repo = Repository.open(LocalBackend(repo_path), [key.encode()])
outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1])
print(json.dumps(outcome.to_json()))
"""


@needs_root
def test_a_user_who_is_not_root_is_warned_when_others_can_change_the_target(
    open_dir: Path,
) -> None:
    """A user (65534 here, in a real process) restoring into a folder under one that
    every user can write (0777, not sticky): another user can move her restored data
    away or swap in his own. Before the fix only root was warned."""
    h = Hostile(open_dir / "repo")
    snapshot_id = h.snapshot([h.file("a.txt", b"a\n")])
    subprocess.run(["chmod", "-R", "a+rX", str(h.path)], check=True)
    shared = open_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    sticky = open_dir / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    outcomes = {}
    for name, target in (("shared", shared / "out"), ("sticky", sticky / "out")):
        done = subprocess.run(
            ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups",
             sys.executable, "-c", USER_RESTORE, str(h.path), h.key, snapshot_id, str(target)],
            capture_output=True, text=True, cwd="/",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outcomes[name] = json.loads(done.stdout)
        assert (target / "a.txt").read_bytes() == b"a\n"
        assert (target / "a.txt").stat().st_uid == ATTACKER
    assert [w["path"] for w in outcomes["shared"]["warnings"]] == [str(shared)]
    assert "other users can change" in outcomes["shared"]["warnings"][0]["warning"]
    assert outcomes["sticky"]["warnings"] == []


# --- round two: blobs are what the index says, in size and type -------------------------


def raw_pack(h: Hostile, blobs: list[tuple[BlobType, bytes, bytes, int | None]]) -> None:
    """Store a pack written by hand: each blob as (type, id, the plaintext to seal, the
    uncompressed length to record), indexed as given, with no check of any of it."""
    data = bytearray()
    entries = []
    for blob_type, blob_id, payload, uncompressed in blobs:
        sealed = h.repo.key.seal(payload)
        entries.append(fmt.PackedBlob(blob_id, blob_type, len(data), len(sealed), uncompressed))
        data += sealed
    header = h.repo.key.seal(fmt.encode_pack_header(entries))
    data += header + len(header).to_bytes(4, "little")
    pack_id = fmt.sha256(bytes(data))
    h.repo.backend.save(FileType.DATA, pack_id.hex(), bytes(data))
    h.writer.adopt_pack(pack_id, entries)


def zstd_bomb(claimed: int) -> bytes:
    """A zstd frame of ``claimed`` zero bytes that records its size: 64 KiB for 2 GiB."""
    import zstandard

    out = zstandard.ZstdCompressor(level=1).compressobj(size=claimed)
    chunk = bytes(1 << 24)
    parts = [out.compress(chunk) for _ in range(claimed >> 24)]
    return b"".join([*parts, out.flush()])


LIMITED_RESTORE = r"""
import json, resource, sys
from backvault.engine.restorer import Restorer
from backvault.repo.repository import Repository
from backvault.storage import LocalBackend
repo_path, key, snapshot_id, target, limit = sys.argv[1:6]
repo = Repository.open(LocalBackend(repo_path), [key.encode()])
resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
outcome = Restorer(repo, target).run(repo.find_snapshot(snapshot_id)[1])
print(json.dumps(outcome.to_json()))
"""


@pytest.mark.parametrize("env", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("lie", ["frame claims 2 GiB", "index and frame claim 2 GiB"])
def test_a_zstd_bomb_in_a_pack_is_never_decompressed(
    tmp_path: Path, env: dict[str, str], lie: str
) -> None:
    """A 64 KiB zstd frame of 2 GiB of zeros, sealed as the blob of a 1000-byte file (or
    with the index and the tree agreeing on 2 GiB). The frame records its size, so zstd
    allocated 2 GiB whatever ``max_output_size`` said: under a 1 GiB address-space limit
    the restore died of MemoryError. Now the file is damaged, the rest restored."""
    h = Hostile(tmp_path / "repo")
    claimed = 2 << 30
    content = b"x" * 1000
    blob_id = fmt.sha256(content)
    recorded = 1000 if lie == "frame claims 2 GiB" else claimed
    raw_pack(h, [(BlobType.DATA, blob_id, zstd_bomb(claimed), recorded)])
    bomb = {**h.file("bomb", b""), "content": [blob_id.hex()], "size": recorded}
    snapshot_id = h.snapshot([bomb, h.file("fine", b"fine\n")])
    target = tmp_path / "target"
    done = subprocess.run(
        [sys.executable, "-c", LIMITED_RESTORE, str(h.path), h.key, snapshot_id, str(target),
         str(1 << 30)],
        capture_output=True, text=True, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout)
    assert [d["path"] for d in outcome["damaged"]] == ["/bomb"], outcome
    error = outcome["damaged"][0]["error"]
    assert str(claimed) in error and blob_id.hex()[:12] in error, error
    assert os.listdir(target) == ["fine"]
    assert (target / "fine").read_bytes() == b"fine\n"


def test_a_blob_is_used_only_as_the_type_the_index_gives(tmp_path: Path, cli: Cli) -> None:
    """A data blob holding a tree's JSON named as a folder's subtree, and a tree blob
    named as a file's content: both were used as given (the folder restored from file
    data, the file holding the tree). Now each is damaged; a file whose bytes equal a
    tree blob is still restored from its own data blob."""
    h = Hostile(tmp_path / "repo")
    inner = json.dumps({"nodes": [h.file("planted", b"from a data blob\n")]}).encode()
    data_as_tree = h.writer.add(BlobType.DATA, inner + b"\n").hex()
    tree_id = h.tree([h.file("t.txt", b"t\n")])
    h.writer.flush()
    plain = h.repo.load_blob(bytes.fromhex(tree_id))
    folder = {**h.folder("folder", []), "subtree": data_as_tree}
    tree_as_file = {**h.file("tree-as-file", b""), "content": [tree_id], "size": len(plain)}
    snapshot_id = h.snapshot([folder, tree_as_file, h.file("fine", b"fine\n")])
    target = tmp_path / "target"
    result = cli.run("-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key)
    assert result.code == 3, result.err
    assert "not restored: /folder: " in result.err and "data blob, used as a tree" in result.err
    assert "not restored: /tree-as-file: " in result.err
    assert "tree blob, used as a data" in result.err, result.err
    assert os.listdir(target) == ["fine"]
    # The same bytes stored as a data blob too (restic indexes by type and id): a file
    # of those bytes is restored from it.
    raw_pack(h, [(BlobType.DATA, bytes.fromhex(tree_id), plain, None)])
    twin = {**h.file("same-bytes-as-a-tree", b""), "content": [tree_id], "size": len(plain)}
    snapshot_id = h.snapshot([twin, h.folder("d", [h.file("in-d", b"d\n")])])
    again = tmp_path / "again"
    cli.ok("-r", str(h.path), "restore", snapshot_id, "--target", str(again), key=h.key)
    assert (again / "same-bytes-as-a-tree").read_bytes() == plain
    assert (again / "d" / "in-d").read_bytes() == b"d\n"


# --- round two: free space is checked before anything is written -----------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), unmounted after."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@needs_root
def test_a_snapshot_larger_than_the_free_space_is_refused_before_anything_is_written(
    small_tmpfs: Path, tmp_path: Path, cli: Cli
) -> None:
    """Three files of 600 kB into a 1 MiB file system: before the fix the restore wrote
    until the disk was full (after --overwrite had moved things aside). Now one line says
    what is needed and what is free, and nothing is written; a subset that fits is
    restored; --ignore-free-space goes ahead (and meets the full disk)."""
    h = Hostile(tmp_path / "repo")
    data = {f"v{i}.mp4": os.urandom(600_000) for i in range(3)}
    snapshot_id = h.snapshot([h.file(name, content) for name, content in data.items()])
    (small_tmpfs / "old.txt").write_text("kept\n")
    result = cli.run(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(small_tmpfs), "--overwrite",
        key=h.key,
    )  # fmt: skip
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
    assert "needs 1.7 MiB" in result.err and "--ignore-free-space" in result.err, result.err
    assert os.listdir(small_tmpfs) == ["old.txt"]
    cli.ok(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(small_tmpfs), "--overwrite",
        "--include", "v1.mp4", key=h.key,
    )  # fmt: skip
    assert (small_tmpfs / "v1.mp4").read_bytes() == data["v1.mp4"]
    os.unlink(small_tmpfs / "v1.mp4")
    forced = cli.run(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(small_tmpfs), "--overwrite",
        "--ignore-free-space", key=h.key,
    )  # fmt: skip
    assert forced.code == 1 and "is full" in forced.err, forced.err
    assert leftovers(small_tmpfs) == []


def test_free_space_is_compared_with_what_is_selected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target's file system reports 150 kB free (``statvfs`` of the target's own
    descriptor): the whole snapshot (300 kB) is refused, one file of it is restored, and
    ``ignore_free_space`` restores it all."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot(
        [h.file("a", os.urandom(100_000)), h.folder("d", [h.file("b", os.urandom(200_000))])]
    )
    real = os.statvfs
    asked: list[Any] = []

    def statvfs(path: Any) -> Any:
        asked.append(path)
        st = real(path)
        fields = list(st)
        fields[3] = fields[4] = 150_000 // st.f_frsize  # f_bfree, f_bavail
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    snapshot = repo.find_snapshot(snapshot_id)[1]
    target = tmp_path / "target"
    with pytest.raises(RepositoryError, match=r"needs 293\.0 KiB.*has 14"):
        Restorer(repo, target).run(snapshot)
    assert os.listdir(target) == []
    assert all(isinstance(path, int) for path in asked)  # the target's descriptor
    Restorer(repo, target, includes=["/a"]).run(snapshot)
    assert os.listdir(target) == ["a"]
    everything = tmp_path / "everything"
    outcome = Restorer(repo, everything, ignore_free_space=True).run(snapshot)
    assert outcome.files == 2 and outcome.damaged == []


# --- round two: a file system mounted inside the target ---------------------------------


@needs_root
@pytest.mark.parametrize("env", MODES, ids=MODE_IDS)
def test_a_file_system_mounted_inside_the_target_is_restored_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """``media`` in the target is another file system (a tmpfs; a USB disk, say), kept by
    --overwrite, with folders already in it. Entries are staged on the file system they
    go to (a rename across file systems fails with EXDEV): one private folder per file
    system, made in its top folder within the target — before the fix it was made in
    ``media/old/deeper``, the first folder that needed one — and all removed at the end;
    removing it no longer leaves that folder with the time of the removal instead of the
    snapshot's."""
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot(
        [
            h.file("top.txt", b"top\n"),
            h.folder(
                "media",
                [
                    h.folder("old", [h.folder("deeper", [h.file("x.jpg", b"x" * 5000)])]),
                    h.folder("new", [h.file("y.jpg", b"y" * 5000)]),
                    h.file("z.txt", b"z\n"),
                    link("l", "z.txt"),
                ],
            ),
        ]
    )
    target = tmp_path / "target"
    media = target / "media"
    media.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(media)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (media / "old" / "deeper").mkdir(parents=True)
        (media / "mine.txt").write_text("kept\n")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        made: list[Path] = []
        real_staging_for = Restorer._staging_for

        def staging_for(self: Restorer, folder: Any) -> Any:
            staging = real_staging_for(self, folder)
            if Path(staging.shared.path) not in made:
                made.append(Path(staging.shared.path))
            return staging

        monkeypatch.setattr(Restorer, "_staging_for", staging_for)
        repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
        outcome = Restorer(repo, target, overwrite=True).run(repo.find_snapshot(snapshot_id)[1])
        assert outcome.damaged == [] and outcome.warnings == [], outcome
        assert (target / "top.txt").read_bytes() == b"top\n"
        assert (media / "old" / "deeper" / "x.jpg").read_bytes() == b"x" * 5000
        assert (media / "new" / "y.jpg").read_bytes() == b"y" * 5000
        assert (media / "z.txt").read_bytes() == b"z\n"
        assert os.readlink(media / "l") == "z.txt"
        assert (media / "mine.txt").read_text() == "kept\n"
        assert os.stat(media / "new").st_dev == os.stat(media).st_dev != os.stat(target).st_dev
        assert leftovers(target) == []
        assert sorted(path.parent for path in made) == sorted([target, media]), made
        old_mtime = 1_500_000_000_000_000_000
        for folder in (media, media / "old", media / "old" / "deeper", media / "new"):
            assert folder.stat().st_mtime_ns == old_mtime, folder
    finally:
        subprocess.run(["umount", "-l", str(media)], check=True)


# --- round two: check names a file whose blobs do not add up to its size ---------------


def test_check_names_a_file_whose_blobs_do_not_add_up_to_its_size(tmp_path: Path, cli: Cli) -> None:
    """A file whose entry claims more than its blobs hold, and one whose index entry lies
    about a blob's length: restore refuses both, but ``check`` (without --read-data)
    passed the repository. Now it names each file, its path and its snapshot."""
    h = Hostile(tmp_path / "repo")
    short = h.file("chat.db", b"short", size=10**6)
    first = h.writer.add(BlobType.DATA, b"A" * 100_000).hex()
    h.writer.flush()
    lied = {**h.file("video.mp4", b""), "content": [first], "size": 100_000}
    _lie_in_index(h, first, 2**45)
    snapshot_id = h.snapshot(
        [h.folder("docs", [short, h.file("fine", b"fine\n")]), lied, h.file("ok", b"ok\n")]
    )
    result = cli.run("-r", str(h.path), "check", key=h.key)
    assert result.code == 3, result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.err
    assert (
        f"error: file /docs/chat.db (snapshot {snapshot_id[:8]}) has the wrong size: its blobs "
        "hold 5 bytes by the index, its entry says 1000000" in errors
    ), errors
    assert (
        f"error: file /video.mp4 (snapshot {snapshot_id[:8]}) has the wrong size: its blobs "
        f"hold {2**45} bytes by the index, its entry says 100000" in errors
    ), errors


# --- round two, third session: runs made as they are sent ------------------------------


def _zero_length_entries(h: Hostile, blob: str, count: int) -> list[str]:
    """Index entries for ``count`` made-up blobs of length 0 right after ``blob`` in its
    pack (a plaintext of -32 bytes each, by the index)."""
    backend = h.repo.backend
    fakes = [os.urandom(32).hex() for _ in range(count)]
    for name, _ in list(backend.list(FileType.INDEX)):
        doc = h.repo.load_unpacked(FileType.INDEX, name)
        hit = False
        for pack in doc["packs"]:
            for entry in list(pack["blobs"]):
                if entry["id"] == blob:
                    end = entry["offset"] + entry["length"]
                    pack["blobs"] += [
                        {"id": f, "type": "data", "offset": end, "length": 0} for f in fakes
                    ]
                    hit = True
        if hit:
            h.repo.save_unpacked(FileType.INDEX, doc)
            backend.remove(FileType.INDEX, name)
    return fakes


def test_index_lengths_below_a_sealed_blob_never_make_a_restore_write_past_the_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team, third session: blobs the index lists with a length below 32 bytes (what
    sealing adds) counted negative plaintext, so a file's blobs could add up to its size
    while its first run wrote 32 000 bytes past it (into the staging copy, removed
    after). Such blobs are now damaged when looked up: nothing is written past the size."""
    h = Hostile(tmp_path / "repo")
    real = os.urandom(3 * 1024 * 1024)  # incompressible: its plaintext is its length - 32
    blob = h.writer.add(BlobType.DATA, real, compress=False).hex()
    h.writer.flush()
    fakes = _zero_length_entries(h, blob, 1000)
    node = {**h.file("db", b""), "content": [blob, *fakes], "size": len(real) - 32 * 1000}
    snapshot_id = h.snapshot([node, h.file("ok", b"fine\n")])
    written: list[int] = []  # the end of every write of a restored file's data
    write = blobs_module._pwritev_all

    def watched(fd: int, pieces: list[bytes | memoryview], offset: int) -> None:
        written.append(offset + sum(len(piece) for piece in pieces))
        write(fd, pieces, offset)

    monkeypatch.setattr(blobs_module, "_pwritev_all", watched)
    monkeypatch.setattr(parallel, "_requested_processes", 0)  # threads: writes seen here
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    target = tmp_path / "target"
    outcome = Restorer(repo, target, workers=2).run(repo.find_snapshot(snapshot_id)[1])
    assert [path for path, _ in outcome.damaged] == ["/db"], outcome
    assert "fewer than a sealed blob has (32)" in outcome.damaged[0][1]
    assert not (target / "db").exists() and (target / "ok").read_bytes() == b"fine\n"
    assert leftovers(target) == []
    assert all(end <= node["size"] for end in written), written


@pytest.mark.parametrize("env", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("how", ["later lie", "missing after sent", "short"])
def test_a_hard_link_group_whose_first_file_is_damaged_mid_way_is_not_placed(
    tmp_path: Path, cli: Cli, env: dict[str, str], how: str
) -> None:
    """The first file of a hard-link group found damaged after some of its runs were
    sent: neither link is placed, both are named, nothing is left behind, the file
    beside them is restored (red team, third session)."""
    h = Hostile(tmp_path / "repo")
    first = h.writer.add(BlobType.DATA, os.urandom(100_000)).hex()
    h.writer.flush()
    second = h.writer.add(BlobType.DATA, os.urandom(50_000)).hex()
    h.writer.flush()
    links = {"links": 2, "inode": 4242, "device_id": 7}
    a = {**h.file("a", b""), "content": [first, second], "size": 150_000, **links}
    if how == "later lie":
        _lie_in_index(h, second, 1_000_000)
    elif how == "missing after sent":
        a.update(content=[first, second, "cd" * 32], size=150_100)
    else:
        a["size"] = 200_000
    snapshot_id = h.snapshot([a, {**a, "name": "b"}, h.file("ok", b"fine\n" * 1000)])
    target = tmp_path / "target"
    result = cli.run(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(target), key=h.key, env=env
    )
    assert result.code == 3, result.err
    assert not (target / "a").exists() and not (target / "b").exists()
    assert (target / "ok").read_bytes() == b"fine\n" * 1000
    assert "not restored: /a:" in result.err and "not restored: /b:" in result.err, result.err
    assert leftovers(target) == []
