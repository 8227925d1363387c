"""Key files (restic's ``keys/``): each holds the master key, sealed with one secret.

A key file's clear names (user, host) are the same neutral ones in every key file: what
a slot is (recovery key, password, device) is in its label, sealed with the master key,
so the storage provider reads no user, device, vault or account.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from backvault.crypto.aead import Key
from backvault.crypto.keyfile import KeyFile, KeyFileError, WrongSecret
from backvault.crypto.slotlabel import OTHER, SlotLabel
from backvault.repo import format as fmt
from backvault.repo.errors import DamagedObject, WrongKey
from backvault.repo.timefmt import format_ns, now_ns
from backvault.storage import Backend, FileType, ObjectNotFound


@dataclass(frozen=True)
class KeySlot:
    """A key file as listed: its id, its clear names, what it is (its label, read with the
    master key; None for a key file restic made), and whether it opened this session."""

    id: str
    username: str
    hostname: str
    created: str
    current: bool
    label: SlotLabel | None = None


def open_master_key(backend: Backend, secret_candidates: Iterable[bytes]) -> tuple[Key, str]:
    """The master key, and the name of the first key file one of the secrets opens."""
    candidates = list(secret_candidates)
    key_files = list(backend.list(FileType.KEY))
    if not key_files:
        raise DamagedObject("keys/", "the repository has no key files")
    for name, _ in key_files:
        try:
            key_file = KeyFile.from_bytes(backend.load(FileType.KEY, name))
        except (KeyFileError, ObjectNotFound):
            continue
        for secret in candidates:
            try:
                master = key_file.open(secret)
            except WrongSecret:
                continue
            except KeyFileError as exc:
                raise DamagedObject(f"keys/{name}", str(exc)) from exc
            return master, name
    raise WrongKey("this key does not open this repository")


def add_key(backend: Backend, master: Key, secret: bytes, label: SlotLabel | None = None) -> str:
    """A new key file for ``secret``; what it is goes into its sealed label."""
    key_file = KeyFile.create(
        master, secret, created=format_ns(now_ns()), label=label or SlotLabel(OTHER)
    )
    return save_key_file(backend, key_file)


def save_key_file(backend: Backend, key_file: KeyFile) -> str:
    raw = key_file.to_bytes()
    name = fmt.sha256(raw).hex()
    backend.save(FileType.KEY, name, raw)
    return name


def key_files(backend: Backend) -> list[tuple[str, KeyFile]]:
    """Every key file that parses, by name."""
    found = []
    for name, _ in backend.list(FileType.KEY):
        try:
            found.append((name, KeyFile.from_bytes(backend.load(FileType.KEY, name))))
        except (KeyFileError, ObjectNotFound):
            continue
    return found


def list_slots(backend: Backend, master: Key, current: str | None) -> list[KeySlot]:
    """Every key slot, oldest first; ``current`` is the one that opened this session."""
    slots = [
        KeySlot(
            name,
            key_file.username,
            key_file.hostname,
            key_file.created,
            name == current,
            key_file.read_label(master),
        )
        for name, key_file in key_files(backend)
    ]
    return sorted(slots, key=lambda s: s.created)


def relabel_legacy(backend: Backend, master: Key) -> list[tuple[str, str]]:
    """Give key files an earlier version wrote (kind, account and vault in clear) neutral
    names and a sealed label; the slots open as before. Returns (old id, new id) pairs.

    The new file is saved before the old one is removed: an interruption leaves two
    files for one slot, never none."""
    moved = []
    for name, key_file in key_files(backend):
        if key_file.label:
            continue
        label = key_file.read_label(master)
        if label is None:
            continue  # a key file restic made: its names are its owner's choice
        new_name = save_key_file(backend, key_file.relabelled(master, label))
        backend.remove(FileType.KEY, name)
        moved.append((name, new_name))
    return moved
