"""WhatsApp backups (``*.crypt15``): import into a snapshot, show a header, export back.

Import is two steps, so that nothing touches the repository before every file has been
decrypted and authenticated: ``staged_import`` decrypts each ``*.crypt15`` file of the
backup folder into a private staging folder (the plain SQLite databases, named without
``.crypt15``) and links or copies everything else (``Media/``) beside them; then
``save_import`` backs that folder up as one snapshot tagged ``whatsapp`` and
``whatsapp-<app version>``. A file that fails stops the import before the repository is
opened. The staging folder has one fixed place (under ``device.paths.private_temp_dir``),
held by a lock file, so every import's snapshot has the same path and the next one finds
it as its parent.

Next to the databases the snapshot holds ``.backvault-whatsapp.json``: for each decrypted
file, its original name, its header's info block, whether its content was compressed and
whether it carried an MD5 trailer, and a check value of the key (an HMAC under the backup
key: it tells export whether the key typed is the one the files were made with). Export
restores the snapshot into a private folder and writes each file back as crypt15, under
a fresh IV, with the header the app wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backvault.app.errors import (
    AppError,
    InvalidArgument,
    MalformedWhatsAppKey,
    WhatsAppFileRefused,
    WhatsAppKeyMismatch,
)
from backvault.engine.archiver import Backup, BackupResult
from backvault.engine.progress import Progress
from backvault.engine.restorer import Restorer
from backvault.repo.format import Snapshot
from backvault.repo.repository import Repository
from backvault.source.whatsapp import crypt15

TAG = "whatsapp"
MANIFEST = ".backvault-whatsapp.json"
SUFFIX = ".crypt15"
STAGING = "whatsapp-import"
ROOT_NAME = "WhatsApp"

HEADER_REVEALS = (
    "The header is not encrypted: whoever holds the file (your phone's storage, a cloud "
    "drive, a backup provider) can read the app version, the last two digits of the phone "
    "number, whether the key is end-to-end, and the feature flags (which database tables and "
    "migrations the backup has); the file size tells roughly how much history it holds. "
    "Messages, contacts and media inside stay encrypted under the 64-digit key."
)


# --- keys -----------------------------------------------------------------------------


def key_from_text(text: str) -> bytes:
    try:
        return crypt15.parse_key_text(text)
    except crypt15.MalformedKey as exc:
        raise MalformedWhatsAppKey(str(exc)) from None


def key_from_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        return crypt15.parse_key_file(data)
    except crypt15.MalformedKey as exc:
        raise MalformedWhatsAppKey(f"{path.name}: {exc}") from None


def key_check(root_key: bytes) -> str:
    """A short value that tells whether two keys are the same, without revealing either."""
    mac = hmac.new(crypt15.backup_key(root_key), b"backvault whatsapp key check", "sha256")
    return mac.hexdigest()[:16]


# --- import ---------------------------------------------------------------------------


@dataclass
class ImportedFile:
    source: str  # relative to the imported folder, as found
    stored_as: str  # relative to the snapshot's folder
    app_version: str | None
    payload: str
    trailer: bool
    bytes: int


@dataclass
class Staged:
    root: Path  # the folder backed up
    files: list[ImportedFile] = field(default_factory=list)
    other_files: int = 0
    # What was left out, and why: symlinks, sockets, files of older formats in a folder.
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def app_versions(self) -> list[str]:
        return sorted({f.app_version for f in self.files if f.app_version})

    @property
    def tags(self) -> list[str]:
        return [TAG, *(f"{TAG}-{version}" for version in self.app_versions)]


@dataclass
class ImportResult:
    snapshot_id: str
    staged: Staged
    backup: BackupResult

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot_id,
            "tags": self.staged.tags,
            "app_versions": self.staged.app_versions,
            "files": [asdict(f) for f in self.staged.files],
            "other_files": self.staged.other_files,
            "skipped": [{"path": p, "reason": r} for p, r in self.staged.skipped],
            "backup": self.backup.to_json(),
        }


def _refused(rel: str, exc: crypt15.Crypt15Error) -> AppError:
    if isinstance(exc, crypt15.KeyMismatch):
        return WhatsAppKeyMismatch(exc.describe(rel))
    return WhatsAppFileRefused(exc.describe(rel))


def _entries(source: Path) -> list[tuple[Path, str]]:
    """Every entry under ``source`` with its relative path (a file: itself, by name)."""
    if not source.is_dir():
        return [(source, source.name)]
    found: list[tuple[Path, str]] = []
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder, name)
            found.append((path, path.relative_to(source).as_posix()))
    return found


@contextlib.contextmanager
def _staging_folder(temp_root: Path) -> Iterator[Path]:
    """The one staging folder, emptied, held under a lock until the block ends."""
    lock_path = temp_root / f"{STAGING}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AppError(
                "another WhatsApp import is running on this device; wait for it to finish"
            ) from None
        base = temp_root / STAGING
        shutil.rmtree(base, ignore_errors=True)  # a leftover of an interrupted import
        base.mkdir(mode=0o700)
        try:
            yield base / ROOT_NAME
        finally:
            shutil.rmtree(base, ignore_errors=True)
    finally:
        os.close(fd)


def _private_output(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o600), "wb")


def _older(rel: str, older: str) -> str:
    return (
        f"{rel} is a {older} backup, an older format that is not supported (it opens with the "
        "'key' file, not the 64-digit key)"
    )


def _check_source(source: Path, entries: list[tuple[Path, str]]) -> None:
    """Refuse what cannot be imported before anything is decrypted. In a folder, a file of
    an older format (a crypt14 left from before end-to-end backups) is skipped with a
    warning; given alone, it is refused."""
    if not source.exists():
        raise InvalidArgument(f"{source} does not exist")
    if source.is_file() and not source.name.endswith(SUFFIX):
        older = crypt15.sniff_format(b"", source.name)
        if older is not None:
            raise WhatsAppFileRefused(
                _older(source.name, older) + "; make a new backup in the app with end-to-end "
                "encryption (crypt15)"
            )
        raise InvalidArgument(f"{source.name} is not a WhatsApp backup file (*.crypt15)")
    if not any(rel.endswith(SUFFIX) for _, rel in entries):
        raise InvalidArgument(f"{source} holds no WhatsApp backup files (*.crypt15)")


@contextlib.contextmanager
def staged_import(source: Path, root_key: bytes, temp_root: Path) -> Iterator[Staged]:
    """Decrypt and verify every ``*.crypt15`` file under ``source`` (a backup folder, or
    one file) into a private staging folder, with everything else beside them. Raises
    before yielding if any file fails; the folder is removed when the block ends."""
    entries = _entries(source)
    _check_source(source, entries)
    with _staging_folder(temp_root) as root:
        root.mkdir(mode=0o700)
        staged = Staged(root)
        manifest: dict[str, Any] = {"version": 1, "key_check": key_check(root_key), "files": {}}
        for path, rel in entries:
            older = crypt15.sniff_format(b"", path.name)
            if path.is_symlink() or not path.is_file():
                staged.skipped.append((rel, "not a regular file"))
                continue
            if older is not None:
                staged.skipped.append((rel, f"a {older} backup, an older format not supported"))
                continue
            if rel.endswith(SUFFIX):
                stored = rel[: -len(SUFFIX)]
                done, header = _decrypt_one(path, rel, root / stored, root_key)
                staged.files.append(done)
                manifest["files"][stored] = {
                    "source": rel,
                    "key_type": header.key_type,
                    "info": header.info.hex(),
                    "payload": done.payload,
                    "trailer": done.trailer,
                }
            else:
                _link_or_copy(path, root / rel)
                staged.other_files += 1
        with _private_output(root / MANIFEST) as out:
            out.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        yield staged


def _decrypt_one(
    path: Path, rel: str, target: Path, root_key: bytes
) -> tuple[ImportedFile, crypt15.Header]:
    try:
        with open(path, "rb") as src, _private_output(target) as out:
            result = crypt15.decrypt(src, out, root_key)
            out.flush()
            os.fsync(out.fileno())
    except crypt15.Crypt15Error as exc:
        raise _refused(rel, exc) from None
    done = ImportedFile(
        source=rel,
        stored_as=rel[: -len(SUFFIX)],
        app_version=result.header.app_version,
        payload=result.payload,
        trailer=result.trailer,
        bytes=result.bytes_written,
    )
    return done, result.header


def _link_or_copy(path: Path, target: Path) -> None:
    """A hard link where it can (no copy of the media, and the same inode and times each
    day, so the backup's files cache skips what it already holds), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.link(path, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, target, follow_symlinks=False)


def save_import(
    repo: Repository,
    staged: Staged,
    *,
    temp_dir: Path,
    progress: Progress | None = None,
    hostname: str | None = None,
) -> ImportResult:
    """Back the staged folder up as one snapshot."""
    # Nothing but this import writes the staging folder: the databases are stored as
    # decrypted, byte for byte (a consistent copy would change their change counter).
    backup = Backup(repo, progress, temp_dir=temp_dir, copy_databases=False).run(
        [str(staged.root)], tags=staged.tags, hostname=hostname
    )
    if backup.errors:
        path, error = backup.errors[0]
        raise AppError(f"the import could not read {path}: {error}")
    return ImportResult(backup.snapshot_id, staged, backup)


# --- header information ---------------------------------------------------------------


@dataclass
class FileInfo:
    file: str
    header: dict[str, Any] | None
    problem: str | None = None


def header_info(source: Path) -> list[FileInfo]:
    """The plaintext headers of ``source`` (a file, or every backup file in a folder),
    read without the key."""
    if not source.exists():
        raise InvalidArgument(f"{source} does not exist")
    found: list[FileInfo] = []
    for path, rel in _entries(source):
        known = rel.endswith(SUFFIX) or crypt15.sniff_format(b"", path.name) is not None
        if source.is_dir() and not known:
            continue
        try:
            with open(path, "rb") as src:
                start = src.read(2)
                older = crypt15.sniff_format(start, path.name)
                if older is not None and not path.name.endswith(SUFFIX):
                    raise crypt15.UnsupportedFormat(f"is a {older} backup, not supported")
                src.seek(0)
                header = crypt15.read_header(src)
            found.append(FileInfo(rel, header.to_json()))
        except crypt15.Crypt15Error as exc:
            found.append(FileInfo(rel, None, exc.describe(rel)))
        except OSError as exc:
            found.append(FileInfo(rel, None, f"{rel}: {exc.strerror}"))
    if not found:
        raise InvalidArgument(f"{source} holds no WhatsApp backup files (*.crypt15)")
    return found


# --- export ---------------------------------------------------------------------------


@dataclass
class ExportResult:
    snapshot_id: str
    target: str
    encrypted: list[str] = field(default_factory=list)  # crypt15 files written
    copied: int = 0  # other files (media) copied as they are

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_whatsapp_snapshot(repo: Repository, ref: str) -> tuple[str, Snapshot]:
    """``latest`` (the newest WhatsApp import) or an ID prefix of one."""
    if ref == "latest":
        imports = [(name, snap) for name, snap in repo.list_snapshots() if TAG in snap.tags]
        if not imports:
            raise InvalidArgument("the repository holds no WhatsApp import")
        return imports[-1]
    name, snap = repo.find_snapshot(ref)
    if TAG not in snap.tags:
        raise InvalidArgument(
            f"snapshot {name[:8]} is not a WhatsApp import (it has no '{TAG}' tag)"
        )
    return name, snap


def export_backup(
    repo: Repository, ref: str, target: Path, root_key: bytes, temp_root: Path
) -> ExportResult:
    """Write the WhatsApp folder of snapshot ``ref`` into ``target`` (missing or empty) as
    crypt15 files under ``root_key``, in the layout it was imported from."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidArgument(f"{target} is not an empty folder; choose a new one")
    name, snap = find_whatsapp_snapshot(repo, ref)
    if len(snap.paths) != 1:
        raise AppError(f"snapshot {name[:8]} does not have the layout of a WhatsApp import")
    with tempfile.TemporaryDirectory(prefix="whatsapp-export-", dir=temp_root) as work:
        restored = Path(work) / "restored"
        result = Restorer(repo, restored).run(snap, name)
        if result.damaged_count:
            path, error = result.damaged[0] if result.damaged else ("", "damaged")
            raise AppError(f"snapshot {name[:8]} could not be restored whole: {path}: {error}")
        root = restored / snap.paths[0].lstrip("/")
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            files: dict[str, Any] = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise AppError(
                f"snapshot {name[:8]} has no readable {MANIFEST}; it was not made by "
                "`backvault import whatsapp`"
            ) from None
        if manifest.get("key_check") not in (None, key_check(root_key)):
            raise WhatsAppKeyMismatch(
                f"the 64-digit key given is not the one snapshot {name[:8]}'s files were made "
                "with; the phone would not open them"
            )
        done = ExportResult(name, str(target))
        target.mkdir(parents=True, exist_ok=True)
        for source, rel in _entries(root):
            if rel == MANIFEST or source.is_symlink() or not source.is_file():
                continue
            entry = files.get(rel)
            if entry is None:
                _place(target / rel, source, None, root_key)
                done.copied += 1
            else:
                out_rel = str(entry.get("source", rel + SUFFIX))
                _place(target / out_rel, source, entry, root_key)
                done.encrypted.append(out_rel)
    return done


def _place(path: Path, source: Path, entry: dict[str, Any] | None, root_key: bytes) -> None:
    """Write ``source`` to ``path`` (as crypt15 if it has a manifest ``entry``, else as
    it is) under a temporary name beside it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        with open(source, "rb") as src, open(temporary, "xb") as out:
            if entry is None:
                shutil.copyfileobj(src, out, crypt15.CHUNK)
            else:
                key_type = entry.get("key_type")
                crypt15.encrypt(
                    src,
                    out,
                    root_key,
                    info=bytes.fromhex(str(entry.get("info", ""))),
                    key_type=1 if key_type is None else int(key_type),
                    compress=entry.get("payload") == "zlib",
                    trailer=bool(entry.get("trailer", True)),
                )
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
