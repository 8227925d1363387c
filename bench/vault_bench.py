"""Vault login throughput and latency, against real vault processes on loopback.

    .venv/bin/python bench/vault_bench.py [--nodes 1 3] [--clients 100] [--seconds 20]
                                          [--db postgres|sqlite] [--smoke]

Each client repeatedly runs a whole successful OPAQUE login (KE1 → KE2, KE3 → wrapped
secret) for its own account, over HTTP/1.1 keep-alive, spread over the nodes. Prints
logins/s and login latency (p50, p99) for each node count. PostgreSQL runs as a
throwaway cluster; sealing uses a SoftHSM2 token when it is installed, else a key file.
The client side (Identity KSF, so client CPU is small) runs in this process with asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backvault.client.vault_client import VaultClient  # noqa: E402
from backvault.opaque import KE2, IdentityKSF, OpaqueConfig, client  # noqa: E402
from tests.servers import make_node, postgres_cluster, softhsm_token  # noqa: E402

CONFIG = OpaqueConfig(ksf=IdentityKSF())


async def run_load(
    urls: list[str], tokens: list[str], passwords: list[bytes], seconds: float
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    done = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
    clients = [httpx.AsyncClient(base_url=u, timeout=30, limits=limits) for u in urls]

    async def worker(i: int) -> None:
        nonlocal done
        http = clients[i % len(clients)]
        headers = {"Authorization": f"Bearer {tokens[i]}"}
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            ke1, state = client.generate_ke1(passwords[i])
            r = await http.post(
                "/v1/login/start",
                headers=headers,
                json={"ke1": base64.b64encode(ke1.to_bytes()).decode()},
            )
            r.raise_for_status()
            doc = r.json()
            ke3 = client.generate_ke3(
                state, KE2.from_bytes(base64.b64decode(doc["ke2"])), CONFIG
            ).ke3
            r = await http.post(
                "/v1/login/finish",
                headers=headers,
                json={
                    "login_id": doc["login_id"],
                    "ke3": base64.b64encode(ke3.to_bytes()).decode(),
                },
            )
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
            done += 1

    await asyncio.gather(*(worker(i) for i in range(len(tokens))))
    for c in clients:
        await c.aclose()
    return done, latencies


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
            # Accounts are created in-process: `vault add-account` is one process each.
            from backvault.vault.config import load_settings
            from backvault.vault.server import make_service

            os.environ.update(env)
            settings = load_settings(
                None,
                {
                    "db": db,
                    "data_dir": str(work / f"n{nodes}-0" / "data"),
                    **_sealing_overrides(sealing),
                },
            )
            service = make_service(settings)
            tokens = [service.add_account(f"bench{i}") for i in range(clients)]
            service.sealer.close()
            service.engine.dispose()
            for i, token in enumerate(tokens):
                password = b"password %d" % i
                with VaultClient(vaults[i % nodes].url, token, CONFIG) as vc:
                    vc.register(password, lambda _k: b"w" * 48)
                passwords.append(password)
            count, latencies = asyncio.run(
                run_load([v.url for v in vaults], tokens, passwords, seconds)
            )
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
