"""Sealing at rest: every secret the vault stores is encrypted under a key that never
leaves an HSM (PKCS#11), or — the embedded default — a sealing-key file.

Sealed formats (AES-256-GCM; the purpose names what is sealed and for whom, e.g.
``record:alice:3``, so a blob copied into another row or field does not open):

- format 2, written today: ``0x02 || key version (4 bytes, big-endian) || nonce (12) ||
  ciphertext || tag (16)``, associated data ``the 5 header bytes || purpose``;
- format 1, written before key versions existed and still read:
  ``0x01 || nonce (12) || ciphertext || tag``, associated data ``purpose``, key version 1.

Key versions: key files ``sealing.key`` (version 1), ``sealing.key.v2``, …; HSM keys
labelled ``LABEL-v1``, ``LABEL-v2``, … (the bare ``LABEL`` of older deployments is version
1). A label or a file name proves nothing (anyone with the HSM PIN for a moment, or write
access to the key folder, can add one), so the vault records every version it makes — with
the key's check value, which only the key's holder can compute — in its database
(key_versions.py), and a sealer uses only the keys whose version is recorded and whose
check value matches — and whose record is vouched for by the key of a lower version it
already trusts (VOUCH_CONTEXT), since a record proves nothing either to someone who can
write to the database; it seals under the highest of them, and never under a lower one
than it sealed under before or than stored values name (it stops sealing instead: the
newest version's record or key went missing). ``backvault vault
rotate-sealing-key`` records a new version and re-seals every sealed column
(sealed_columns.py); a serving node picks the new version up at its next sweep, or at once
when it meets a value sealed under it.

Nonce bound: with random 96-bit nonces one key may seal at most 2^32 values (NIST SP
800-38D, 8.3). Seals are counted per key version (housekeeping.py); rotate well before.
"""

from backvault.hardening.private_files import make_private_dir
from backvault.vault.sealing.check_values import (
    CHECK_VALUE_ASSOCIATED_DATA,
    CHECK_VALUE_BLOCK,
    CHECK_VALUE_NONCE,
    VOUCH_CONTEXT,
    short_check_value,
    vouch_purpose,
)
from backvault.vault.sealing.formats import (
    FORMAT_UNVERSIONED,
    FORMAT_VERSIONED,
    HEADER_SIZE,
    KEY_SIZE,
    MAX_KEY_VERSION,
    NONCE_SIZE,
    SEALS_PER_KEY_LIMIT,
    SEALS_PER_KEY_WARNING,
    TAG_SIZE,
    SealingError,
    key_version_of,
    sealed_header,
)
from backvault.vault.sealing.hsm import Pkcs11Sealer, pkcs11_attribute_mapper
from backvault.vault.sealing.key_file import FileSealer
from backvault.vault.sealing.versioned import Sealer
from backvault.vault.sealing.versions import (
    IGNORED_CHECK_VALUE,
    IGNORED_DESTROYED,
    IGNORED_NOT_A_SEALING_KEY,
    IGNORED_REASONS,
    IGNORED_UNFINISHED,
    IGNORED_UNRECORDED,
    IGNORED_UNVOUCHED,
    IgnoredKey,
    KeyStore,
    PinnedVersions,
    RecordedVersion,
    VersionRecords,
    reservation_is_fresh,
)

__all__ = [
    "CHECK_VALUE_ASSOCIATED_DATA",
    "CHECK_VALUE_BLOCK",
    "CHECK_VALUE_NONCE",
    "FORMAT_UNVERSIONED",
    "FORMAT_VERSIONED",
    "HEADER_SIZE",
    "IGNORED_CHECK_VALUE",
    "IGNORED_DESTROYED",
    "IGNORED_NOT_A_SEALING_KEY",
    "IGNORED_REASONS",
    "IGNORED_UNFINISHED",
    "IGNORED_UNRECORDED",
    "IGNORED_UNVOUCHED",
    "KEY_SIZE",
    "MAX_KEY_VERSION",
    "NONCE_SIZE",
    "SEALS_PER_KEY_LIMIT",
    "SEALS_PER_KEY_WARNING",
    "TAG_SIZE",
    "VOUCH_CONTEXT",
    "FileSealer",
    "IgnoredKey",
    "KeyStore",
    "PinnedVersions",
    "Pkcs11Sealer",
    "RecordedVersion",
    "Sealer",
    "SealingError",
    "VersionRecords",
    "key_version_of",
    "make_private_dir",
    "pkcs11_attribute_mapper",
    "reservation_is_fresh",
    "sealed_header",
    "short_check_value",
    "vouch_purpose",
]
