"""Sealing at rest: every secret the vault stores is encrypted under a key that never
leaves an HSM (PKCS#11), or — the embedded default — a sealing-key file.

Sealed formats (AES-256-GCM; the purpose names what is sealed and for whom, e.g.
``record:alice:3``, so a blob copied into another row or field does not open):

- format 2, written today: ``0x02 || key version (4 bytes, big-endian) || nonce (12) ||
  ciphertext || tag (16)``, associated data ``the 5 header bytes || purpose``;
- format 1, written before key versions existed and still read:
  ``0x01 || nonce (12) || ciphertext || tag``, associated data ``purpose``, key version 1.

Key versions: a sealer holds every version it finds — key files ``sealing.key`` (version
1), ``sealing.key.v2``, …; HSM keys labelled ``LABEL-v1``, ``LABEL-v2``, … (the bare
``LABEL`` of older deployments is version 1) — and seals under the highest.
``backvault vault rotate-sealing-key`` adds a version and re-seals every sealed column
(sealed_columns.py); a serving node picks the new version up at its next sweep, or at once
when it meets a value sealed under it.

Nonce bound: with random 96-bit nonces one key may seal at most 2^32 values (NIST SP
800-38D, 8.3). Seals are counted per key version (housekeeping.py); rotate well before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .metrics import SEALING_KEY_CURRENT_VERSION, SEALING_OPERATIONS

log = logging.getLogger("backvault.vault.sealing")

FORMAT_UNVERSIONED = 1
FORMAT_VERSIONED = 2
HEADER_SIZE = 5  # format byte + key version
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
# NIST SP 800-38D 8.3: random 96-bit nonces keep the collision chance below 2^-32 only up
# to 2^32 encryptions under one key. The vault warns at half of it.
SEALS_PER_KEY_LIMIT = 2**32
SEALS_PER_KEY_WARNING = 2**31
MAX_KEY_VERSION = 2**32 - 1


class SealingError(Exception):
    """The sealing key is unavailable or unsafe, or a sealed blob does not open."""


class Sealer(Protocol):
    description: str

    @property
    def current_version(self) -> int: ...

    def versions(self) -> list[int]: ...

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes: ...

    def open(self, sealed: bytes, purpose: bytes) -> bytes: ...

    def refresh(self) -> None: ...

    def check(self) -> None: ...

    def create_version(self) -> int: ...

    def destroy_version(self, version: int) -> None: ...

    def take_seal_counts(self) -> dict[int, int]: ...

    def close(self) -> None: ...


def sealed_header(key_version: int) -> bytes:
    """The first bytes of every value sealed under ``key_version`` (format 2)."""
    return bytes([FORMAT_VERSIONED]) + key_version.to_bytes(4, "big")


def key_version_of(sealed: bytes) -> int:
    """The key version a sealed value names (format 1 values: version 1)."""
    return _parse(sealed)[0]


def _parse(sealed: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(key version, nonce, ciphertext || tag, associated-data prefix)."""
    if len(sealed) >= 1 + NONCE_SIZE + TAG_SIZE and sealed[0] == FORMAT_UNVERSIONED:
        return 1, sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :], b""
    if len(sealed) >= HEADER_SIZE + NONCE_SIZE + TAG_SIZE and sealed[0] == FORMAT_VERSIONED:
        header = sealed[:HEADER_SIZE]
        version = int.from_bytes(header[1:], "big")
        if version >= 1:
            body = sealed[HEADER_SIZE + NONCE_SIZE :]
            return version, sealed[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE], body, header
    raise SealingError("sealed data is malformed")


class _VersionedSealer:
    """What every sealer shares: the sealed format, the set of key versions (the highest
    seals), refreshing that set, counting seals per version, metrics."""

    description: str

    def __init__(self) -> None:
        self._keys: dict[int, Any] = {}
        self._refresh_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._seal_counts: dict[int, int] = {}

    # --- what a key store provides --------------------------------------------------------

    def _load_keys(self) -> dict[int, Any]:
        raise NotImplementedError

    def _encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def _create_key(self, version: int) -> None:
        raise NotImplementedError

    def _destroy_key(self, version: int, key: Any) -> None:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------

    @property
    def current_version(self) -> int:
        return max(self._keys)

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def refresh(self) -> None:
        """Reload the key versions from the key store (a rotation may have added one, or
        destroyed an old one)."""
        with self._refresh_lock:
            keys = self._load_keys()
            if not keys:
                raise SealingError(f"no sealing key found ({self.description})")
            if self._keys and max(keys) != max(self._keys):
                log.info("sealing key version changed", extra={"key_version": max(keys)})
            self._keys = keys
        SEALING_KEY_CURRENT_VERSION.set(max(keys))

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        for attempt in range(2):
            keys = self._keys
            version = max(keys)
            header = sealed_header(version)
            nonce = secrets.token_bytes(NONCE_SIZE)
            try:
                body = self._encrypt(keys[version], nonce, plaintext, header + purpose)
            except SealingError:
                # A key destroyed or replaced by another process: look again, once.
                if attempt == 0 and self._reloaded_newer(version):
                    continue
                SEALING_OPERATIONS.labels(operation="seal", outcome="error").inc()
                raise
            SEALING_OPERATIONS.labels(operation="seal", outcome="ok").inc()
            with self._counts_lock:
                self._seal_counts[version] = self._seal_counts.get(version, 0) + 1
            return header + nonce + body
        raise AssertionError("unreachable")  # pragma: no cover

    def _reloaded_newer(self, version: int) -> bool:
        try:
            self.refresh()
        except SealingError:
            return False
        return self.current_version != version

    def open(self, sealed: bytes, purpose: bytes) -> bytes:
        try:
            version, nonce, body, aad_prefix = _parse(sealed)
            key = self._keys.get(version)
            if key is None:
                self.refresh()  # sealed under a version created since this node started
                key = self._keys.get(version)
            if key is None:
                raise SealingError(
                    f"sealed under key version {version}, which this vault does not hold "
                    "(destroyed, or not yet copied to this node's key store)"
                )
            plaintext = self._decrypt(key, nonce, body, aad_prefix + purpose)
        except SealingError:
            SEALING_OPERATIONS.labels(operation="open", outcome="error").inc()
            raise
        SEALING_OPERATIONS.labels(operation="open", outcome="ok").inc()
        return plaintext

    def create_version(self) -> int:
        """Add a key version, which then seals everything new; returns its number."""
        with self._refresh_lock:
            existing = self._load_keys()
            version = max(existing, default=0) + 1
            if version > MAX_KEY_VERSION:
                raise SealingError("no key version is left")
            self._create_key(version)
        self.refresh()
        return version

    def destroy_version(self, version: int) -> None:
        """Destroy an old key version for good. Check first that nothing is sealed under
        it (sealed_columns.usage): values still sealed under it will never open again."""
        self.refresh()
        if version == self.current_version:
            raise SealingError(
                f"key version {version} is the current sealing key; rotate first "
                "(`backvault vault rotate-sealing-key`)"
            )
        key = self._keys.get(version)
        if key is None:
            raise SealingError(f"there is no sealing key version {version}")
        self._destroy_key(version, key)
        self.refresh()

    def take_seal_counts(self) -> dict[int, int]:
        """Seals per key version since the last call (for the durable count)."""
        with self._counts_lock:
            counts, self._seal_counts = self._seal_counts, {}
        return counts

    def check(self) -> None:
        """Cheap liveness, without a seal: the key is reachable."""

    def close(self) -> None:
        pass


def make_private_dir(path: Path) -> str | None:
    """Create ``path`` as 0700, or tighten an existing one; says what it changed."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        return f"{path} was mode {mode:04o}; now {mode & 0o700:04o}"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSealer(_VersionedSealer):
    """AES-256-GCM under 32-byte keys kept in files (mode 0600): ``PATH`` is key version
    1, ``PATH.v2``, ``PATH.v3``, … the later ones.

    For a single self-hosted node. Keep the files off the database's folder and out of its
    backups: whoever holds both can open the records.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.description = f"sealing-key file {self.path}"
        self.created = False
        if not self._version_files():
            if not create:
                raise SealingError(f"the sealing key file {self.path} does not exist")
            make_private_dir(self.path.parent)
            self._write_new_key(self.path)
            self.created = True
        self.refresh()

    def version_path(self, version: int) -> Path:
        return self.path if version == 1 else self.path.with_name(f"{self.path.name}.v{version}")

    def _version_files(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        if self.path.exists():
            found[1] = self.path
        if self.path.parent.is_dir():
            prefix = self.path.name + ".v"
            for candidate in self.path.parent.iterdir():
                suffix = candidate.name.removeprefix(prefix)
                if candidate.name.startswith(prefix) and suffix.isdigit() and int(suffix) >= 2:
                    found[int(suffix)] = candidate
        return found

    def _load_keys(self) -> dict[int, Any]:
        keys: dict[int, Any] = {}
        for version, path in self._version_files().items():
            try:
                key = path.read_bytes()
                mode = path.stat().st_mode
            except FileNotFoundError:
                continue  # destroyed while we looked
            if len(key) != KEY_SIZE:
                raise SealingError(f"the sealing key file {path} must hold exactly 32 bytes")
            if mode & 0o077:
                raise SealingError(
                    f"the sealing key file {path} is readable by others; chmod 600 it"
                )
            keys[version] = AESGCM(key)
        return keys

    def _write_new_key(self, path: Path) -> None:
        # Written under a temporary name, then linked into place: a reader never sees a
        # half-written key, and two rotations cannot overwrite each other's key.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(KEY_SIZE))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise SealingError(
                    f"{path} already exists (another rotation is running?)"
                ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        _fsync_dir(path.parent)

    def _encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return bytes(key.encrypt(nonce, plaintext, aad))

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        try:
            return bytes(key.decrypt(nonce, body, aad))
        except InvalidTag as exc:
            raise SealingError("sealed data does not open (wrong key, or altered)") from exc

    def _create_key(self, version: int) -> None:
        self._write_new_key(self.version_path(version))

    def _destroy_key(self, version: int, key: Any) -> None:
        # Overwrite before unlinking, so the key's blocks do not simply become free space.
        # (Copy-on-write filesystems, SSD wear levelling and backups may still keep copies:
        # see the operator guide.)
        path = self._version_files()[version]
        with open(path, "r+b") as handle:
            handle.write(bytes(KEY_SIZE))
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()
        _fsync_dir(path.parent)


# Opening a token is retried this many times on a transient GeneralError.
_OPEN_ATTEMPTS = 6

# What a sealing key in an HSM must be: usable only to encrypt and decrypt, never to wrap
# or unwrap other keys, sign, verify or derive; its attributes frozen; its value never
# readable or exportable; kept in the token.
SAFE_KEY_ATTRIBUTES: tuple[tuple[str, bool], ...] = (
    ("ENCRYPT", True),
    ("DECRYPT", True),
    ("WRAP", False),
    ("UNWRAP", False),
    ("SIGN", False),
    ("VERIFY", False),
    ("DERIVE", False),
    ("MODIFIABLE", False),
    ("SENSITIVE", True),
    ("EXTRACTABLE", False),
    ("TOKEN", True),
)
# Attributes that tell a key's history: false means it was once readable or exportable
# (an imported or unwrapped copy). Worth a warning, not a refusal: HSM cloning procedures
# that unwrap a key onto another appliance clear them.
HISTORY_ATTRIBUTES = ("ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE")


class Pkcs11Sealer(_VersionedSealer):
    """AES-256-GCM inside an HSM over PKCS#11: the key is generated in the token with only
    encrypt/decrypt allowed, sensitive, not extractable and not modifiable (checked on
    every load), and every seal/open is a call into the token.

    python-pkcs11 initialises the library without OS locking, so calls into the token are
    serialised here with one lock (a seal or open takes about 0.2 ms on SoftHSM2).
    """

    def __init__(
        self,
        module: str,
        token_label: str,
        pin: str,
        key_label: str = "backvault-sealing",
        create: bool = True,
        accept_weak_keys: bool = False,
    ) -> None:
        super().__init__()
        import pkcs11

        self._pkcs11 = pkcs11
        self._lock = threading.Lock()
        self.key_label = key_label
        self.accept_weak_keys = accept_weak_keys
        self._warned: set[tuple[int, str]] = set()
        self.description = f"PKCS#11 token {token_label!r} ({module}), key {key_label!r}"
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                lib = pkcs11.lib(module)
                token = lib.get_token(token_label=token_label)
                try:
                    self._session: Any = token.open(user_pin=pin, rw=True)
                except pkcs11.UserAlreadyLoggedIn:
                    # PKCS#11 logs in per process: another session here already did.
                    self._session = token.open(rw=True)
                break
            except pkcs11.exceptions.GeneralError as exc:
                # Transient: SoftHSM2 answers this while another process (a second vault
                # node starting) rewrites the token's files; network HSMs while busy.
                if attempt + 1 == _OPEN_ATTEMPTS:
                    raise SealingError(
                        f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
                    ) from exc
                time.sleep(0.1 * (attempt + 1))
            except (pkcs11.PinIncorrect, pkcs11.PinLenRange) as exc:
                raise SealingError(
                    f"cannot log in to the HSM token {token_label!r}: {exc!r}"
                ) from exc
            except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
                raise SealingError(
                    f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
                ) from exc
        try:
            if not self._find_keys():
                if not create:
                    raise SealingError(
                        f"the HSM token has no key labelled {key_label!r} or "
                        f"{key_label + '-v1'!r}; create it once with `backvault vault init-hsm`"
                    )
                self._create_key(1)
            self.refresh()
        except BaseException:
            self.close()
            raise

    def label_of(self, version: int) -> str:
        return f"{self.key_label}-v{version}"

    def _version_of(self, label: str) -> int | None:
        if label == self.key_label:
            return 1  # created before key versions existed
        suffix = label.removeprefix(self.key_label + "-v")
        if label.startswith(self.key_label + "-v") and suffix.isdigit() and int(suffix) >= 1:
            return int(suffix)
        return None

    def _find_keys(self) -> dict[int, Any]:
        from pkcs11 import Attribute, KeyType, ObjectClass

        found: dict[int, tuple[str, Any]] = {}
        try:
            with self._lock:
                candidates = [
                    (str(obj[Attribute.LABEL]), obj)
                    for obj in self._session.get_objects(
                        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
                    )
                ]
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"cannot list the HSM token's keys: {exc!r}") from exc
        for label, obj in candidates:
            version = self._version_of(label)
            if version is None:
                continue
            if version in found:
                raise SealingError(
                    f"the HSM token has two keys for sealing key version {version} "
                    f"({found[version][0]!r} and {label!r}); destroy the one you did not "
                    "make with backvault"
                )
            found[version] = (label, obj)
        return {version: obj for version, (_label, obj) in found.items()}

    def _load_keys(self) -> dict[int, Any]:
        keys = self._find_keys()
        if keys:
            newest = max(keys)
            for version, key in keys.items():
                self._check_attributes(version, key, strict=version == newest)
        return keys

    def _check_attributes(self, version: int, key: Any, strict: bool) -> None:
        from pkcs11 import Attribute

        with self._lock:
            try:
                values = {name: key[getattr(Attribute, name)] for name, _ in SAFE_KEY_ATTRIBUTES}
                history = {name: key[getattr(Attribute, name)] for name in HISTORY_ATTRIBUTES}
            except self._pkcs11.PKCS11Error as exc:
                raise SealingError(
                    f"cannot read the attributes of HSM sealing key version {version}: {exc!r}"
                ) from exc
        for name, wanted in SAFE_KEY_ATTRIBUTES:
            if bool(values[name]) == wanted:
                continue
            problem = (
                f"the HSM sealing key version {version} has CKA_{name}={str(bool(values[name])).lower()}; "
                f"a sealing key must have CKA_{name}={str(wanted).lower()}"
            )
            if strict and not self.accept_weak_keys:
                raise SealingError(
                    f"{problem}. Make a new key version with safe attributes and move every "
                    "value to it: `backvault vault rotate-sealing-key` (see the operator guide)"
                )
            self._warn_once(version, name, problem + "; destroy this version once nothing uses it")
        for name, value in history.items():
            if not value:
                self._warn_once(
                    version,
                    name,
                    f"the HSM sealing key version {version} has CKA_{name}=false: it was "
                    "readable or exportable at some point (imported or unwrapped)",
                )

    def _warn_once(self, version: int, attribute: str, message: str) -> None:
        if (version, attribute) not in self._warned:
            self._warned.add((version, attribute))
            log.warning(message)

    def _create_key(self, version: int) -> None:
        from pkcs11 import Attribute, KeyType, MechanismFlag

        template = {getattr(Attribute, name): wanted for name, wanted in SAFE_KEY_ATTRIBUTES}
        template[Attribute.PRIVATE] = True
        try:
            with self._lock:
                self._session.generate_key(
                    KeyType.AES,
                    256,
                    label=self.label_of(version),
                    store=True,
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template=template,
                )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"the HSM refused to create a sealing key: {exc!r}") from exc

    def _destroy_key(self, version: int, key: Any) -> None:
        try:
            with self._lock:
                key.destroy()
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"the HSM refused to destroy key version {version}: {exc!r}"
            ) from exc

    def _encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams, Mechanism

        try:
            with self._lock:
                return bytes(
                    key.encrypt(
                        plaintext,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"the HSM refused to seal: {exc!r}") from exc

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams, Mechanism

        try:
            with self._lock:
                return bytes(
                    key.decrypt(
                        body,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"sealed data does not open (wrong key, or altered): {exc!r}"
            ) from exc

    def check(self) -> None:
        """Reads the current key's label: proves the session is logged in and the key
        handle valid, without spending a GCM nonce or an encryption in the HSM."""
        from pkcs11 import Attribute

        key = self._keys[self.current_version]
        try:
            with self._lock:
                _ = key[Attribute.LABEL]
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"the HSM session or key is gone: {exc!r}") from exc

    def close(self) -> None:
        session = getattr(self, "_session", None)
        with self._lock, contextlib.suppress(Exception):  # a dead session needs no closing
            if session is not None:
                session.close()
