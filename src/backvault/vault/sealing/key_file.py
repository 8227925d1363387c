"""Sealing keys in files (the embedded default): ``PATH`` is key version 1, ``PATH.v2``, …
the later ones, each 32 bytes, mode 0600."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backvault.hardening.private_files import make_private_dir, wipe_file, write_private_file
from backvault.vault.sealing.formats import KEY_SIZE, SealingError, is_number
from backvault.vault.sealing.versioned import VersionedSealer
from backvault.vault.sealing.versions import VersionRecords


@dataclass(frozen=True)
class _FileKey:
    path: Path
    aead: AESGCM = dataclass_field(repr=False)


class FileSealer(VersionedSealer):
    """AES-256-GCM under 32-byte keys kept in files (mode 0600): ``PATH`` is key version
    1, ``PATH.v2``, ``PATH.v3``, … the later ones.

    For a single self-hosted node. Keep the files off the database's folder and out of its
    backups: whoever holds both can open the records.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        create: bool = True,
        records: VersionRecords | None = None,
    ) -> None:
        super().__init__(records)
        self.path = Path(path)
        self.description = f"sealing-key file {self.path}"
        self.no_key_message = f"the sealing key file {self.path} does not exist"
        self._start(create)

    def version_path(self, version: int) -> Path:
        return self.path if version == 1 else self.path.with_name(f"{self.path.name}.v{version}")

    def _stored(self) -> dict[int, list[Any]]:
        found: dict[int, list[Any]] = {}
        if self.path.exists():
            found[1] = [self.path]
        if self.path.parent.is_dir():
            prefix = self.path.name + ".v"
            for candidate in self.path.parent.iterdir():
                suffix = candidate.name.removeprefix(prefix)
                if candidate.name.startswith(prefix) and is_number(suffix) and int(suffix) >= 2:
                    found[int(suffix)] = [candidate]
        return found

    def _where(self, candidate: Any) -> str:
        return str(candidate)

    def _usable(self, version: int, candidate: Any) -> Any:
        path = Path(candidate)
        try:
            key = path.read_bytes()
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise SealingError(f"the sealing key file {path} disappeared") from None
        if len(key) != KEY_SIZE:
            raise SealingError(f"the sealing key file {path} must hold exactly 32 bytes")
        if mode & 0o077:
            raise SealingError(f"the sealing key file {path} is readable by others; chmod 600 it")
        return _FileKey(path, AESGCM(key))

    def _write_new_key(self, path: Path) -> None:
        # Atomic and never replacing: two rotations cannot overwrite each other's key.
        try:
            write_private_file(path, secrets.token_bytes(KEY_SIZE), exclusive=True)
        except FileExistsError:
            raise SealingError(f"{path} already exists (another rotation is running?)") from None

    def _encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return bytes(key.aead.encrypt(nonce, plaintext, aad))

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        try:
            return bytes(key.aead.decrypt(nonce, body, aad))
        except InvalidTag as exc:
            raise SealingError("sealed data does not open (wrong key, or altered)") from exc

    def _create_key(self, version: int) -> Any:
        path = self.version_path(version)
        make_private_dir(path.parent)
        self._write_new_key(path)
        return self._usable(version, path)

    def _destroy_key(self, version: int, key: Any) -> None:
        wipe_file(key.path, best_effort=False)
