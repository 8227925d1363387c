"""Vault login throughput and latency, against real vault processes on loopback.

    .venv/bin/python bench/vault_bench.py [--nodes 1 3] [--clients 100] [--seconds 20]
                                          [--db postgres|sqlite] [--smoke]

Each client repeatedly runs a whole successful OPAQUE login (KE1 → KE2, KE3 → wrapped
secret) for its own account, over HTTP/1.1 keep-alive, spread over the nodes. Prints
logins/s and login latency (p50, p99) for each node count. PostgreSQL runs as a
throwaway cluster; sealing uses a SoftHSM2 token when it is installed, else a key file.
The clients (Identity KSF, so client CPU is small) run as 4 processes of threads, each
client with its own keep-alive connection; all share the machine's cores with the vault.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backvault.opaque import KE2, IdentityKSF, OpaqueConfig, client  # noqa: E402
from backvault.vaultclient.http import VaultClient  # noqa: E402
from tests.servers import make_node, postgres_cluster, softhsm_token  # noqa: E402

CONFIG = OpaqueConfig(ksf=IdentityKSF())


def _worker_process(
    args: tuple[list[str], list[tuple[str, bytes, int]], float, float],
) -> tuple[int, list[float]]:
    """One load process: a thread per client, each with its own keep-alive connection."""
    urls, jobs, stop_at, window = args
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(token: str, password: bytes, node: int) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=urls[node % len(urls)], timeout=60, headers=headers) as http:
            while time.time() < stop_at:
                started = time.perf_counter()
                ke1, state = client.generate_ke1(password)
                r = http.post(
                    "/v1/login/start", json={"ke1": base64.b64encode(ke1.to_bytes()).decode()}
                )
                r.raise_for_status()
                doc = r.json()
                ke2 = KE2.from_bytes(base64.b64decode(doc["ke2"]))
                ke3 = client.generate_ke3(state, ke2, CONFIG).ke3
                r = http.post(
                    "/v1/login/finish",
                    json={
                        "login_id": doc["login_id"],
                        "ke3": base64.b64encode(ke3.to_bytes()).decode(),
                    },
                )
                r.raise_for_status()
                if time.time() >= stop_at - window:  # only the measured window counts
                    with lock:
                        latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), latencies


def run_load(
    urls: list[str], tokens: list[str], passwords: list[bytes], seconds: float, processes: int = 4
) -> tuple[int, list[float]]:
    stop_at = time.time() + 2 + seconds  # 2 s for the processes to start
    jobs: list[list[tuple[str, bytes, int]]] = [[] for _ in range(processes)]
    for i, (token, password) in enumerate(zip(tokens, passwords, strict=True)):
        jobs[i % processes].append((token, password, i))
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_worker_process, [(urls, job, stop_at, seconds) for job in jobs])
    # Count only what finished inside the measured window: the first 2 s are warm-up.
    count = sum(r[0] for r in results)
    latencies = [lat for r in results for lat in r[1]]
    return count, latencies


def measure(
    nodes: int, db_kind: str, clients: int, seconds: float, work: Path
) -> tuple[float, float, float]:
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        sealing: list[str] = []
        if shutil.which("softhsm2-util") and os.path.exists("/usr/lib/softhsm/libsofthsm2.so"):
            hsm = stack.enter_context(softhsm_token(work / f"hsm{nodes}"))
            env = hsm.env
            sealing = [
                "--sealing",
                "pkcs11",
                "--pkcs11-token-label",
                hsm.token_label,
                "--pkcs11-pin-file",
                str(hsm.pin_file),
            ]
        else:
            sealing = ["--sealing-key-file", str(work / f"sealing{nodes}.key")]
        if db_kind == "postgres":
            pg = stack.enter_context(postgres_cluster())
            db = pg.new_database(f"bench{nodes}")
        else:
            db = f"sqlite:///{work / f'bench{nodes}.db'}"
        vaults = [make_node(work / f"n{nodes}-{i}", db, *sealing, env=env) for i in range(nodes)]
        vaults[0].start()
        for v in vaults[1:]:
            v.start()
        try:
            passwords = []
            # One helper process creates every account (`vault add-account` is a process
            # each); a process of its own so that it loads this run's HSM configuration.
            script = (
                "import sys; from backvault.vault.config import load_settings; "
                "from backvault.vault.server import make_service; "
                "s = make_service(load_settings(None, dict(a.split('=', 1) for a in sys.argv[2:]))); "
                "print('\\n'.join(s.add_account(f'bench{i}') for i in range(int(sys.argv[1]))))"
            )
            overrides = {
                "db": db,
                "data_dir": str(work / f"n{nodes}-0" / "data"),
                **_sealing_overrides(sealing),
            }
            made = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    script,
                    str(clients),
                    *(f"{k}={v}" for k, v in overrides.items()),
                ],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            tokens = made.stdout.split()
            for i, token in enumerate(tokens):
                password = b"password %d" % i
                with VaultClient(vaults[i % nodes].url, token, CONFIG) as vc:
                    vc.register(password, lambda _k: b"w" * 48)
                passwords.append(password)
            count, latencies = run_load([v.url for v in vaults], tokens, passwords, seconds)
        except Exception:
            for v in vaults:
                print(f"--- {v.log}:\n" + v.log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            for v in vaults:
                v.stop()
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        return count / seconds, p50, p99


def _sealing_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        out[flag.lstrip("-").replace("-", "_")] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--smoke", action="store_true", help="1 node, SQLite, 4 clients, 1 s")
    args = parser.parse_args()
    if args.smoke:
        args.nodes, args.clients, args.seconds, args.db = [1], 4, 1.0, "sqlite"
    work = Path(tempfile.mkdtemp(prefix="backvault-vault-bench-"))
    rows = []
    try:
        for n in args.nodes:
            rows.append((n, *measure(n, args.db, args.clients, args.seconds, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{os.cpu_count()} cores; {args.db}; {args.clients} concurrent clients; {args.seconds:.0f} s per run"
    )
    print(f"{'nodes':>5} {'logins/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for n, rate, p50, p99 in rows:
        print(f"{n:>5} {rate:>9.1f} {p50:>8.1f} {p99:>8.1f}")


if __name__ == "__main__":
    main()
