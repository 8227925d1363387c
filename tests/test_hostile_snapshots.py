"""Hostile snapshots: a restore writes nothing outside its target.

Whoever holds a repository's master key (the thief of a lost phone, say) can put any
snapshot into it. The snapshots here are built by hand, as tree blobs of a real encrypted
repository written with the repository's own writer: trees the backup never writes —
duplicate names, a folder and a symlink of the same name, symlinks that escape the target
followed by entries that would go through them, hard-link tricks, names with ``/``, ``..``
or NUL, nesting hundreds of levels deep. Each is restored through the real
``backvault restore`` (with worker processes) and through the Restorer API (with worker
processes and with threads), with and without ``--overwrite`` (with it, into a target
laid with traps: symlinks to the outside under the snapshot's own names). Everything
around the target — contents, modes, owners, mtimes, link targets — must be the same
after the restore as before. Trees that break the format are named as damaged (by
``check`` too); symlinks that point outside are legitimate data and are restored as
symlinks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backvault.crypto import recovery_key
from backvault.engine.check import Checker
from backvault.engine.restorer import Restorer
from backvault.repo import format as fmt
from backvault.repo.format import BlobType, Snapshot
from backvault.repo.repository import Repository
from backvault.repo.timefmt import format_ns
from backvault.repo.writer import RepositoryWriter
from backvault.storage import FileType, LocalBackend
from tests.conftest import Cli

PROCESSES = {"BACKVAULT_WORKER_PROCESSES": "2"}
THREADS = {"BACKVAULT_WORKER_PROCESSES": "0"}
OLD_MTIME = format_ns(1_500_000_000_000_000_000, local=False)
PWNED = b"written by a hostile snapshot\n"


@dataclass
class World:
    """A folder holding the restore target and, next to it, what must stay untouched."""

    root: Path
    outside: Path
    victim: Path
    target: Path

    @classmethod
    def make(cls, base: Path) -> World:
        root = base / "world"
        outside = root / "outside"
        (outside / "sub").mkdir(parents=True)
        victim = outside / "victim.txt"
        victim.write_text("original\n")
        os.chmod(victim, 0o640)
        (outside / "sub" / "inner.txt").write_text("inner\n")
        os.symlink("victim.txt", outside / "link-to-victim")
        os.chmod(outside, 0o750)
        target = root / "target"
        target.mkdir()
        for path in (victim, outside / "sub" / "inner.txt", outside / "sub", outside, root):
            os.utime(path, ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
        return cls(root, outside, victim, target)

    def digest(self) -> dict[str, Any]:
        """Everything in the world but the target: type, mode, owner, mtime, size, content
        or link target of each entry (the world itself included). Also the mode and owner
        of ``/``, which one case tries to reach."""
        entries: dict[str, Any] = {}
        root_st = os.stat("/")
        entries["<filesystem root>"] = (root_st.st_mode, root_st.st_uid, root_st.st_gid)
        for folder, dirs, files in os.walk(self.root):
            if Path(folder) == self.root:
                dirs.remove(self.target.name)
            for name in [".", *dirs, *files]:
                path = Path(folder) / name
                st = path.lstat()
                entry: tuple[Any, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
                if stat.S_ISLNK(st.st_mode):
                    entry += (os.readlink(path),)
                elif stat.S_ISREG(st.st_mode):
                    entry += (st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
                entries[str(path.relative_to(self.root))] = entry
        return entries

    def lay_traps(self, names: list[str]) -> None:
        """What --overwrite finds in the target: under each of the snapshot's top-level
        names, a symlink to the outside, or a folder holding symlinks to the victim under
        names the snapshot may use inside it."""
        for i, name in enumerate(names):
            if i % 2 == 0:
                os.symlink(self.outside, self.target / name)
            else:
                (self.target / name).mkdir()
                for inner in ("inner-trap", "y", "victim.txt"):
                    os.symlink(self.victim, self.target / name / inner)
        (self.target / "mine.txt").write_text("was here before\n")


class Hostile:
    """A real encrypted repository into which trees are written as raw JSON blobs, with no
    check of what they hold."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key = recovery_key.canonical(recovery_key.generate())
        self.repo = Repository.init(LocalBackend(path), self.key.encode())
        self.writer = RepositoryWriter(self.repo)

    def tree(self, nodes: list[dict[str, Any]]) -> str:
        raw = json.dumps({"nodes": nodes}).encode() + b"\n"
        return self.writer.add(BlobType.TREE, raw).hex()

    def file(self, name: str, data: bytes, mode: int = 0o644, **extra: Any) -> dict[str, Any]:
        content = [self.writer.add(BlobType.DATA, data).hex()] if data else []
        return {
            "name": name,
            "type": "file",
            "mode": mode,
            "mtime": OLD_MTIME,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "size": len(data),
            "content": content,
            **extra,
        }

    def folder(self, name: str, nodes: list[dict[str, Any]], mode: int = 0o755) -> dict[str, Any]:
        return {
            "name": name,
            "type": "dir",
            "mode": fmt.GO_MODE_DIR | mode,
            "mtime": OLD_MTIME,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "content": None,
            "subtree": self.tree(nodes),
        }

    def rewrite_index_entry(self, blob: str, **fields: Any) -> None:
        """Rewrite every index entry of ``blob`` with ``fields`` (an index that lies)."""
        backend = self.repo.backend
        for name, _ in list(backend.list(FileType.INDEX)):
            doc = self.repo.load_unpacked(FileType.INDEX, name)
            hit = False
            for pack in doc["packs"]:
                for entry in pack["blobs"]:
                    if entry["id"] == blob:
                        entry.update(fields)
                        hit = True
            if hit:
                self.repo.save_unpacked(FileType.INDEX, doc)
                backend.remove(FileType.INDEX, name)

    def snapshot(self, nodes: list[dict[str, Any]]) -> str:
        root = self.tree(nodes)
        self.writer.flush()
        snap = Snapshot(
            time=format_ns(1_700_000_000_000_000_000), tree=bytes.fromhex(root), paths=["/chat"]
        )
        return self.repo.save_snapshot(snap)


def link(name: str, target: str | Path) -> dict[str, Any]:
    return {
        "name": name,
        "type": "symlink",
        "mode": fmt.GO_MODE_SYMLINK | 0o777,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "linktarget": str(target),
        "content": None,
    }


def mirror(real: Path, name: str, h: Hostile, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """A folder node named ``name`` with the mode and owner of the real folder ``real``
    and no mtime: restored through a symlink to ``real``, it changes nothing there."""
    st = real.stat()
    node = h.folder(name, nodes)
    node.update(mode=fmt.go_mode_from_unix(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    del node["mtime"]
    return node


def via_root(name: str, path: Path, h: Hostile, inner: list[dict[str, Any]]) -> dict[str, Any]:
    """Folder ``name`` mirroring ``/``, holding folders that mirror the components of
    ``path``, the last holding ``inner``: through a symlink ``name`` -> ``/``, the only
    change on this machine would be what ``inner`` puts into ``path``."""
    nodes = inner
    for depth in range(len(path.parts) - 1, 0, -1):
        real = Path(*path.parts[: depth + 1])
        nodes = [mirror(real, real.name, h, nodes)]
    return mirror(Path("/"), name, h, nodes)


# --- the cases ---------------------------------------------------------------------------

Build = Callable[[Hostile, World], list[dict[str, Any]]]


@dataclass
class Case:
    name: str
    build: Build  # the top-level nodes of the snapshot
    refused: str = ""  # for a tree that breaks the format: part of the damage message
    check: Callable[[World], None] | None = None  # for a legitimate one: what must be there
    top: list[str] = field(default_factory=list)


def hostile(nodes: Build, refused: str) -> Callable[[str], Case]:
    """A case whose hostile tree sits in folder /chat, next to an ordinary file /ok.txt
    that must be restored all the same."""

    def build(h: Hostile, w: World) -> list[dict[str, Any]]:
        return [h.folder("chat", nodes(h, w)), h.file("ok.txt", b"fine\n")]

    return lambda name: Case(name, build, refused=refused, top=["chat", "ok.txt"])


def _victim_folder(h: Hostile) -> list[dict[str, Any]]:
    return [h.file("victim.txt", PWNED, mode=0o666)]


REFUSED: list[Case] = [
    hostile(
        lambda h, w: [h.folder("d", _victim_folder(h), 0o777), link("d", w.outside)],
        "duplicate name 'd'",
    )("folder then symlink to the outside"),
    hostile(
        lambda h, w: [link("d", w.outside), h.folder("d", _victim_folder(h), 0o777)],
        "duplicate name 'd'",
    )("symlink to the outside then folder"),
    hostile(
        lambda h, w: [h.folder("d", _victim_folder(h), 0o777), link("d", "../../outside")],
        "duplicate name 'd'",
    )("folder then relative escaping symlink"),
    hostile(
        lambda h, w: [h.folder("u", [h.folder("outside", _victim_folder(h))]), link("u", "../..")],
        "duplicate name 'u'",
    )("folder then symlink to .."),
    hostile(
        lambda h, w: [via_root("r", w.outside, h, _victim_folder(h)), link("r", "/")],
        "duplicate name 'r'",
    )("folder then symlink to /"),
    hostile(
        lambda h, w: [link("v", w.victim), h.file("v", PWNED, mode=0o666)],
        "duplicate name 'v'",
    )("symlink then file"),
    hostile(
        lambda h, w: [h.file("v", PWNED, mode=0o666), link("v", w.victim)],
        "duplicate name 'v'",
    )("file then symlink"),
    hostile(
        lambda h, w: [
            h.file("a", b"", links=2, inode=77, device_id=1),
            link("a", w.victim),
            h.file("b", b"", mode=0o666, links=2, inode=77, device_id=1),
        ],
        "duplicate name 'a'",
    )("hard link to a name replaced by a symlink"),
    hostile(
        lambda h, w: [h.folder("d", [h.file("x", PWNED)]), h.file("d", PWNED)],
        "duplicate name 'd'",
    )("folder then file"),
    hostile(
        # Two different texts, one file name: "é" and its UTF-8 bytes as surrogate escapes.
        lambda h, w: [h.folder("é", _victim_folder(h), 0o777), link("\udcc3\udca9", w.outside)],
        "duplicate name",
    )("same bytes in two spellings"),
    hostile(lambda h, w: [h.file("../outside/victim.txt", PWNED)], "unsafe name")(
        "name with slashes"
    ),
    hostile(lambda h, w: [h.folder("..", [h.folder("outside", _victim_folder(h))])], "unsafe name")(
        "name .."
    ),
    hostile(lambda h, w: [h.folder(".", _victim_folder(h))], "unsafe name")("name ."),
    hostile(lambda h, w: [h.file("", PWNED)], "unsafe name")("empty name"),
    hostile(lambda h, w: [h.file("victim.txt\x00", PWNED)], "unsafe name")("name with NUL"),
    hostile(lambda h, w: [h.file("\ud800", PWNED)], "unsafe name")("unencodable name"),
    hostile(
        lambda h, w: [{"name": "x", "type": "hardlink", "linktarget": str(w.victim)}],
        "unknown type 'hardlink'",
    )("unknown node type"),
    # Numbers the system cannot take: a root restore crashed on them (OverflowError).
    hostile(lambda h, w: [{**link("v", w.victim), "uid": 2**40}], "out of range")(
        "uid beyond 32 bits"
    ),
    hostile(lambda h, w: [h.file("v", PWNED, gid=2**32)], "out of range")("gid beyond 32 bits"),
    hostile(
        lambda h, w: [
            {
                "name": "mem",
                "type": "chardev",
                "mode": fmt.GO_MODE_DEVICE | fmt.GO_MODE_CHAR_DEVICE | 0o666,
                "device": 2**70,
            }
        ],
        "out of range",
    )("device number beyond 64 bits"),
    hostile(lambda h, w: [h.file("v", PWNED, size=2**63)], "out of range")(
        "size beyond a file offset"
    ),
]


def _escaping_links(h: Hostile, w: World) -> list[dict[str, Any]]:
    return [
        link("abs", w.outside),
        link("dotdot", ".."),
        link("root", "/"),
        link("rel", "../outside/victim.txt"),
        h.folder("x", [h.file("y", b"data\n")]),
    ]


def _check_escaping_links(w: World) -> None:
    expected = {"abs": str(w.outside), "dotdot": "..", "root": "/", "rel": "../outside/victim.txt"}
    for name, linktarget in expected.items():
        assert (w.target / name).is_symlink() and os.readlink(w.target / name) == linktarget
    assert not (w.target / "x").is_symlink() and not (w.target / "x" / "y").is_symlink()
    assert (w.target / "x" / "y").read_bytes() == b"data\n"


LONG = "n" * 200


def _deep(depth: int, name: str) -> Build:
    def build(h: Hostile, w: World) -> list[dict[str, Any]]:
        nodes = [h.file("leaf.txt", b"deep\n"), link("escape", w.outside)]
        for _ in range(depth):
            nodes = [h.folder(name, nodes)]
        return nodes

    return build


def _check_deep(depth: int, name: str) -> Callable[[World], None]:
    def check(w: World) -> None:
        fd = os.open(w.target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(depth):
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            leaf = os.open("leaf.txt", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
            assert os.read(leaf, 100) == b"deep\n"
            os.close(leaf)
            assert os.readlink("escape", dir_fd=fd) == str(w.outside)
        finally:
            os.close(fd)

    return check


RESTORED: list[Case] = [
    Case(
        "symlinks out of the target are restored as symlinks",
        _escaping_links,
        check=_check_escaping_links,
        top=["abs", "x", "dotdot", "root", "rel"],  # x: a folder of traps, kept
    ),
    Case(
        "300 levels of 200-character names",
        _deep(300, LONG),
        check=_check_deep(300, LONG),
        top=[LONG],
    ),
    Case("1100 levels", _deep(1100, "d"), check=_check_deep(1100, "d"), top=["d"]),
]

RUNNERS = ["cli", "api-processes", "api-threads"]


def names_below(root: Path) -> list[str]:
    """The names of everything below ``root``, however deep (os.walk recurses, and its
    paths would pass PATH_MAX)."""
    names: list[str] = []
    todo = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    while todo:
        fd = todo.pop()
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    names.append(entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                        todo.append(os.open(entry.name, flags, dir_fd=fd))
        finally:
            os.close(fd)
    return names


def remove_tree(root: Path, spare: Path) -> None:
    """Remove ``root`` however deep (shutil.rmtree recurses, and pytest's clean-up with
    it): each folder found is first moved up into ``spare``, so paths stay short."""
    spare.mkdir()
    todo = [root]
    for count in itertools.count():
        if not todo:
            break
        top = todo.pop()
        with os.scandir(top) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    moved = spare / str(count) / entry.name
                    moved.parent.mkdir(exist_ok=True)
                    os.rename(entry.path, moved)
                    todo.append(moved)
                else:
                    os.unlink(entry.path)
        os.rmdir(top)
    shutil.rmtree(spare)


def run_case(
    case: Case,
    runner: str,
    overwrite: bool,
    tmp_path: Path,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot(case.build(h, world))
    try:
        restore_and_judge(case, runner, overwrite, world, h, snapshot_id, cli, monkeypatch)
    finally:
        remove_tree(world.target, tmp_path / "spare")


def restore_and_judge(
    case: Case,
    runner: str,
    overwrite: bool,
    world: World,
    h: Hostile,
    snapshot_id: str,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if overwrite:
        world.lay_traps(case.top)
    before = world.digest()
    damaged: list[tuple[str, str]] = []
    if runner == "cli":
        args = ["-r", str(h.path), "restore", snapshot_id, "--target", str(world.target)]
        result = cli.run(*args, *(["--overwrite"] if overwrite else []), key=h.key, env=PROCESSES)
        assert world.digest() == before, result.err
        assert result.code == (3 if case.refused else 0), result.err
        for line in result.err.splitlines():
            if line.startswith("not restored: "):
                path, _, error = line.removeprefix("not restored: ").partition(": ")
                damaged.append((path, error))
    else:
        for name, value in (PROCESSES if runner == "api-processes" else THREADS).items():
            monkeypatch.setenv(name, value)
        repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
        try:
            outcome = Restorer(repo, world.target, overwrite=overwrite).run(
                repo.find_snapshot(snapshot_id)[1]
            )
        finally:
            assert world.digest() == before
        damaged = outcome.damaged
    if case.refused:
        assert [path for path, _ in damaged] == ["/chat"], damaged
        assert case.refused in damaged[0][1], damaged
        assert (world.target / "ok.txt").read_bytes() == b"fine\n"
        assert not (world.target / "ok.txt").is_symlink()
    else:
        assert damaged == []
        assert case.check is not None
        case.check(world)
    if overwrite:
        assert (world.target / "mine.txt").read_text() == "was here before\n"
    assert [name for name in names_below(world.target) if ".backvault-" in name] == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["empty-target", "overwrite"])
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_a_tree_that_breaks_the_format_is_refused_and_nothing_outside_changes(
    case: Case,
    runner: str,
    overwrite: bool,
    tmp_path: Path,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_case(case, runner, overwrite, tmp_path, cli, monkeypatch)


@pytest.mark.parametrize("overwrite", [False, True], ids=["empty-target", "overwrite"])
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", RESTORED, ids=[c.name for c in RESTORED])
def test_a_legitimate_but_unusual_tree_is_restored_inside_the_target(
    case: Case,
    runner: str,
    overwrite: bool,
    tmp_path: Path,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_case(case, runner, overwrite, tmp_path, cli, monkeypatch)


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_check_names_a_tree_that_breaks_the_format(case: Case, tmp_path: Path) -> None:
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    h.snapshot(case.build(h, world))
    repo = Repository.open(LocalBackend(h.path), [h.key.encode()])
    errors = Checker(repo).run().errors
    assert len(errors) == 1 and case.refused in errors[0] and "is damaged" in errors[0], errors


# --- the safe folders underneath ---------------------------------------------------------


def test_a_folder_replaced_after_the_restore_made_it_is_never_written_into(
    tmp_path: Path,
) -> None:
    """Even if a folder of the target becomes a symlink, or another real folder of the
    same name, after the restore made it (a race, a file system that folds two names into
    one), the restore reaches it from the target's descriptor without following a symlink
    and checks it is the folder it made (device and inode): nothing is written there."""
    from backvault.engine.target_folders import (
        FOLDER_FLAGS,
        FolderRef,
        TargetFolders,
        UnsafeTarget,
    )

    world = World.make(tmp_path)
    (world.target / "d" / "e").mkdir(parents=True)

    def ref(parent: FolderRef | None, path: Path) -> FolderRef:
        st = path.stat()
        return FolderRef(parent, path.name, st.st_dev, st.st_ino)

    root = ref(None, world.target)
    d = ref(root, world.target / "d")
    e = ref(d, world.target / "d" / "e")
    folders = TargetFolders(root, os.open(world.target, FOLDER_FLAGS), keep_open=1)
    try:
        with folders.folder(e) as fd:
            assert os.fstat(fd).st_ino == e.inode
        os.rename(world.target / "d", world.root / "moved")
        os.symlink(world.outside, world.target / "d")
        (world.outside / "e").mkdir()
        folders.forget(e)
        folders.forget(d)
        before = world.digest()
        with pytest.raises(UnsafeTarget, match="no longer the one"), folders.folder(e):
            pass
        os.unlink(world.target / "d")
        (world.target / "d" / "e").mkdir(parents=True)
        with pytest.raises(UnsafeTarget, match="no longer the one"), folders.folder(e):
            pass
        assert world.digest() == before
    finally:
        folders.close()


# --- and the good paths ------------------------------------------------------------------


@pytest.mark.parametrize("mode", [PROCESSES, THREADS], ids=["processes", "threads"])
def test_restic_hard_links_fifos_and_devices_still_restore(
    cli: Cli, tmp_path: Path, mode: dict[str, str]
) -> None:
    """What restic writes for hard links (inode and link count), fifos, device nodes (as
    root, asked for with --special-files) and symlinks still comes back as it was."""
    from tests.test_restic_interop import restic

    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_bytes(os.urandom(50_000))
    os.link(source / "a.txt", source / "sub" / "same-as-a.txt")
    os.mkfifo(source / "pipe", 0o640)
    os.symlink("../a.txt", source / "sub" / "link")
    os.symlink("/nonexistent", source / "dangling")
    if os.geteuid() == 0:
        os.mknod(source / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chmod(source / "null", 0o666)
    for path in [source / "a.txt", source / "pipe", source / "sub"]:
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    repo = tmp_path / "restic-repo"
    restic(repo, "pw", "init")
    restic(repo, "pw", "backup", str(source))
    target = tmp_path / "out"
    cli.ok(
        "-r", str(repo), "restore", "latest", "--target", str(target), "--special-files",
        key="pw", env=mode,
    )  # fmt: skip
    out = target / source.relative_to("/")
    a, same = (out / "a.txt").stat(), (out / "sub" / "same-as-a.txt").stat()
    assert (a.st_ino, a.st_nlink) == (same.st_ino, 2)
    assert (out / "a.txt").read_bytes() == (source / "a.txt").read_bytes()
    pipe = (out / "pipe").lstat()
    assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o640
    assert pipe.st_mtime_ns == 1_600_000_000_000_000_000
    assert os.readlink(out / "sub" / "link") == "../a.txt"
    assert os.readlink(out / "dangling") == "/nonexistent"
    assert (out / "sub").stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert a.st_mtime_ns == 1_600_000_000_000_000_000
    if os.geteuid() == 0:
        null = (out / "null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(null.st_mode) == 0o666


def test_ls_lists_a_snapshot_nested_deeper_than_the_recursion_limit(
    tmp_path: Path, cli: Cli
) -> None:
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    snapshot_id = h.snapshot(_deep(1100, "d")(h, world))
    listed = cli.run("-r", str(h.path), "--json", "ls", snapshot_id, key=h.key)
    assert listed.code == 0, listed.err
    paths = [entry["path"] for entry in listed.json()["entries"]]
    assert len(paths) == 1100 + 2
    assert paths[-2:] == ["/d" * 1100 + "/leaf.txt", "/d" * 1100 + "/escape"]


NESTED_JSON = b"[" * 100_000 + b"]" * 100_000  # far deeper than Python's recursion limit


def test_commands_walk_a_snapshot_nested_deeper_than_the_recursion_limit(
    tmp_path: Path, cli: Cli
) -> None:
    """A chain of 2000 folders, each tree naming the next, whose last tree is damaged:
    every command that walks trees reports it (snapshot and path), none crashes."""
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    nodes = [h.folder("bottom", [h.file("a", b"1"), h.file("a", b"2")])]
    for _ in range(2000):
        nodes = [h.folder("d", nodes)]
    snapshot_id = h.snapshot(nodes)
    checked = cli.run("-r", str(h.path), "check", key=h.key)
    assert checked.code == 3, checked.err
    assert f"(tree of snapshot {snapshot_id[:8]}: " + "d: " * 2000 + "bottom)" in checked.err
    assert "duplicate name 'a'" in checked.err
    restored = cli.run(
        "-r", str(h.path), "restore", snapshot_id, "--target", str(world.target), key=h.key
    )
    try:
        assert restored.code == 3, restored.err
        assert "not restored: " + "/d" * 2000 + "/bottom: " in restored.err
    finally:
        remove_tree(world.target, tmp_path / "spare")
    pruned = cli.run("-r", str(h.path), "prune", key=h.key)
    assert pruned.code == 3 and "duplicate name 'a'" in pruned.err, pruned.err
    for result in (checked, restored, pruned):
        assert "internal error" not in result.err


@pytest.mark.parametrize("command", ["check", "ls", "restore", "prune"])
def test_a_tree_of_json_nested_deeper_than_the_recursion_limit_is_named_as_damaged(
    command: str, tmp_path: Path, cli: Cli
) -> None:
    """``json`` recurses into nested arrays: a tree blob of 100 000 of them is damage
    (folder /chat not restored, the rest restored), not a crash."""
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    folder = h.folder("chat", [])
    folder["subtree"] = h.writer.add(BlobType.TREE, NESTED_JSON).hex()
    snapshot_id = h.snapshot([folder, h.file("ok.txt", b"fine\n")])
    args = {
        "check": ["check"],
        "ls": ["ls", snapshot_id],
        "restore": ["restore", snapshot_id, "--target", str(world.target)],
        "prune": ["prune"],
    }[command]
    result = cli.run("-r", str(h.path), *args, key=h.key)
    assert result.code == 3, result.err
    assert "is damaged: tree is not JSON: arrays or objects nested too deep" in result.err
    assert "internal error" not in result.err
    if command == "check":
        assert f"(tree of snapshot {snapshot_id[:8]}: chat)" in result.err
    if command == "restore":
        assert "not restored: /chat: tree " in result.err
        assert (world.target / "ok.txt").read_bytes() == b"fine\n"


def test_repository_files_of_json_nested_deeper_than_the_recursion_limit_are_damage(
    tmp_path: Path, cli: Cli
) -> None:
    """The same JSON as a snapshot file and an index file (sealed with the master key)
    and as a key file (plain JSON: anyone with write access to the storage can put one
    there): check names the first two, the key file is skipped like any that is not one."""
    h = Hostile(tmp_path / "repo")
    h.snapshot([h.file("ok.txt", b"fine\n")])
    names = {}
    for kind in (FileType.SNAPSHOT, FileType.INDEX):
        sealed = h.repo.key.seal(NESTED_JSON)
        names[kind] = fmt.sha256(sealed).hex()
        h.repo.backend.save(kind, names[kind], sealed)
    h.repo.backend.save(FileType.KEY, fmt.sha256(NESTED_JSON).hex(), NESTED_JSON)
    checked = cli.run("-r", str(h.path), "check", key=h.key)
    assert checked.code == 3, checked.err
    for kind, name in names.items():
        assert f"{kind.value}/{name} is damaged: bad JSON: arrays or objects nested too deep" in (
            checked.err
        )
    listed = cli.run("-r", str(h.path), "--json", "key", "list", key=h.key)
    assert listed.code == 0 and len(listed.json()) == 1, listed.err
    snapshots = cli.run("-r", str(h.path), "snapshots", key=h.key)
    assert snapshots.code == 3 and f"snapshots/{names[FileType.SNAPSHOT]} is damaged" in (
        snapshots.err
    )
    for result in (checked, listed, snapshots):
        assert "internal error" not in result.err


def test_a_folder_tree_deeper_than_the_recursion_limit_is_backed_up_and_restored(
    tmp_path: Path, cli: Cli
) -> None:
    """Legitimate data: 1500 nested folders (the backup walked them by recursion, two
    frames a level, and ended in RecursionError), backed up twice (the second reuses the
    first as parent), checked, restored whole."""
    depth = 1500
    world = World.make(tmp_path)
    source = tmp_path / "deep"
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ["deep", *["d"] * depth]:
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"deep\n")
        os.close(leaf)
        os.symlink(world.outside, "escape", dir_fd=fd)
    finally:
        os.close(fd)
    repo = tmp_path / "repo"
    key = cli.ok("--json", "-r", str(repo), "init").json()["recovery_key"]
    try:
        for _ in range(2):
            backup = cli.run("-r", str(repo), "backup", str(source), key=key, env=PROCESSES)
            assert backup.code == 0, backup.err
        checked = cli.run("-r", str(repo), "check", key=key)
        assert checked.code == 0, checked.err
        restored = cli.run(
            "-r", str(repo), "restore", "latest", "--target", str(world.target), key=key
        )
        assert restored.code == 0, restored.err
        inside = World(world.root, world.outside, world.victim, world.target / "deep")
        os.rename(world.target / source.relative_to("/"), inside.target)
        _check_deep(depth, "d")(inside)
    finally:
        remove_tree(source, tmp_path / "spare-source")
        remove_tree(world.target, tmp_path / "spare")


def test_names_are_printed_as_text_not_as_terminal_commands_or_markup(
    tmp_path: Path, cli: Cli
) -> None:
    """A name is data: escape sequences (clear the screen, write the clipboard), bidi
    overrides and rich markup in it must reach the terminal as visible text."""
    world = World.make(tmp_path)
    h = Hostile(tmp_path / "repo")
    names = [
        "[bold blink]markup",
        "\x1b[2J\x1b]52;c;cHduZWQ=\x07clip",
        "[",
        "x]",
        "evil\u202etxt.exe",
    ]
    snapshot_id = h.snapshot([h.folder(name, [h.file("f", b"x")]) for name in names])
    listed = cli.run("-r", str(h.path), "ls", snapshot_id, key=h.key)
    assert listed.code == 0, listed.err
    assert "\x1b" not in listed.out and "\u202e" not in listed.out and "\x07" not in listed.out
    lines = set(listed.out.splitlines())
    assert {
        "/[bold blink]markup",
        "/\\x1b[2J\\x1b]52;c;cHduZWQ=\\x07clip",
        "/[",
        "/x]/f",
        "/evil\\u202etxt.exe",
    } <= lines
    # Damage reports name such paths the same way instead of crashing.
    broken = h.snapshot([h.folder("x[/y]", [h.file("a", b"1"), h.file("a", b"2")])])
    checked = cli.run("-r", str(h.path), "check", key=h.key)
    assert checked.code == 3 and "internal error" not in checked.err, checked.err
    restored = cli.run(
        "-r", str(h.path), "restore", broken, "--target", str(world.target), key=h.key
    )
    assert restored.code == 3 and "unsafe name: 'x[/y]'" in restored.err, restored.err
