"""Red team round three (vault): the restart variant of the "trusted versions disappear"
attack. Succeeded on 6003a64 and bf01797; stopped by the fix after them (the node does not
start: "no key for the sealing key versions this vault recorded (2) ...").

Key files. The attacker once wrote `sealing.key.v2` (a key they know) into the key folder;
now they can write the database only. They add version 2's record (check value of their
key, a vouch made by their key for itself) and mark version 1's record destroyed. A node
that *starts* then finds no usable version among those its rows are sealed under (1) and
anchors on the lowest usable recorded version — the planted 2 — without any vouch; the
floor (highest version in use: 1) does not stop a higher version. New values are sealed
under the known key.

The vault's own keys (OPRF seed, server key) are sealed under version 1 too, so the
attacker also deletes the `vault_keys` row: the node makes new ones, sealed under the
planted key, which the attacker then reads (with --keep-vault-keys the node does not start).

Run: .venv/bin/python scripts/redteam-vault3/restart_anchor.py [--keep-vault-keys]
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.servers import make_node
from tests.test_vault_key_versions import (
    FAST_SWEEP,
    PlantedStore,
    attacker_check_value,
    attacker_vouch,
    opens_with_known_key,
    register_and_login,
    sealed_values,
    write_version_record,
)
from tests.test_vault_rotation import current_version, sealed_versions


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rtv3-restart-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "vault.db"
        node = make_node(tmp / "n", f"sqlite:///{db}", env=FAST_SWEEP).start()
        try:
            register_and_login(node, node.add_account("una"), b"pw-una")
            victim = node.add_account("vic")
            encrypt = PlantedStore().plant(node)  # once: key-folder write
        finally:
            node.stop()
        # From here on: database write access only.
        check_value = attacker_check_value(encrypt)
        write_version_record(db, 2, check_value, attacker_vouch(encrypt, 2, 2, check_value))
        with sqlite3.connect(db) as conn:
            conn.execute(
                "UPDATE sealing_key_versions SET destroyed_at = ? WHERE key_version = 1",
                (time.time(),),
            )
            if "--keep-vault-keys" not in sys.argv:
                # The vault's own keys are sealed under version 1: without this the node
                # stops at start ("sealed under key version 1, which this vault does not
                # hold"); deleted, it makes new ones — sealed under the planted key.
                conn.execute("DELETE FROM vault_keys")
        try:
            node.start()  # a restart (deploy, crash, reboot)
        except Exception as exc:
            last = str(exc).strip().splitlines()[-1]
            print(f"attack stopped: the node does not start: {last}")
            return 1
        try:
            seen = current_version(node)
            register_and_login(node, victim, b"the victim's password")
        finally:
            node.stop()
        versions = sealed_versions(f"sqlite:///{db}")
        known = sum(opens_with_known_key(*value) for value in sealed_values(db))
        print(f"current version after restart: {seen:g}; sealed versions: {dict(versions)}")
        print(f"values the attacker's known key opens: {known}")
        print("ATTACK SUCCEEDED" if known else "attack stopped")
        return 0 if known else 1


if __name__ == "__main__":
    raise SystemExit(main())
