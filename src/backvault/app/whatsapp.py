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
import re
import shutil
import stat
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
from backvault.source.sqlite import walk_files
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
        """``whatsapp``, and ``whatsapp-<version>`` for each app version that is a plain
        version number (a header is not authenticated: its text is anyone's)."""
        versions = [v for v in self.app_versions if tag_safe(v)]
        return [TAG, *(f"{TAG}-{version}" for version in versions)]

    @property
    def untagged(self) -> list[ImportedFile]:
        """The files whose header's app version is not used as a tag."""
        return [f for f in self.files if f.app_version and not tag_safe(f.app_version)]


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


_VERSION = re.compile(r"[0-9A-Za-z._-]{1,64}")


def tag_safe(version: str) -> bool:
    """Whether an app version read from a header may become part of a tag."""
    return _VERSION.fullmatch(version) is not None


def _refused(rel: str, exc: crypt15.Crypt15Error) -> AppError:
    if isinstance(exc, crypt15.KeyMismatch):
        return WhatsAppKeyMismatch(exc.describe(rel))
    return WhatsAppFileRefused(exc.describe(rel))


# A WhatsApp backup folder is a few levels deep (WhatsApp/Media/WhatsApp Images/Sent).
# Deeper than this is not one: refused, with one line, before anything is written (the
# staging and clean-up of such a tree would recurse past Python's limit).
MAX_FOLDER_DEPTH = 64


def _entries(source: Path) -> list[tuple[Path, str]]:
    """Every entry under ``source`` with its relative path (a file: itself, by name): in
    each folder its files by name, then its symlinks to folders (not followed), then the
    folders below, each in turn, by name (``walk_files``: Python 3.11's ``os.walk``
    recurses); InvalidArgument for folders nested deeper than MAX_FOLDER_DEPTH."""
    if not source.is_dir():
        return [(source, source.name)]
    found: list[tuple[Path, str]] = []
    for folder, files, links in walk_files(str(source)):
        inside = Path(folder).relative_to(source)
        if len(inside.parts) > MAX_FOLDER_DEPTH:
            raise InvalidArgument(
                f"{source} has folders nested more than {MAX_FOLDER_DEPTH} deep "
                f"({inside.as_posix()[:60]}…): not a WhatsApp backup, whose folders are a "
                "few levels deep"
            )
        for name in files + links:
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


def _refuse_symlink(source: Path) -> None:
    """PATH itself may not be a symlink. Refused rather than followed: inside a folder the
    import skips symlinks, and a link planted where a backup is expected must not choose
    what is read; naming the real place makes what is imported explicit."""
    if source.is_symlink():
        raise InvalidArgument(
            f"{source} is a symbolic link; give the file or folder it points to "
            f"({os.path.realpath(source)}) itself"
        )


def _check_source(source: Path, entries: list[tuple[Path, str]]) -> None:
    """Refuse what cannot be imported before anything is decrypted. In a folder, a file of
    an older format (a crypt14 left from before end-to-end backups) is skipped with a
    warning; given alone, it is refused."""
    _refuse_symlink(source)
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
    _check_names(entries)
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
        if not staged.files:
            why = "; ".join(f"{rel}: {reason}" for rel, reason in staged.skipped[:3])
            raise WhatsAppFileRefused(
                f"nothing was imported: {source} holds no *.crypt15 file that is a regular "
                f"file of the crypt15 format ({why})"
            )
        with _private_output(root / MANIFEST) as out:
            out.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        yield staged


def _imported(path: Path, rel: str) -> bool:
    """Whether ``staged_import`` brings this entry in (decrypted or as it is)."""
    if path.is_symlink() or not path.is_file():
        return False
    return crypt15.sniff_format(b"", path.name) is None


def _check_names(entries: list[tuple[Path, str]]) -> None:
    """Refuse a folder in which two files would be stored under one name: ``msgstore.db``
    beside ``msgstore.db.crypt15``, a file named like the manifest, a file named like a
    folder."""
    stored: dict[str, str] = {}
    for path, rel in entries:
        if not _imported(path, rel):
            continue
        name = rel[: -len(SUFFIX)] if rel.endswith(SUFFIX) else rel
        if name == MANIFEST:
            raise InvalidArgument(
                f"{rel} would be stored as {MANIFEST}, the name backvault keeps the import's "
                "headers under; rename or remove it"
            )
        if name in stored:
            raise InvalidArgument(
                f"{rel} would be stored as {name}, which {stored[name]} already is; remove "
                "one of them"
            )
        stored[name] = rel
    for name, rel in stored.items():
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in stored:
                raise InvalidArgument(
                    f"{stored[folder]} would be stored as {folder}, the name of the folder "
                    f"that holds {rel}; remove one of them"
                )


def _decrypt_one(
    path: Path, rel: str, target: Path, root_key: bytes
) -> tuple[ImportedFile, crypt15.Header]:
    try:
        with _open_regular(path) as src, _private_output(target) as out:
            result = crypt15.decrypt(src, out, root_key)
            out.flush()
            os.fsync(out.fileno())
    except crypt15.Crypt15Error as exc:
        raise _refused(rel, exc) from None
    except OSError as exc:
        raise WhatsAppFileRefused(f"cannot decrypt {rel}: {exc.strerror}") from None
    done = ImportedFile(
        source=rel,
        stored_as=rel[: -len(SUFFIX)],
        app_version=result.header.app_version,
        payload=result.payload,
        trailer=result.trailer,
        bytes=result.bytes_written,
    )
    return done, result.header


def _open_regular(path: Path) -> Any:
    """``path`` opened for reading if it is a regular file, not through a symlink; a FIFO
    or device put in its place after the walk is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise crypt15.Damaged("is not a regular file")
    return os.fdopen(fd, "rb")


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
    _refuse_symlink(source)
    if not source.exists():
        raise InvalidArgument(f"{source} does not exist")
    found: list[FileInfo] = []
    for path, rel in _entries(source):
        known = rel.endswith(SUFFIX) or crypt15.sniff_format(b"", path.name) is not None
        if source.is_dir() and not known:
            continue
        if path.is_symlink() or not path.is_file():
            found.append(FileInfo(rel, None, f"{rel} is not a regular file (not read)"))
            continue
        try:
            with _open_regular(path) as src:
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
    crypt15 files under ``root_key``, in the layout it was imported from.

    The snapshot is data from whoever holds the master key, so its path and its manifest
    are checked before anything is written (``_snapshot_root``, ``read_manifest``). Every
    file is written into a staging folder of the export's own (mode 0700, a random name
    beside ``target``, in the same parent), each created new (``O_EXCL | O_NOFOLLOW``,
    mode 0600) from descriptors of folders the export made; only when every file is
    written is the staging folder renamed to ``target``. A rename never replaces a
    non-empty folder: nothing that was there is overwritten, and an export that fails
    leaves no part of itself behind."""
    parent, name = _check_target(target)
    snap_name, snap = find_whatsapp_snapshot(repo, ref)
    if len(snap.paths) != 1:
        raise AppError(f"snapshot {snap_name[:8]} does not have the layout of a WhatsApp import")
    with tempfile.TemporaryDirectory(prefix="whatsapp-export-", dir=temp_root) as work:
        restored = Path(work) / "restored"
        result = Restorer(repo, restored).run(snap, snap_name)
        if result.damaged_count:
            path, error = result.damaged[0] if result.damaged else ("", "damaged")
            raise AppError(f"snapshot {snap_name[:8]} could not be restored whole: {path}: {error}")
        root = _snapshot_root(restored, snap.paths[0], snap_name)
        manifest = read_manifest(root)
        if manifest.key_check != key_check(root_key):
            raise WhatsAppKeyMismatch(
                f"the 64-digit key given is not the one snapshot {snap_name[:8]}'s files were "
                "made with; the phone would not open them"
            )
        plan = _plan(root, manifest)
        done = ExportResult(snap_name, str(target))
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent))
        except OSError as exc:
            raise AppError(
                f"cannot make the export's staging folder in {parent}: {exc.strerror}"
            ) from None
        try:
            base = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for out_rel, source, entry in plan:
                    _place(base, out_rel, source, entry, root_key)
                    if entry is None:
                        done.copied += 1
                    else:
                        done.encrypted.append(out_rel)
            finally:
                os.close(base)
            _move_into_place(staging, parent / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return done


def _check_target(target: Path) -> tuple[Path, str]:
    """The target's (resolved) parent folder and its name; refused unless it is missing
    or an empty folder, and not a symlink."""
    absolute = Path(os.path.abspath(target))
    name = absolute.name
    if name in ("", ".", ".."):
        raise InvalidArgument(f"{target} cannot be a target; name a new folder")
    parent = absolute.parent.resolve()
    final = parent / name
    try:
        st = final.lstat()
    except FileNotFoundError:
        return parent, name
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"{target} is a symbolic link; choose a new folder")
    if not stat.S_ISDIR(st.st_mode) or any(final.iterdir()):
        raise InvalidArgument(f"{target} is not an empty folder; choose a new one")
    return parent, name


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename the finished staging folder to ``final``: atomic, and refused by the system
    if ``final`` became anything but a missing name or an empty folder meanwhile."""
    try:
        os.rename(staging, final)
    except OSError as exc:
        raise AppError(
            f"cannot move the export into {final}: {exc.strerror} (it must be missing or an "
            "empty folder on the same file system as its parent); nothing was written"
        ) from None


def _snapshot_root(restored: Path, snap_path: object, snap_name: str) -> Path:
    """The restored WhatsApp folder: the snapshot's path, normalised, inside ``restored``,
    reached through real folders only (no ``..``, no symlink)."""

    def refuse(why: str) -> AppError:
        return AppError(f"snapshot {snap_name[:8]} is not a WhatsApp import: its path {why}")

    if not isinstance(snap_path, str) or not snap_path.startswith("/"):
        raise refuse("is not an absolute path")
    if "\x00" in snap_path or len(snap_path) > PATH_MAX:
        raise refuse("is malformed")
    parts = [part for part in snap_path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refuse("climbs out of its folder (..)")
    if not parts:
        raise refuse("is the root folder")
    root = restored
    for part in parts:
        root = root / part
        try:
            st = root.lstat()
        except OSError:
            raise refuse(f"{snap_path} is not in the snapshot") from None
        if not stat.S_ISDIR(st.st_mode):
            raise refuse(f"{snap_path} does not lead to a folder (a symlink or a file on the way)")
    if not root.resolve().is_relative_to(restored.resolve()):  # belt and braces
        raise refuse("leads outside the restored snapshot")
    return root


# --- the manifest, as a hostile snapshot may write it ---------------------------------

PATH_MAX = 4096
NAME_MAX = 255
MAX_ENTRIES = 100_000
MAX_MANIFEST_BYTES = 64 << 20
PAYLOADS = ("zlib", "zip", "raw")


class DamagedManifest(AppError):
    def __init__(self, why: str) -> None:
        super().__init__(f"the snapshot's WhatsApp manifest is damaged: {why}")


@dataclass(frozen=True)
class ManifestEntry:
    source: str  # the crypt15 file's name, relative to the exported folder
    key_type: int | None
    info: bytes
    payload: str
    trailer: bool


@dataclass(frozen=True)
class Manifest:
    key_check: str
    files: dict[str, ManifestEntry]  # by the decrypted file's name


def safe_relative(rel: object) -> str | None:
    """Why ``rel`` is not a plain relative POSIX path that stays in its folder (no
    ``..``, ``.`` or empty parts, no leading ``/``, no NUL or line break), or None."""
    if not isinstance(rel, str):
        return "not a text"
    if not rel or len(rel.encode("utf-8", "surrogateescape")) > PATH_MAX:
        return "empty or too long"
    if any(char in rel for char in "\x00\n\r"):
        return "holds a NUL or a line break"
    if rel.startswith("/"):
        return "an absolute path"
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            return f"has a part {part!r} (only names are allowed between slashes)"
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            return "has a name longer than 255 bytes"
    if not os.path.normpath(os.path.join("/x", rel)).startswith("/x/"):
        return "leaves its folder"
    return None


def read_manifest(root: Path) -> Manifest:
    """The manifest of the restored folder ``root``, every field checked."""
    try:
        fd = os.open(root / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise AppError(
            f"the snapshot has no readable {MANIFEST}; it was not made by "
            "`backvault import whatsapp`"
        ) from None
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise DamagedManifest("it is not a regular file")
        data = src.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise DamagedManifest(f"it is over {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise DamagedManifest("it is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"version", "key_check", "files"}:
        raise DamagedManifest("it does not hold exactly version, key_check and files")
    if type(doc["version"]) is not int or doc["version"] != 1:
        raise DamagedManifest(f"version {str(doc['version'])[:20]!r}, not 1")
    check = doc["key_check"]
    if not isinstance(check, str) or not re.fullmatch(r"[0-9a-f]{16}", check):
        raise DamagedManifest("key_check is not 16 hex digits")
    files = doc["files"]
    if not isinstance(files, dict) or len(files) > MAX_ENTRIES:
        raise DamagedManifest(f"files is not a mapping of at most {MAX_ENTRIES} entries")
    entries: dict[str, ManifestEntry] = {}
    for stored, entry in files.items():
        entries[stored] = _manifest_entry(stored, entry)
    return Manifest(check, entries)


def _manifest_entry(stored: str, entry: object) -> ManifestEntry:
    why = safe_relative(stored)
    if why is not None or stored == MANIFEST:
        raise DamagedManifest(
            f"a file name {stored[:80]!r} is {why or 'the name of the manifest itself'}"
        )
    shown_name = repr(stored[:80])

    def bad(what: str) -> DamagedManifest:
        return DamagedManifest(f"the entry of {shown_name}: {what}")

    fields = {"source", "key_type", "info", "payload", "trailer"}
    if not isinstance(entry, dict) or set(entry) != fields:
        raise bad(f"does not hold exactly {', '.join(sorted(fields))}")
    source = entry["source"]
    if source != stored + SUFFIX:
        # An import stores NAME.crypt15 as NAME: the crypt15 name is nothing else.
        raise bad(f"source {str(source)[:80]!r} is not {stored + SUFFIX!r}")
    key_type = entry["key_type"]
    if key_type is not None and (
        type(key_type) is not int or key_type not in crypt15.KEY_TYPE_NAMES
    ):
        raise bad(f"key_type {str(key_type)[:20]!r} is none of {sorted(crypt15.KEY_TYPE_NAMES)}")
    info_hex = entry["info"]
    if (
        not isinstance(info_hex, str)
        or len(info_hex) > 2 * crypt15.MAX_HEADER_BYTES
        or not re.fullmatch(r"(?:[0-9a-f]{2})*", info_hex)
    ):
        raise bad("info is not hex digits of a header")
    info = bytes.fromhex(info_hex)
    why = crypt15.check_info(info, 1 if key_type is None else key_type)
    if why is not None:
        raise bad(f"info is not a header's ({why})")
    if entry["payload"] not in PAYLOADS:
        raise bad(f"payload {str(entry['payload'])[:20]!r} is none of {', '.join(PAYLOADS)}")
    if type(entry["trailer"]) is not bool:
        raise bad("trailer is not true or false")
    return ManifestEntry(source, key_type, info, entry["payload"], entry["trailer"])


def _plan(root: Path, manifest: Manifest) -> list[tuple[str, Path, ManifestEntry | None]]:
    """What the export writes: (name in the target, restored file, its manifest entry or
    None for a file copied as it is). Two files for one name, a name that is also a
    folder's, a manifest entry for a file the snapshot does not hold: refused."""
    plan: list[tuple[str, Path, ManifestEntry | None]] = []
    outputs: dict[str, str] = {}
    seen: set[str] = set()
    for source, rel in _entries(root):
        if rel == MANIFEST or source.is_symlink() or not source.is_file():
            continue
        why = safe_relative(rel)
        if why is not None:
            raise DamagedManifest(f"the snapshot holds a file named {rel[:80]!r}, {why}")
        entry = manifest.files.get(rel)
        out_rel = rel if entry is None else entry.source
        if out_rel in outputs:
            raise DamagedManifest(
                f"{outputs[out_rel]!r} and {rel!r} would both be written as {out_rel!r}"
            )
        outputs[out_rel] = rel
        if entry is not None:
            seen.add(rel)
        plan.append((out_rel, source, entry))
    for out_rel in outputs:
        parts = out_rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in outputs:
                raise DamagedManifest(
                    f"{outputs[folder]!r} would be written as {folder!r}, the folder that "
                    f"holds {out_rel!r}"
                )
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise DamagedManifest(f"it names {missing[0][:80]!r}, which the snapshot does not hold")
    return plan


def _open_folder(base: int, parts: list[str]) -> int:
    """A descriptor of folder ``parts`` under the folder ``base``, made (mode 0700) where
    missing, never through a symlink."""
    fd = os.dup(base)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            child = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _place(
    base: int, out_rel: str, source: Path, entry: ManifestEntry | None, root_key: bytes
) -> None:
    """Write ``source`` as ``out_rel`` under the folder ``base`` (as crypt15 if it has a
    manifest ``entry``, else as it is): a new file, mode 0600."""
    *folders, name = out_rel.split("/")
    try:
        folder = _open_folder(base, folders)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            out_fd = os.open(name, flags, 0o600, dir_fd=folder)
        finally:
            os.close(folder)
        src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(src_fd, "rb") as src, os.fdopen(out_fd, "wb") as out:
            if entry is None:
                shutil.copyfileobj(src, out, crypt15.CHUNK)
            else:
                crypt15.encrypt(
                    src,
                    out,
                    root_key,
                    info=entry.info,
                    key_type=1 if entry.key_type is None else entry.key_type,
                    compress=entry.payload == "zlib",
                    trailer=entry.trailer,
                )
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise AppError(f"cannot write {out_rel}: {exc.strerror}; nothing was exported") from None
