"""`backvault demo --realms 3`: the demo's story with the password checked by threshold realms
(docs/realms.md) instead of one vault, offline, on loopback.

Three independent `backvault vault serve --realm` processes, each with its own database and
sealing key — realm A on PostgreSQL with its sealing key in a SoftHSM2 token where both are
installed, the others on SQLite with a key file — and 2 of 3 needed. Backup with a password;
the phone is lost; on a new phone two wrong guesses, then, with one realm stopped, the right
password restores. Then realm C's operator puts back an earlier copy of its database (a
rollback), and the realms' own counts show that the guesses still possible stay within the
bound of docs/realms.md. Every step is a real `backvault` command in a subprocess.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backvault.demo import PASSWORD, Demo, _free_port, digest, make_chat_store
from backvault.realms.bounds import default_allowed_guesses, guesses_left

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
HSM_LABEL = "backvault-demo"
WRONG_GUESSES = ("grandma's lemon pie", "lemon cake 1987")
ATTACKER_GUESSES = ("123456", "password1", "ana2021")


def _get_json(url: str, token: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url)  # noqa: S310 - loopback, http only
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
        return dict(json.loads(answer.read()))


@dataclass
class RealmProcess:
    """One realm: its own folder, database, sealing key and `vault serve --realm` process."""

    name: str
    home: Path
    store: list[str]  # --db and the sealing options: what makes this realm its own
    env: dict[str, str]
    what: str  # the database and the sealing, for the reader
    sqlite_file: Path | None = None
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None
    realm_id: str = ""
    token: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.home / "realm.log", "ab")  # noqa: SIM115 - the realm process keeps it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backvault.cli",
                "vault",
                "serve",
                "--realm",
                *self.store,
                "--listen",
                f"127.0.0.1:{self.port}",
            ],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.realm_id = str(_get_json(self.url + "/realm/v1/info")["realm_id"])
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    tail = (self.home / "realm.log").read_text(errors="replace")[-1500:]
                    raise SystemExit(
                        f"demo failed: realm {self.name} did not start\n{tail}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def registration(self) -> dict[str, Any]:
        """Phase 1 (uncounted): what this realm holds for the account, and its count."""
        return _get_json(self.url + "/realm/v1/registration", self.token)


def _others_can_enter(folder: Path) -> bool:
    """Whether another user (PostgreSQL's own) can reach into ``folder``."""
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [folder, *folder.parents])


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[str, str] | str]:
    """A throwaway PostgreSQL cluster on loopback (as tests/servers.py starts one): yields
    (database URL, what), or why it cannot run here."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        yield "PostgreSQL is not installed"
        return
    bindir = Path(found[-1]).parent
    parent = Path(tempfile.gettempdir())
    if os.geteuid() == 0 and not _others_can_enter(parent):
        parent = Path("/tmp")  # noqa: S108 - the cluster's user must reach its folder
    base = Path(tempfile.mkdtemp(prefix="backvault-demo-pg-", dir=parent))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as its own system user
        import pwd

        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            yield "PostgreSQL has no 'postgres' user here"
            return
        os.chmod(base, 0o755)  # noqa: S103 - the cluster's folder, owned by its user
        os.chown(base, pg.pw_uid, pg.pw_gid)
        as_user = ["setpriv", f"--reuid={pg.pw_uid}", f"--regid={pg.pw_gid}", "--init-groups"]
    data, port = base / "data", _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    started = False
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "vault", "--auth=trust"],
            check=True,
            capture_output=True,
            env=env,
        )
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}"
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
             str(base / "log"), "-w", "start"],
            check=True,
            capture_output=True,
            env=env,
        )  # fmt: skip
        started = True
        subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vault",
             "realm_a"],
            check=True,
            capture_output=True,
            env=env,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        if started:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                            "stop"], capture_output=True)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)
        yield f"PostgreSQL did not start ({exc})"
        return
    try:
        yield f"postgresql://vault@127.0.0.1:{port}/realm_a", f"PostgreSQL {bindir.parent.name}"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            capture_output=True,
            env=env,
        )
        shutil.rmtree(base, ignore_errors=True)


def softhsm_token(home: Path) -> tuple[list[str], dict[str, str]] | str:
    """A fresh SoftHSM2 token for realm A (its own token folder and PIN file): the sealing
    options and environment, or why there is none."""
    if not os.path.exists(SOFTHSM_MODULE) or shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed"
    (home / "hsm-tokens").mkdir(parents=True)
    conf = home / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {home / 'hsm-tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    env = {"SOFTHSM2_CONF": str(conf)}
    pin_file = home / "hsm-pin"
    pin_file.write_text("4321\n")
    os.chmod(pin_file, 0o600)
    made = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", HSM_LABEL, "--pin", "4321",
         "--so-pin", "87654321"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )  # fmt: skip
    if made.returncode != 0:
        return f"SoftHSM2 could not make a token ({made.stderr.strip()})"
    options = [
        "--sealing", "pkcs11", "--pkcs11-module", SOFTHSM_MODULE,
        "--pkcs11-token-label", HSM_LABEL, "--pkcs11-pin-file", str(pin_file),
    ]  # fmt: skip
    return options, env


def operator_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKVAULT_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), **extra)
    return env


def file_realm(name: str, home: Path) -> RealmProcess:
    database = home / "data" / "vault.db"
    store = [
        "--db", f"sqlite:///{database}", "--data-dir", str(home / "data"),
        "--sealing-key-file", str(home / "keys" / "sealing.key"),
    ]  # fmt: skip
    return RealmProcess(
        name, home, store, operator_env(home), "SQLite, sealing key file", sqlite_file=database
    )


def stop_all(realms: list[RealmProcess]) -> None:
    for realm in realms:
        realm.stop()


def show_counts(realms: list[RealmProcess], note: dict[str, str] | None = None) -> list[int]:
    """Print the attempts each realm reports; returns the attempts left at each."""
    left = []
    for realm in realms:
        try:
            held = realm.registration()
        except OSError:
            print(f"  realm {realm.name}: does not answer")
            left.append(0)
            continue
        used, allowed = int(held["attempts"]), int(held["allowed"])
        left.append(max(0, allowed - used))
        extra = f"  ({note[realm.name]})" if note and realm.name in note else ""
        print(f"  realm {realm.name}: {held['state']}, {used} of {allowed} attempts used{extra}")
    return left


def main(realm_count: int = 3, keep: bool = False) -> int:
    started = time.monotonic()
    threshold = realm_count // 2 + 1
    allowed = default_allowed_guesses(threshold, realm_count)
    names = [chr(ord("A") + i) for i in range(realm_count)]
    work = Path(tempfile.mkdtemp(prefix="backvault-demo-"))
    demo = Demo(work)
    repo = work / "cloud-storage" / "chat-backup"
    store = work / "phone" / "chat"
    realms: list[RealmProcess] = []
    try:
        with contextlib.ExitStack() as stack:
            demo.say("A phone with a chat history: a SQLite message database and a media folder")
            make_chat_store(store)
            files = [p for p in store.rglob("*") if p.is_file()]
            print(f"{len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB")

            demo.say(
                f"{realm_count} independent realms on loopback, {threshold} of {realm_count} "
                "needed for the password (each its own process, database and sealing key)"
            )
            home_a = work / "realm-A-operator"
            home_a.mkdir()
            postgres = stack.enter_context(postgres_cluster())
            # Realms stop before the PostgreSQL cluster does (the stack unwinds backwards).
            stack.callback(stop_all, realms)
            hsm = softhsm_token(home_a)
            realm_a = file_realm("A", home_a)
            database, sealing = "SQLite", "sealing key file"
            if isinstance(postgres, tuple):
                url, database = postgres
                realm_a.store = ["--db", url, *realm_a.store[2:]]
                realm_a.sqlite_file = None
            if isinstance(hsm, tuple):
                options, hsm_env = hsm
                realm_a.store = [*realm_a.store[:4], *options]
                realm_a.env.update(hsm_env)
                sealing = "sealing key in a SoftHSM2 token"
                # The key ceremony: the sealing key is made inside the token, once.
                demo.run(["vault", "init-hsm", *realm_a.store], realm_a.env)
            realm_a.what = f"{database}, {sealing}"
            missing = [why for why in (postgres, hsm) if isinstance(why, str)]
            if missing:
                fallback = "SQLite" if isinstance(postgres, str) else database
                fallback += " and a key file" if isinstance(hsm, str) else " and SoftHSM2"
                print(f"{'; '.join(missing)}: realm A uses {fallback}.")
            realms.append(realm_a)
            for name in names[1:]:
                home = work / f"realm-{name}-operator"
                home.mkdir()
                realms.append(file_realm(name, home))
            for realm in realms:
                realm.token = demo.run(
                    ["vault", "add-account", *realm.store, "ana"], realm.env, show=False
                ).strip()
                realm.start()
                print(
                    f"realm {realm.name}: {realm.url}, realm id {realm.realm_id[:8]}…, "
                    f"{realm.what}; account 'ana' created, its token goes to Ana's devices"
                )
            realm_list = ",".join(realm.url for realm in realms)

            def configure(device: dict[str, str]) -> None:
                for key, value in (
                    ("repository", str(repo)),
                    ("vault.realms", realm_list),
                    ("vault.threshold", str(threshold)),
                    ("vault.account", "ana"),
                ):
                    demo.run(["config", "set", key, value], device, show=False)
                # Each realm's token is piped in (never on a command line) and kept in the keyring.
                for realm in realms:
                    demo.run(
                        ["config", "set", "vault.token", "--realm", realm.url, "-"],
                        device,
                        show=False,
                        stdin=realm.token,
                    )

            phone = demo.device_env("phone", BACKVAULT_PASSWORD=PASSWORD)
            demo.say("Ana turns on encrypted backup with a password (and keeps a 64-digit key too)")
            configure(phone)
            init = json.loads(demo.run(["--json", "init", "--password"], phone, show=False))
            groups = init["recovery_key_groups"].split()
            print("64-digit recovery key (shown once):")
            for row in range(4):
                print("    " + " ".join(groups[row * 4 : row * 4 + 4]))
            print(
                f"password slot {init['password_key_id'][:8]} registered at all "
                f"{realm_count} realms: each holds one share; {allowed} attempts allowed at each"
            )
            show_counts(realms)

            demo.say(
                "Daily backup: no password needed (this device's key cache opens the repository)"
            )
            demo.run(["backup", str(store)], phone)
            expected = digest(store)

            rolled = realms[-1]
            assert rolled.sqlite_file is not None
            earlier = rolled.home / "backup-of-vault.db"
            source = sqlite3.connect(rolled.sqlite_file)
            target = sqlite3.connect(earlier)
            source.backup(target)
            source.close()
            target.close()
            print(
                f"(meanwhile realm {rolled.name}'s operator copies its database, as a nightly "
                "backup would)"
            )

            demo.say("The phone is lost")
            demo.run(["forget-device"], phone)
            shutil.rmtree(work / "phone")
            print("the phone, its chats and its key cache are gone")

            new_phone = demo.device_env("new-phone")
            demo.say("A new phone: same account and realms, and Ana types a wrong password twice")
            configure(new_phone)
            for guess in WRONG_GUESSES:
                demo.run(["snapshots"], dict(new_phone, BACKVAULT_PASSWORD=guess), expect=10)
            print(f"each guess was counted by {threshold} realms before they answered:")
            show_counts(realms)

            down = realms[1]
            demo.say(
                f"Realm {down.name} goes down (its provider's outage); then the right "
                "password: restore the latest snapshot"
            )
            down.stop()
            print(f"realm {down.name} stopped: {down.url} does not answer")
            restored = work / "new-phone" / "restored"
            demo.run(
                ["restore", "latest", "--target", str(restored)],
                dict(new_phone, BACKVAULT_PASSWORD=PASSWORD),
            )
            same = digest(restored / store.relative_to("/")) == expected
            print(
                f"restored chat history identical to the lost phone's backup: {same} "
                f"(with realm {down.name} down)"
            )
            if not same:
                raise SystemExit("demo failed: the restored history differs")
            down.start()
            print(f"realm {down.name} is back")
            demo.run(["password", "check"], dict(new_phone, BACKVAULT_PASSWORD=PASSWORD))
            show_counts(realms)

            demo.say(
                f"Someone holding Ana's tokens guesses; then realm {rolled.name}'s operator "
                "rolls its database back"
            )
            thief = demo.device_env("token-thief")
            configure(thief)
            for guess in ATTACKER_GUESSES:
                demo.run(["snapshots"], dict(thief, BACKVAULT_PASSWORD=guess), expect=10)
            print("the attempts each realm reports (phase 1, uncounted):")
            before = show_counts(realms)
            bound_fresh = guesses_left([allowed] * realm_count, threshold)
            bound_rolled = guesses_left([None] + [allowed] * (realm_count - 1), threshold)
            bound_worst = guesses_left(
                [None] * (threshold - 1) + [allowed] * (realm_count - threshold + 1), threshold
            )
            print(
                f"guesses still possible: {guesses_left(before, threshold)} "
                f"(the bound: {bound_fresh} for {realm_count} realms, t = {threshold}, "
                f"G_r = {allowed}; {bound_rolled} with one realm rolled back)"
            )
            rolled.stop()
            os.replace(earlier, rolled.sqlite_file)
            for suffix in ("-wal", "-shm"):
                Path(f"{rolled.sqlite_file}{suffix}").unlink(missing_ok=True)
            rolled.start()
            print(
                f"realm {rolled.name} stopped, its earlier database file put back, restarted "
                f"(same realm id {rolled.realm_id[:8]}…): its counter is back to where it was"
            )
            after = show_counts(realms, {rolled.name: "rolled back"})
            honest = [c for realm, c in zip(realms, after, strict=True) if realm is not rolled]
            guessed = len(ATTACKER_GUESSES)
            more = guesses_left([None, *honest], threshold)
            print(
                f"guesses still possible: {guesses_left(after, threshold)} by the realms' "
                f"counts; even if realm {rolled.name} rolls back after every guess, at most "
                f"{more} more (each guess needs {threshold} realms, and only {realm_count - 1} "
                "keep their counts)"
            )
            total = guessed + (more or 0)
            within = more is not None and bound_rolled is not None and total <= bound_rolled
            print(
                f"the token holder's wrong guesses in all: {guessed} made + {more} possible = "
                f"{total} <= {bound_rolled}, the bound with one realm rolled back: {within}"
            )
            if not within:
                raise SystemExit("demo failed: the rollback went past the documented bound")
            demo.run(["password", "check"], dict(new_phone, BACKVAULT_PASSWORD=PASSWORD))

            demo.say("What the storage provider holds")
            objects = [p for p in repo.rglob("*") if p.is_file()]
            print(
                f"{len(objects)} encrypted objects, "
                f"{sum(p.stat().st_size for p in objects) / 2**20:.1f} MiB, named by SHA-256: "
                "nothing derived from the password is there."
            )

            demo.say("What each realm operator holds")
            for realm in realms:
                print(f"  realm {realm.name}: {realm.what}")
            print(
                "each: the public descriptor; ONE share of the OPRF key and ONE of the "
                "encryption key, sealed;"
            )
            print("a tag hash, a share MAC, the ciphertext, its counter and attempt history.")
            assert rolled.sqlite_file is not None
            db = sqlite3.connect(f"file:{rolled.sqlite_file}?mode=ro", uri=True)
            row = db.execute(
                "SELECT length(sealed_key_share), length(sealed_encryption_share), "
                "length(ciphertext), attempts, allowed FROM realm_registrations"
            ).fetchone()
            db.close()
            print(
                f"realm {rolled.name}'s row for ana: key share {row[0]} sealed bytes, encryption "
                f"share {row[1]} sealed bytes, ciphertext {row[2]} bytes, {row[3]} of {row[4]} "
                "attempts used"
            )
            print(
                "One realm's database AND its sealing key cannot test a single guess: a guess "
                f"needs {threshold} realms'"
            )
            print(
                f"evaluations, and the ciphertext opens only with the password and {threshold} "
                "encryption shares."
            )
            print(
                f"{threshold - 1} operator{'s' if threshold > 2 else ''} rolling back (or "
                f"lying) get{'' if threshold > 2 else 's'} at most {bound_worst} wrong guesses in all instead of "
                f"{bound_fresh}; {threshold} together could"
            )
            print(
                "guess without limit: that is the trust assumption, so each realm goes to a "
                "different provider."
            )
            print(f"\nDemo finished in {time.monotonic() - started:.0f} s.")
        return 0
    finally:
        stop_all(realms)
        if keep:
            print(f"(everything the demo made is in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
