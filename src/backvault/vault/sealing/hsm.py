"""Sealing keys inside an HSM, over PKCS#11: made in the token, usable only to encrypt and
decrypt with AES-GCM, never readable; every seal and open is a call into the token."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from backvault.vault.retry import retry
from backvault.vault.sealing.formats import SealingError, is_number
from backvault.vault.sealing.versioned import VersionedSealer
from backvault.vault.sealing.versions import VersionRecords

log = logging.getLogger("backvault.vault.sealing")

# A sealing key is AES-256; an AES key of another length labelled as a version is
# reported, never used.
SEALING_KEY_BYTES = 32
_OTHER_AES_KEY_BYTES = (16, 24)
# How many versions past the highest in use are also looked for by label.
_LABEL_LOOKAHEAD = 8

# Opening a token is retried this many times on a transient GeneralError or NoSuchToken.
_OPEN_ATTEMPTS = 14

# What a sealing key in an HSM must be: usable only to encrypt and decrypt, never to wrap
# or unwrap other keys, sign, verify or derive; its attributes frozen; its value never
# readable or exportable; kept in the token, and usable only in a session logged in with
# the PIN (CKA_PRIVATE: a public key object is usable by anyone who can open a session).
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
    ("PRIVATE", True),
)
# Attributes that tell a key's history: false means its value was readable or exportable
# at some point — an imported key (whose value someone typed in) or an unwrapped copy.
# The key that seals must have both true, unless the operator accepts cloned keys
# (pkcs11_accept_cloned_keys: HSM cloning procedures that unwrap a key onto another
# appliance clear them); older versions, which only open, are warned about.
# CKA_LOCAL tells the same of how the key was made: true only for a key generated in the
# token (C_GenerateKey); false for one imported, unwrapped or derived — a key derived
# from a base key someone kept (public, with CKA_DERIVE) can be derived again, readable,
# without the PIN.
HISTORY_ATTRIBUTES = ("ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "LOCAL")
# The one mechanism the vault uses a sealing key with. Keys the vault makes are limited to
# it (CKA_ALLOWED_MECHANISMS, PKCS#11 2.40; the token refuses every other mechanism, such
# as CKM_AES_ECB, which would make the key a raw block-cipher oracle for any PIN holder).
# A current key that allows another mechanism is refused; one that allows every mechanism
# (an empty list: keys made before the vault set it) is warned about.
ALLOWED_MECHANISMS_NAME = "ALLOWED_MECHANISMS"


def pkcs11_attribute_mapper() -> Any:
    """python-pkcs11's attribute mapper, taught CKA_ALLOWED_MECHANISMS (an array of
    CK_MECHANISM_TYPE, which it does not handle by itself)."""
    import struct

    from pkcs11 import Attribute, Mechanism
    from pkcs11.attributes import AttributeMapper

    known = {int(mechanism) for mechanism in Mechanism}
    size = struct.calcsize("L")

    def pack(mechanisms: Any) -> bytes:
        return b"".join(struct.pack("L", int(mechanism)) for mechanism in mechanisms)

    def unpack(raw: bytes) -> list[Any]:
        return [
            Mechanism(value) if value in known else value
            for (value,) in struct.iter_unpack("L", raw[: len(raw) - len(raw) % size])
        ]

    mapper = AttributeMapper()
    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, pack, unpack)
    return mapper


class Pkcs11Sealer(VersionedSealer):
    """AES-256-GCM inside an HSM over PKCS#11: the key is generated in the token with only
    encrypt/decrypt allowed, sensitive, not extractable, not modifiable, private and not
    copyable (checked on every load), and every seal/open is a call into the token.

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
        accept_cloned_keys: bool = False,
        records: VersionRecords | None = None,
    ) -> None:
        super().__init__(records)
        import pkcs11

        self._pkcs11 = pkcs11
        self._lock = threading.Lock()
        self.key_label = key_label
        self.accept_weak_keys = accept_weak_keys
        self.accept_cloned_keys = accept_cloned_keys
        self._warned: set[tuple[int, str]] = set()
        self.description = f"PKCS#11 token {token_label!r} ({module}), key {key_label!r}"
        self.no_key_message = (
            f"the HSM token has no key labelled {key_label!r} or {key_label + '-v1'!r}; "
            "create it once with `backvault vault init-hsm`"
        )
        transient = (pkcs11.exceptions.GeneralError, pkcs11.exceptions.NoSuchToken)

        tries = 0

        def open_session() -> Any:
            nonlocal tries
            library = pkcs11.lib(module)
            if tries:
                # SoftHSM2 reads its list of tokens when the library is initialised: one
                # caught mid-rewrite stays missing until the library reads it again.
                library.reinitialize()
            tries += 1
            token = library.get_token(token_label=token_label)
            mapper = pkcs11_attribute_mapper()
            try:
                return token.open(user_pin=pin, rw=True, attribute_mapper=mapper)
            except pkcs11.UserAlreadyLoggedIn:
                # PKCS#11 logs in per process: another session here already did.
                return token.open(rw=True, attribute_mapper=mapper)

        try:
            # Transient: SoftHSM2 answers GeneralError or NoSuchToken while another process
            # (a second vault node starting) rewrites the token's files; network HSMs while
            # busy. A token that is really missing is reported after the last attempt (~9 s;
            # 1.5 s was not enough for three nodes starting at once on a loaded machine).
            self._session: Any = retry(
                open_session, attempts=_OPEN_ATTEMPTS, on=transient, pause=0.1
            )
        except transient as exc:
            raise SealingError(
                f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
            ) from exc
        except (pkcs11.PinIncorrect, pkcs11.PinLenRange) as exc:
            raise SealingError(f"cannot log in to the HSM token {token_label!r}: {exc!r}") from exc
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
            raise SealingError(
                f"cannot reach the HSM token {token_label!r} through {module}: {exc!r}"
            ) from exc
        try:
            self._start(create)
        except BaseException:
            self.close()
            raise

    def label_of(self, version: int) -> str:
        return f"{self.key_label}-v{version}"

    def _version_of(self, label: str) -> int | None:
        if label == self.key_label:
            return 1  # created before key versions existed
        suffix = label.removeprefix(self.key_label + "-v")
        if label.startswith(self.key_label + "-v") and is_number(suffix) and int(suffix) >= 1:
            return int(suffix)
        return None

    def _stored(self) -> dict[int, list[Any]]:
        from pkcs11 import Attribute

        # Only AES-256 keys: a sealing key is one, and CKA_VALUE_LEN is what keeps this
        # search off keys another process is still making. SoftHSM2 (2.6.1) writes a new
        # key's attributes one file write at a time, CKA_VALUE_LEN=0 last, before the key's
        # template sets its length; reading an attribute of a key caught part-way makes the
        # reading process write defaults for the attributes it lacks, from its stale copy,
        # over the maker's — a key made by a rotation (or planted by a test) while a node
        # listed keys came out broken for every process: not found, FunctionFailed,
        # MechanismInvalid. A key whose length is set has every attribute.
        found: dict[int, list[Any]] = {}
        handles: set[int] = set()

        def add(label: str, obj: Any) -> None:
            version = self._version_of(label)
            if version is not None and obj.handle not in handles:
                handles.add(obj.handle)
                found.setdefault(version, []).append((label, obj))

        for label, obj, _length in self._aes_keys(Attribute.VALUE_LEN, SEALING_KEY_BYTES):
            add(label, obj)
        # And, by their exact labels, keys of the versions this vault may mean, whatever
        # length they state: a copy unwrapped onto a token without naming its length
        # (an HSM's cloning procedure; SoftHSM2 then stores CKA_VALUE_LEN 0) is still
        # that version's key, and a key planted under the next numbers is still seen. A
        # key has its label only once every attribute is written: safe to read too.
        for wanted in self._labels_to_look_up():
            for label, obj, length in self._aes_keys(Attribute.LABEL, wanted):
                if length not in _OTHER_AES_KEY_BYTES:  # those are ``_misfits``
                    add(label, obj)
        return found

    def _labels_to_look_up(self) -> list[str]:
        """The labels of the versions up to a few past the highest this sealer uses or
        stored values name (not what the database claims: a planted record of version
        2^32 - 1 would make that millions of searches), and the label from before key
        versions."""
        highest = max([*self._keys, *self._in_use, 0])
        versions = range(1, highest + _LABEL_LOOKAHEAD + 1)
        return [self.key_label, *(self.label_of(version) for version in versions)]

    def _misfits(self) -> list[tuple[int, str]]:
        from pkcs11 import Attribute

        # AES keys of the other lengths (searched by length, for the reason above).
        return [
            (version, self._where((label, obj)))
            for length in _OTHER_AES_KEY_BYTES
            for label, obj, _length in self._aes_keys(Attribute.VALUE_LEN, length)
            if (version := self._version_of(label)) is not None
        ]

    def _aes_keys(self, attribute: Any, value: Any) -> list[tuple[str, Any, int]]:
        """The token's AES keys whose ``attribute`` is ``value`` (searched by length or
        by exact label only: see ``_stored``), with their labels and stated lengths."""
        from pkcs11 import Attribute, KeyType, ObjectClass

        template = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            attribute: value,
        }
        try:
            with self._lock:
                return [
                    (str(obj[Attribute.LABEL]), obj, int(obj[Attribute.VALUE_LEN]))
                    for obj in self._session.get_objects(template)
                ]
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"cannot list the HSM token's keys: {exc!r}") from exc

    def _where(self, candidate: Any) -> str:
        return f"labelled {candidate[0]!r}"

    def _usable(self, version: int, candidate: Any) -> Any:
        return candidate[1]

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
            if value:
                continue
            if name == "LOCAL":
                problem = (
                    f"the HSM sealing key version {version} has CKA_LOCAL=false: it was not "
                    "generated in the token but imported, unwrapped or derived, so someone may "
                    "know its value or be able to make it again"
                )
            else:
                problem = (
                    f"the HSM sealing key version {version} has CKA_{name}=false: its value "
                    "was readable or exportable at some point (an imported key, or an "
                    "unwrapped copy), so someone may know it"
                )
            if strict and not (self.accept_cloned_keys or self.accept_weak_keys):
                raise SealingError(
                    f"{problem}. Make a new key version inside the HSM and move every value "
                    "to it: `backvault vault rotate-sealing-key`; or, if your HSM's cloning "
                    "procedure cleared this flag on a copy of the vault's own key, set "
                    "pkcs11_accept_cloned_keys = true (see the operator guide)"
                )
            self._warn_once(version, name, problem)
        self._check_mechanisms(version, key, strict)

    def _allowed_mechanisms(self, version: int, key: Any) -> list[Any] | None:
        """The key's CKA_ALLOWED_MECHANISMS (empty: every mechanism), or None when the
        token does not know the attribute."""
        from pkcs11 import Attribute

        try:
            with self._lock:
                return list(key[Attribute.ALLOWED_MECHANISMS])
        except (self._pkcs11.AttributeTypeInvalid, self._pkcs11.AttributeSensitive):
            return None
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"cannot read the allowed mechanisms of HSM sealing key version {version}: {exc!r}"
            ) from exc

    def _check_mechanisms(self, version: int, key: Any, strict: bool) -> None:
        from pkcs11 import Mechanism

        allowed = self._allowed_mechanisms(version, key)
        if allowed is None:
            return  # a token without CKA_ALLOWED_MECHANISMS: nothing to check
        if not allowed:
            self._warn_once(
                version,
                ALLOWED_MECHANISMS_NAME,
                f"the HSM sealing key version {version} may be used with any mechanism "
                "(CKA_ALLOWED_MECHANISMS is empty), not only CKM_AES_GCM: keys the vault "
                "makes now are limited to it; move to one with `backvault vault "
                "rotate-sealing-key`",
            )
            return
        others = [m for m in allowed if m != Mechanism.AES_GCM]
        if not others:
            return
        names = ", ".join(
            f"CKM_{m.name}" if isinstance(m, Mechanism) else f"0x{int(m):x}" for m in others
        )
        problem = (
            f"the HSM sealing key version {version} allows mechanisms other than "
            f"CKM_AES_GCM ({names}) in CKA_ALLOWED_MECHANISMS"
        )
        if strict and not self.accept_weak_keys:
            raise SealingError(
                f"{problem}. Make a new key version with `backvault vault rotate-sealing-key` "
                "(the vault limits the keys it makes to CKM_AES_GCM) and move every value to it"
            )
        self._warn_once(version, ALLOWED_MECHANISMS_NAME, problem)

    def _warn_once(self, version: int, attribute: str, message: str) -> None:
        if (version, attribute) not in self._warned:
            self._warned.add((version, attribute))
            log.warning(message)

    def _create_key(self, version: int) -> Any:
        from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag

        template = {getattr(Attribute, name): wanted for name, wanted in SAFE_KEY_ATTRIBUTES}
        # Not even a PIN holder may copy the key (a copy could be made public, or given
        # other uses), nor use it with another mechanism than AES-GCM. PKCS#11 2.40; a
        # token that does not know an attribute goes without it.
        copyable = {Attribute.COPYABLE: False}
        mechanisms = {Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_GCM]}
        attempts = [
            {**template, **copyable, **mechanisms},
            {**template, **mechanisms},
            {**template, **copyable},
            template,
        ]
        for index, attempt in enumerate(attempts):
            try:
                with self._lock:
                    return self._session.generate_key(
                        KeyType.AES,
                        SEALING_KEY_BYTES * 8,
                        label=self.label_of(version),
                        store=True,
                        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                        template=attempt,
                    )
            except self._pkcs11.AttributeTypeInvalid:
                if index + 1 == len(attempts):
                    raise SealingError(
                        "the HSM refused to create a sealing key: it does not know one of "
                        "the attributes a sealing key needs"
                    ) from None
            except self._pkcs11.PKCS11Error as exc:
                raise SealingError(f"the HSM refused to create a sealing key: {exc!r}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

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
            return self._transient_retried(
                lambda: bytes(
                    key.encrypt(
                        plaintext,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
            )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(f"the HSM refused to seal: {exc!r}") from exc

    def _transient_retried(self, call: Callable[[], bytes]) -> bytes:
        """``call`` in the token, tried again on CKR_GENERAL_ERROR: SoftHSM2 answers it now
        and then while another process (a node, a rotation) rewrites the token's files.
        (A retried seal reuses its nonce for the same plaintext and associated data: the
        same ciphertext, nothing revealed.)"""

        def locked() -> bytes:
            with self._lock:
                return call()

        return retry(locked, attempts=3, on=self._pkcs11.exceptions.GeneralError, pause=0.05)

    def _decrypt(self, key: Any, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        from pkcs11.mechanisms import GCMParams, Mechanism

        try:
            return self._transient_retried(
                lambda: bytes(
                    key.decrypt(
                        body,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
            )
        except self._pkcs11.PKCS11Error as exc:
            raise SealingError(
                f"sealed data does not open (wrong key, or altered): {exc!r}"
            ) from exc

    def _check_reachable(self) -> None:
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
