"""`backvault import whatsapp` / `export whatsapp` through the real command line: the real
sample from the app (../shared/vectors/whatsapp, skipped where absent), a round trip whose
exported file is also opened by an independent decryption written here from the documented
layout, ten days of a growing database, and each kind of bad file refused with the
repository untouched."""

from __future__ import annotations

import hashlib
import hmac
import io
import random
import sqlite3
import zipfile
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backvault.source.whatsapp import crypt15
from tests.conftest import Cli, InitRepo

VECTORS = (Path(__file__).parents[1] / ".." / "shared" / "vectors" / "whatsapp").resolve()
SAMPLE = VECTORS / "msgstore.db.crypt15"
SAMPLE_KEY_FILE = VECTORS / "encrypted_backup.key"
SAMPLE_DB = VECTORS / "msgstore.db"
SAMPLE_KEY_GROUPED = (
    "6730 A595 A148 4D0C 39C1 01DC 0AC8 2EC5 E401 BB6F 0E1B 8EE2 DC10 4A6B 3687 F017"
)
needs_sample = pytest.mark.skipif(
    not SAMPLE.exists(), reason="the WhatsApp sample (../shared/vectors/whatsapp) is absent"
)


# --- helpers ---------------------------------------------------------------------------


def repo_listing(repo: InitRepo) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(repo.path)), p.stat().st_size)
        for p in repo.path.rglob("*")
        if p.is_file()
    )


def repo_bytes(repo: InitRepo) -> int:
    return sum(size for _, size in repo_listing(repo))


def restored_files(cli: Cli, repo: InitRepo, snapshot: str, target: Path) -> Path:
    """Restore a WhatsApp import and return its WhatsApp folder."""
    cli.ok("-r", str(repo.path), "restore", snapshot, "-t", str(target), key=repo.key)
    [root] = list(target.rglob(".backvault-whatsapp.json"))
    return root.parent


def snapshots(cli: Cli, repo: InitRepo) -> list[dict[str, object]]:
    doc = cli.ok("--json", "-r", str(repo.path), "snapshots", key=repo.key).json()
    assert isinstance(doc, list)
    return doc


def make_database(path: Path, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3000)]
    db = sqlite3.connect(path)
    db.execute("PRAGMA page_size = 4096")
    db.execute("CREATE TABLE message (id INTEGER PRIMARY KEY, chat INT, status INT, text TEXT)")
    db.executemany(
        "INSERT INTO message (chat, status, text) VALUES (?, 0, ?)",
        [
            (rng.randrange(40), " ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))))
            for _ in range(rows)
        ],
    )
    db.commit()
    db.close()


def encrypt_file(src: Path, dst: Path, key: bytes, **kwargs: object) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    info = crypt15.default_info("2.24.1.1", "42")
    with open(src, "rb") as plain, open(dst, "wb") as out:
        crypt15.encrypt(plain, out, key, info=info, **kwargs)  # type: ignore[arg-type]


def independent_decrypt(data: bytes, root_key: bytes) -> bytes:
    """docs/whatsapp.md's layout, read with nothing of backvault: a varint header length,
    the BackupPrefix (08 01: key type 1; 1a 12 0a 10: field 3 holding the 16-byte IV), the
    AES-256-GCM body and tag, the MD5 trailer; the key is HKDF-SHA256 (zero salt, info
    "backup encryption") of the root key, computed here as the two HMACs it is."""
    length, at = data[0], 1
    if length & 0x80:
        length, at = (length & 0x7F) | data[1] << 7, 2
    prefix = data[at : at + length]
    assert prefix[:2] == b"\x08\x01" and prefix[2:6] == b"\x1a\x12\x0a\x10"
    iv = prefix[6:22]
    body_and_tag, trailer = data[at + length : -16], data[-16:]
    assert hashlib.md5(data[:-16], usedforsecurity=False).digest() == trailer
    prk = hmac.new(b"\x00" * 32, root_key, hashlib.sha256).digest()
    key = hmac.new(prk, b"backup encryption\x01", hashlib.sha256).digest()
    return zlib.decompress(AESGCM(key).decrypt(iv, body_and_tag, None))


# --- the real sample -------------------------------------------------------------------


@needs_sample
def test_sample_imports_with_the_typed_key_and_restores_byte_identical(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    done = cli.ok(
        "--json",
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        str(SAMPLE),
        key=repo.key,
        env={"BACKVAULT_WHATSAPP_KEY": SAMPLE_KEY_GROUPED},  # spaces, upper case
    ).json()
    assert done["app_versions"] == ["2.22.5.13"]
    assert done["files"][0]["stored_as"] == "msgstore.db"
    [snap] = snapshots(cli, repo)
    assert snap["tags"] == ["whatsapp", "whatsapp-2.22.5.13"]
    root = restored_files(cli, repo, "latest", tmp_path / "restored")
    assert (root / "msgstore.db").read_bytes() == SAMPLE_DB.read_bytes()


def run_on_a_terminal(cli: Cli, args: list[str], typed: str, key: str) -> tuple[int, str, str]:
    """Run the CLI with a pseudo-terminal as its controlling terminal and standard input,
    wait for the hidden prompt, and type ``typed`` at it."""
    import fcntl
    import os
    import pty
    import select
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "backvault.cli", *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**cli.env, "BACKVAULT_KEY": key},
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        text=True,
    )
    os.close(slave)
    seen = b""
    try:
        while b"key:" not in seen:
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, f"no prompt on the terminal: {seen!r}"
            seen += os.read(master, 1024)
        os.write(master, typed.encode() + b"\n")
        out, err = proc.communicate(timeout=120)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # the terminal's other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert typed not in seen.decode(errors="replace")  # hidden: never echoed
    return proc.returncode, out, err


@needs_sample
def test_sample_imports_with_the_key_typed_at_the_prompt(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    code, out, err = run_on_a_terminal(
        cli, ["-r", str(repo.path), "import", "whatsapp", str(SAMPLE)], SAMPLE_KEY_GROUPED, repo.key
    )
    assert code == 0, err
    assert "1 WhatsApp files decrypted and verified" in out
    root = restored_files(cli, repo, "latest", tmp_path / "restored")
    assert (root / "msgstore.db").read_bytes() == SAMPLE_DB.read_bytes()


@needs_sample
def test_sample_imports_with_the_key_file(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    result = cli.ok(
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        "--key-file",
        str(SAMPLE_KEY_FILE),
        str(SAMPLE),
        key=repo.key,
    )
    assert "1 WhatsApp files decrypted and verified (app 2.22.5.13)" in result.out
    root = restored_files(cli, repo, "latest", tmp_path / "restored")
    assert (root / "msgstore.db").read_bytes() == SAMPLE_DB.read_bytes()


@needs_sample
def test_info_shows_the_header_without_a_key(cli: Cli) -> None:
    shown = cli.ok("import", "whatsapp", "--info", str(SAMPLE))
    assert "2.22.5.13" in shown.out and "…67" in shown.out
    assert "end-to-end" in shown.out and "not encrypted" in shown.out
    doc = cli.ok("--json", "import", "whatsapp", "--info", str(SAMPLE)).json()
    header = doc["files"][0]["header"]
    assert header["format"] == "crypt15" and header["key_type"] == 1
    assert header["jid_suffix"] == "67" and header["header_bytes"] == 131
    assert header["features"]["call_log"] == 1


@needs_sample
def test_sample_wrong_key_is_one_line_and_leaves_the_repository_alone(
    cli: Cli, repo: InitRepo
) -> None:
    before = repo_listing(repo)
    result = cli.run(
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        str(SAMPLE),
        key=repo.key,
        env={"BACKVAULT_WHATSAPP_KEY": "00" * 32},
    )
    assert result.code == 10
    assert result.err.strip() == (
        "backvault: the 64-digit key does not open msgstore.db.crypt15; it was made with "
        "another key"
    )
    assert repo_listing(repo) == before


# --- round trip ------------------------------------------------------------------------


def phone_folder(root: Path, key: bytes) -> Path:
    """A WhatsApp folder as on a phone: the sample (or a made database) in Databases/,
    other databases and a multi-file ZIP backup in Backups/, plain media in Media/."""
    work = root / "plain"
    work.mkdir(parents=True)
    folder = root / "WhatsApp"
    make_database(work / "msgstore.db", 3000, seed=2)
    encrypt_file(work / "msgstore.db", folder / "Databases" / "msgstore.db.crypt15", key)
    make_database(work / "wa.db", 200, seed=3)
    encrypt_file(work / "wa.db", folder / "Backups" / "wa.db.crypt15", key)
    with zipfile.ZipFile(work / "wallpapers.backup", "w") as zf:
        zf.writestr("wallpaper.jpg", random.Random(4).randbytes(20_000))
    encrypt_file(
        work / "wallpapers.backup",
        folder / "Backups" / "wallpapers.backup.crypt15",
        key,
        compress=False,
        trailer=False,
    )
    media = folder / "Media" / "WhatsApp Images"
    media.mkdir(parents=True)
    (media / "IMG-20240101-WA0001.jpg").write_bytes(random.Random(5).randbytes(300_000))
    (folder / "Media" / ".nomedia").write_bytes(b"")
    return folder


def test_export_then_import_round_trips_and_opens_independently(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    key = random.Random(6).randbytes(32)
    folder = phone_folder(tmp_path / "phone", key)
    env = {"BACKVAULT_WHATSAPP_KEY": key.hex()}
    first = cli.ok(
        "--json", "-r", str(repo.path), "import", "whatsapp", str(folder), key=repo.key, env=env
    ).json()
    assert sorted(f["stored_as"] for f in first["files"]) == [
        "Backups/wa.db",
        "Backups/wallpapers.backup",
        "Databases/msgstore.db",
    ]
    assert first["other_files"] == 2

    exported = tmp_path / "exported"
    cli.ok(
        "-r",
        str(repo.path),
        "export",
        "whatsapp",
        first["snapshot"][:8],
        "--target",
        str(exported),
        key=repo.key,
        env=env,
    )
    names = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    # The exported database opens without backvault, from the documented layout.
    plain = independent_decrypt((exported / "Databases" / "msgstore.db.crypt15").read_bytes(), key)
    assert plain == (tmp_path / "phone" / "plain" / "msgstore.db").read_bytes()
    # The multi-file backup is the ZIP again, with no trailer, as the app wrote it.
    with open(exported / "Backups" / "wallpapers.backup.crypt15", "rb") as src:
        out = io.BytesIO()
        assert crypt15.decrypt(src, out, key).trailer is False
    assert out.getvalue() == (tmp_path / "phone" / "plain" / "wallpapers.backup").read_bytes()
    assert (exported / "Databases" / "msgstore.db.crypt15").read_bytes() != (
        folder / "Databases" / "msgstore.db.crypt15"
    ).read_bytes()  # a fresh IV: never the same GCM stream twice

    second = cli.ok(
        "--json", "-r", str(repo.path), "import", "whatsapp", str(exported), key=repo.key, env=env
    ).json()
    a = restored_files(cli, repo, first["snapshot"], tmp_path / "a")
    b = restored_files(cli, repo, second["snapshot"], tmp_path / "b")
    for name in ("Databases/msgstore.db", "Backups/wa.db", "Backups/wallpapers.backup"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "Media" / "WhatsApp Images" / "IMG-20240101-WA0001.jpg").read_bytes() == (
        b / "Media" / "WhatsApp Images" / "IMG-20240101-WA0001.jpg"
    ).read_bytes()

    # Export under another key is refused: the phone could not open what it wrote.
    refused = cli.run(
        "-r",
        str(repo.path),
        "export",
        "whatsapp",
        "latest",
        "--target",
        str(tmp_path / "other"),
        key=repo.key,
        env={"BACKVAULT_WHATSAPP_KEY": "11" * 32},
    )
    assert refused.code == 10 and "not the one" in refused.err
    assert not (tmp_path / "other").exists()


@needs_sample
def test_the_sample_round_trips_through_export(cli: Cli, repo: InitRepo, tmp_path: Path) -> None:
    args = ("-r", str(repo.path))
    key_file = ("--key-file", str(SAMPLE_KEY_FILE))
    cli.ok(*args, "import", "whatsapp", *key_file, str(SAMPLE), key=repo.key)
    out = tmp_path / "out"
    cli.ok(*args, "export", "whatsapp", "latest", "--target", str(out), *key_file, key=repo.key)
    exported = (out / "msgstore.db.crypt15").read_bytes()
    root_key = SAMPLE_KEY_FILE.read_bytes()[-32:]
    assert independent_decrypt(exported, root_key) == SAMPLE_DB.read_bytes()
    # The header the app wrote comes back (but for the IV).
    with open(SAMPLE, "rb") as a, open(out / "msgstore.db.crypt15", "rb") as b:
        ha, hb = crypt15.read_header(a), crypt15.read_header(b)
    assert (ha.info, ha.key_type, ha.length) == (hb.info, hb.key_type, hb.length)
    assert ha.iv != hb.iv


# --- ten days --------------------------------------------------------------------------


def changed_pages(old: bytes, new: bytes, page: int = 4096) -> int:
    count = 0
    for offset in range(0, len(new), page):
        if new[offset : offset + page] != old[offset : offset + page]:
            count += 1
    return count


def test_ten_daily_imports_grow_by_the_changed_pages(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    key = random.Random(7).randbytes(32)
    env = {"BACKVAULT_WHATSAPP_KEY": key.hex()}
    db_path = tmp_path / "msgstore.db"
    make_database(db_path, 20_000, seed=8)
    rng = random.Random(9)
    previous = b""
    rows: list[tuple[int, int, int, int, int, int, int]] = []
    for day in range(1, 11):
        if day > 1:  # a day of messages: new ones, and read receipts on older ones
            db = sqlite3.connect(db_path)
            db.executemany(
                "INSERT INTO message (chat, status, text) VALUES (?, 0, ?)",
                [
                    (rng.randrange(40), " ".join(f"d{day}w{rng.randrange(900)}" for _ in range(20)))
                    for _ in range(150)
                ],
            )
            top = db.execute("SELECT max(id) FROM message").fetchone()[0]
            for _ in range(15):
                db.execute("UPDATE message SET status = 1 WHERE id = ?", (rng.randrange(1, top),))
            db.commit()
            db.close()
        state = db_path.read_bytes()
        folder = tmp_path / f"day{day}" / "WhatsApp"
        encrypt_file(db_path, folder / "Databases" / "msgstore.db.crypt15", key)
        before = repo_bytes(repo)
        done = cli.ok(
            "--json", "-r", str(repo.path), "import", "whatsapp", str(folder), key=repo.key, env=env
        ).json()
        rows.append(
            (
                day,
                len(state),
                changed_pages(previous, state),
                changed_pages(previous, state, 8192),
                done["backup"]["bytes_stored"],
                repo_bytes(repo) - before,
                (folder / "Databases" / "msgstore.db.crypt15").stat().st_size,
            )
        )
        previous = state

    print(
        "\nday  db bytes  4K pages changed  8K chunks changed  chunks stored  repo growth  crypt15"
    )
    for row in rows:
        print("{:>3}  {:>8}  {:>16}  {:>17}  {:>13}  {:>11}  {:>7}".format(*row))
    later = rows[1:]
    total_changed = sum(r[2] * 4096 for r in later)
    total_growth = sum(r[5] for r in later)
    total_crypt = sum(r[6] for r in later)
    print(
        f"days 2-10: repository +{total_growth} bytes (chunks {sum(r[4] for r in later)}) for "
        f"{total_changed} bytes of changed pages; the nine crypt15 files weigh {total_crypt}"
    )
    # About the changed pages (each costs its 8 KiB chunk, compressed, plus the snapshot's
    # tree and index), far from a copy a day.
    assert total_growth < 3 * total_changed
    assert total_growth < total_crypt / 4
    assert len(snapshots(cli, repo)) == 10


# --- bad files -------------------------------------------------------------------------


def _damaged(case: str, good: bytes) -> bytes:
    if case == "truncated":
        return good[: len(good) // 2]
    if case == "body byte":
        data = bytearray(good)
        data[len(good) // 2] ^= 0x01
        return bytes(data)
    if case == "header byte":  # inside the app version string: the MD5 trailer notices
        data = bytearray(good)
        at = good.index(b"2.24.1.1")
        data[at + 2] ^= 0x01
        return bytes(data)
    if case == "header structure":
        data = bytearray(good)
        data[3] ^= 0x40
        return bytes(data)
    if case == "empty":
        return b""
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "expected", "code"),
    [
        (
            "wrong key",
            # The first file of the folder (Backups/ sorts before Databases/).
            "the 64-digit key does not open Backups/wa.db.crypt15; it was made with another key",
            10,
        ),
        ("truncated", "Databases/msgstore.db.crypt15 is damaged or cut short", 1),
        ("body byte", "Databases/msgstore.db.crypt15 is damaged or cut short", 1),
        ("header byte", "Databases/msgstore.db.crypt15 is damaged or cut short", 1),
        ("header structure", "Databases/msgstore.db.crypt15 has a damaged header", 1),
        ("empty", "Databases/msgstore.db.crypt15 is empty", 1),
    ],
)
def test_a_bad_file_is_one_line_and_leaves_the_repository_unchanged(
    cli: Cli, repo: InitRepo, tmp_path: Path, case: str, expected: str, code: int
) -> None:
    key = random.Random(10).randbytes(32)
    folder = tmp_path / "WhatsApp"
    make_database(tmp_path / "msgstore.db", 500)
    encrypt_file(tmp_path / "msgstore.db", folder / "Databases" / "msgstore.db.crypt15", key)
    (folder / "Backups").mkdir()
    encrypt_file(tmp_path / "msgstore.db", folder / "Backups" / "wa.db.crypt15", key)
    target = folder / "Databases" / "msgstore.db.crypt15"
    if case != "wrong key":
        target.write_bytes(_damaged(case, target.read_bytes()))
    given = "22" * 32 if case == "wrong key" else key.hex()
    before = repo_listing(repo)
    result = cli.run(
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        str(folder),
        key=repo.key,
        env={"BACKVAULT_WHATSAPP_KEY": given},
    )
    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"backvault: {expected}"), result.err
    assert repo_listing(repo) == before
    assert not list((cli.home / "cache").rglob("msgstore.db"))  # no plaintext left behind


def test_older_formats_and_bad_keys_are_refused_clearly(
    cli: Cli, repo: InitRepo, tmp_path: Path
) -> None:
    old = tmp_path / "msgstore.db.crypt14"
    old.write_bytes(b"\x9a\x01\x08\x00\x12\x10" + bytes(300))
    result = cli.run(
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        str(old),
        key=repo.key,
        env={"BACKVAULT_WHATSAPP_KEY": "33" * 32},
    )
    assert result.code == 1 and "is a crypt14 backup" in result.err
    assert "not supported" in result.err

    # In a folder, a crypt14 left from before end-to-end backups is skipped, with a warning.
    folder = tmp_path / "WhatsApp"
    (folder / "Databases").mkdir(parents=True)
    old.rename(folder / "Databases" / "msgstore-2021-01-01.1.db.crypt14")
    make_database(tmp_path / "msgstore.db", 100)
    key = random.Random(11).randbytes(32)
    encrypt_file(tmp_path / "msgstore.db", folder / "Databases" / "msgstore.db.crypt15", key)
    result = cli.ok(
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        str(folder),
        key=repo.key,
        env={"BACKVAULT_WHATSAPP_KEY": key.hex()},
    )
    assert (
        "warning: skipped Databases/msgstore-2021-01-01.1.db.crypt14: a crypt14 backup, an "
        "older format not supported"
    ) in result.err
    old = folder / "Databases" / "msgstore-2021-01-01.1.db.crypt14"

    bad_key = tmp_path / "key"
    bad_key.write_bytes(crypt15.key_file_bytes(bytes(131)))
    result = cli.run(
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        "--key-file",
        str(bad_key),
        str(old),
        key=repo.key,
    )
    assert result.code == 10 and "crypt12/crypt14" in result.err

    result = cli.run(
        "-r",
        str(repo.path),
        "import",
        "whatsapp",
        str(old),
        key=repo.key,
        env={"BACKVAULT_WHATSAPP_KEY": "my password"},
    )
    assert result.code == 10 and "64 hex digits" in result.err
    assert "my password" not in result.err
