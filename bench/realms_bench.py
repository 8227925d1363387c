"""Threshold realms (docs/realms.md): recovery time with 3 realms on loopback, and how many
counted evaluations one realm serves per second per core.

    .venv/bin/python bench/realms_bench.py [--rounds 5] [--clients 16] [--seconds 10]
                                           [--smoke]

Three `backvault vault serve --realm` processes on 127.0.0.1, each with its own SQLite
database and sealing-key file. One account registers (t = 2 of 3, G_r = 5) with the suite's
real Argon2id (t=3, m=64 MiB, p=4), then:

- recovery, end to end (RealmSet.recover: phase 1, Argon2id, phase 2, phase 3): median of
  --rounds; and the same steps timed one by one over --rounds more recoveries;
- evaluations: --clients concurrent clients (threads in 2 processes, each its own
  keep-alive connection) send POST /realm/v1/evaluate to ONE realm for --seconds, for an
  account each, registered with G_r = 1000 (the most a realm's max_attempts may be; the
  realms' max_attempts and guess_cap are raised to match). Every answer is a counted attempt: a
  committed SQLite write (synchronous=FULL) before the DLEQ-proved evaluation. "Per core"
  is evaluations per CPU-second of the realm process (user + system, from /proc), since the
  clients share the machine's cores with it.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backvault.opaque import group, voprf  # noqa: E402
from backvault.realms import protocol  # noqa: E402
from backvault.realms.protocol import TestOnlyStretching  # noqa: E402
from backvault.vaultclient.realms import RealmClient, RealmSet  # noqa: E402
from tests.servers import VaultNode, make_node  # noqa: E402

PASSWORD = b"correct horse battery staple"
T = TypeVar("T")
MOST_GUESSES = 1000  # the most a realm's max_attempts may be (a descriptor could say 65535)
REALM_ENV = {
    "BACKVAULT_SERVER_REALM": "true",
    "BACKVAULT_SERVER_MAX_ATTEMPTS": str(MOST_GUESSES),
    "BACKVAULT_SERVER_GUESS_CAP": str(10**9),
    "BACKVAULT_SERVER_LOG_LEVEL": "warning",
}


def start_realms(work: Path, count: int) -> list[tuple[VaultNode, bytes]]:
    started = []
    for i in range(count):
        tmp = work / f"realm{i}"
        node = make_node(
            tmp,
            f"sqlite:///{tmp / 'realm.db'}",
            "--sealing-key-file",
            str(tmp / "keys" / "sealing.key"),
            env=REALM_ENV,
        ).start()
        realm_id = bytes.fromhex(
            httpx.get(node.url + "/realm/v1/info", timeout=10).json()["realm_id"]
        )
        started.append((node, realm_id))
    return started


def realm_set(
    realms: list[tuple[VaultNode, bytes]], stretching: TestOnlyStretching | None
) -> RealmSet:
    name = "bench-" + secrets.token_hex(4)
    clients = [
        RealmClient(node.url, node.add_account(name), realm_id, timeout=60)
        for node, realm_id in realms
    ]
    return RealmSet(clients, name, test_stretching=stretching)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def recovery_parts(rs: RealmSet, stretching: TestOnlyStretching | None) -> dict[str, float]:
    """One recovery, step by step, as RealmSet.recover runs it (its internal steps)."""
    parts: dict[str, float] = {}
    parts["phase 1 (GET registration at 3 realms, agree)"], survey = timed(rs.agree)
    d = survey.descriptor
    assert d is not None
    parts["Argon2id + blind"], recovery = timed(
        lambda: protocol.begin_recovery(PASSWORD, d, test_stretching=stretching)
    )

    def phase_2() -> tuple[protocol.UnlockKey | None, dict[bytes, bytes]]:
        evaluations, made, _reported, problems = rs._evaluate(survey, recovery, None)
        assert not problems, problems
        return protocol.unlock_key(recovery, evaluations), made

    parts["phase 2 (evaluate at t=2, verify proofs, combine)"], (key, made) = timed(phase_2)
    assert key is not None
    unlock_key = key

    def phase_3() -> bytes:
        ids = {realm_id: [attempt] for realm_id, attempt in made.items()}
        secret, problems, _unlocked = rs._unlock(survey, recovery, unlock_key, ids)
        assert not problems, problems
        return secret

    parts["phase 3 (unlock at 3 realms, check MACs, decrypt)"], _ = timed(phase_3)
    return parts


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _load_process(
    args: tuple[str, list[tuple[str, str]], str, float, float],
) -> tuple[int, int, list[float]]:
    """One load process, a thread per (token, version): (evaluations answered in the
    measured window, refusals, latencies)."""
    url, jobs, blinded, stop_at, window = args
    answered = refused = 0
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(token: str, version: str) -> None:
        nonlocal answered, refused
        body = {"version": version, "blinded_element": blinded}
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            while time.time() < stop_at:
                started = time.perf_counter()
                response = http.post("/realm/v1/evaluate", json=body)
                took = time.perf_counter() - started
                if time.time() < stop_at - window:
                    continue  # warm-up
                with lock:
                    if response.status_code == 200:
                        answered += 1
                        latencies.append(took)
                    else:
                        refused += 1

    pool = [threading.Thread(target=worker, args=job) for job in jobs]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return answered, refused, latencies


def add_accounts(node: VaultNode, count: int) -> list[str]:
    """``count`` built-in accounts at ``node``, made by one helper process (one `vault
    add-account` process each would take longer than the measurement)."""
    script = (
        "import sys; from backvault.vault.config import load_settings; "
        "from backvault.vault.server import make_service; "
        "s = make_service(load_settings(None, dict(a.split('=', 1) for a in sys.argv[2:]))); "
        "print('\\n'.join(s.add_account(f'load{i}') for i in range(int(sys.argv[1]))))"
    )
    flags = dict(zip(node.args[::2], node.args[1::2], strict=True))
    overrides = {
        "db": flags["--db"],
        "data_dir": flags["--data-dir"],
        "sealing_key_file": flags["--sealing-key-file"],
    }
    made = subprocess.run(
        [sys.executable, "-c", script, str(count), *(f"{k}={v}" for k, v in overrides.items())],
        env=node.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.split()


def evaluation_throughput(
    realm: tuple[VaultNode, bytes], clients: int, seconds: float
) -> tuple[float, float, float, float, int]:
    """(evaluations/s, evaluations per realm CPU-second, p50 ms, p99 ms, refusals). Each
    client is its own account, registered at this realm only (a realm checks its own part
    of a descriptor) with G_r = the most a realm allows, so none runs out."""
    node, realm_id = realm
    jobs: list[tuple[str, str]] = []
    for i, token in enumerate(add_accounts(node, clients)):
        registration = protocol.register(
            PASSWORD,
            f"load{i}",
            secrets.token_bytes(32),
            [realm_id, secrets.token_bytes(16), secrets.token_bytes(16)],
            2,
            MOST_GUESSES,
            test_stretching=TestOnlyStretching(),
        )
        client = RealmClient(node.url, token, realm_id, timeout=60)
        try:
            client.register(registration.descriptor.encode(), registration.payload(realm_id), None)
        finally:
            client.close()
        jobs.append((token, base64.b64encode(registration.descriptor.version).decode()))
    blinded = base64.b64encode(voprf.blind(b"a guess", group.random_scalar())).decode()
    processes = 2
    warm_up = 3.0
    stop_at = time.time() + warm_up + seconds
    assert node.proc is not None
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pending = pool.map_async(
            _load_process,
            [(node.url, jobs[i::processes], blinded, stop_at, seconds) for i in range(processes)],
        )
        time.sleep(max(0.0, stop_at - seconds - time.time()))
        cpu_before = _cpu_seconds(node.proc.pid)
        time.sleep(max(0.0, stop_at - time.time()))
        cpu_after = _cpu_seconds(node.proc.pid)
        results = pending.get()
    answered = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    latencies = sorted(lat for r in results for lat in r[2])
    if not latencies:
        raise RuntimeError("no evaluation answered in the measured window")
    cpu = cpu_after - cpu_before
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return (
        answered / seconds,
        answered / cpu if cpu > 0 else float("nan"),
        statistics.median(latencies) * 1000,
        p99 * 1000,
        refused,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--smoke", action="store_true", help="cheap Argon2id, 1 round, 1 s")
    args = parser.parse_args()
    stretching: TestOnlyStretching | None = None
    argon = "Argon2id t=3 m=65536KiB p=4 (the suite's)"
    if args.smoke:
        args.rounds, args.clients, args.seconds = 1, 4, 1.0
        stretching, argon = TestOnlyStretching(), "Argon2id TestOnlyStretching (smoke)"
    work = Path(tempfile.mkdtemp(prefix="backvault-realms-bench-"))
    realms: list[tuple[VaultNode, bytes]] = []
    try:
        realms = start_realms(work, 3)
        rs = realm_set(realms, stretching)
        secret = secrets.token_bytes(32)
        rs.register(PASSWORD, secret, 2)
        end_to_end = []
        for _ in range(args.rounds):
            took, got = timed(lambda: rs.recover(PASSWORD))
            assert got.secret == secret
            end_to_end.append(took)
        parts: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, took in recovery_parts(rs, stretching).items():
                parts.setdefault(name, []).append(took)
        assert all(a.attempts == 0 for a in rs.survey().answers.values())  # all forgiven
        rs.close()
        rate, per_core, p50, p99, refused = evaluation_throughput(
            realms[0], args.clients, args.seconds
        )
    except Exception:
        for node, _ in realms:
            print(f"--- {node.log}:\n" + node.log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for node, _ in realms:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{os.cpu_count()} cores; 3 realms on loopback, SQLite + key-file sealing; t=2, n=3, G_r=5"
    )
    print(f"{argon}; median of {args.rounds}")
    print(f"{'recovery':<52} {'median ms':>10}")
    print(f"{'end to end (RealmSet.recover)':<52} {statistics.median(end_to_end) * 1000:>10.1f}")
    for name, times in parts.items():
        print(f"{'  ' + name:<52} {statistics.median(times) * 1000:>10.1f}")
    print()
    print(
        f"one realm, POST /realm/v1/evaluate, {args.clients} concurrent clients, {args.seconds:g} s"
    )
    print(
        f"{'evaluations/s':>14} {'per realm CPU-s':>16} {'p50 ms':>8} {'p99 ms':>8} {'refused':>8}"
    )
    print(f"{rate:>14.1f} {per_core:>16.1f} {p50:>8.1f} {p99:>8.1f} {refused:>8}")


if __name__ == "__main__":
    main()
