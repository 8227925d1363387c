"""Red team round three (vault), (c): with the PIN for a moment, try to get a copy of the
vault's own sealing key (made by `init-hsm`) that someone without the PIN can use later,
or a key whose value is known accepted as current, through PKCS#11 itself — on a real
SoftHSM2 token:

1. C_CopyObject of the vault's key with CKA_PRIVATE=false (and a `-v2` label);
2. C_SetAttributeValue on the vault's key (CKA_PRIVATE=false, CKA_EXTRACTABLE=true,
   CKA_ALLOWED_MECHANISMS += ECB);
3. C_WrapKey of the vault's key under a wrapping key the attacker made;
4. C_DeriveKey from the vault's key (CKM_AES_ECB_ENCRYPT_DATA);
5. C_EncryptInit with CKM_AES_ECB / CKM_AES_CTR (a raw oracle).

Each step prints "refused" (the attack stopped) or what it obtained.
Run: .venv/bin/python scripts/redteam-vault3/pkcs11_copy.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.servers import softhsm_in_this_process, softhsm_token
from tests.test_vault_key_versions import pkcs11_session


def main() -> int:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism

    succeeded = 0
    with (
        tempfile.TemporaryDirectory(prefix="rtv3-p11-") as tmp_name,
        softhsm_token(Path(tmp_name) / "hsm") as token,
        softhsm_in_this_process(token),
        pkcs11_session(token) as session,  # type: ignore[attr-defined]
    ):
        key = session.get_key(label="backvault-sealing-v1")

        def attempt(name: str, call: object) -> None:
            nonlocal succeeded
            try:
                result = call()  # type: ignore[operator]
            except (pkcs11.PKCS11Error, AttributeError) as exc:
                # AttributeError: python-pkcs11 offers no derive on a key without
                # CKA_DERIVE (the token would refuse it too)
                print(f"{name}: refused ({type(exc).__name__}: {exc})")
                return
            succeeded += 1
            print(f"{name}: SUCCEEDED -> {result!r}")

        attempt(
            "copy with CKA_PRIVATE=false",
            lambda: key.copy({Attribute.PRIVATE: False, Attribute.LABEL: "backvault-sealing-v2"}),
        )
        attempt("copy unchanged", lambda: key.copy({Attribute.LABEL: "copy"}))
        for name, value in [
            ("PRIVATE", False),
            ("EXTRACTABLE", True),
            ("SENSITIVE", False),
            ("DERIVE", True),
            ("WRAP", True),
            ("ALLOWED_MECHANISMS", [Mechanism.AES_GCM, Mechanism.AES_ECB]),
        ]:

            def set_attribute(name: str = name, value: object = value) -> str:
                key[getattr(Attribute, name)] = value
                return "set"

            attempt(f"set CKA_{name}={value}", set_attribute)
        wrapping = session.generate_key(KeyType.AES, 256, label="attacker-wrap", store=False)
        attempt("wrap under the attacker's key", lambda: wrapping.wrap_key(key))
        attempt(
            "derive (AES_ECB_ENCRYPT_DATA)",
            lambda: key.derive_key(
                KeyType.GENERIC_SECRET,
                256,
                mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                mechanism_param=bytes(32),
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
            ),
        )
        attempt(
            "encrypt with CKM_AES_ECB",
            lambda: key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB),
        )
        attempt(
            "encrypt with CKM_AES_CTR",
            lambda: key.encrypt(bytes(16), mechanism=Mechanism.AES_CTR, mechanism_param=bytes(16)),
        )
    print("ATTACK SUCCEEDED" if succeeded else "every attempt refused")
    return 1 if succeeded else 0


if __name__ == "__main__":
    raise SystemExit(main())
