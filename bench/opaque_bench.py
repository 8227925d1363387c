"""Per-operation cost of OPAQUE-3DH: server registration, server login, client login with
and without Argon2id.

    .venv/bin/python bench/opaque_bench.py [--rounds N] [--smoke]

Prints a table of mean and median wall time per operation (single thread).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from backvault.opaque import Argon2idKSF, IdentityKSF, OpaqueConfig, client, server

CRED = b"bench-account"


def measure(fn: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--argon-rounds", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="a few rounds, cheap Argon2id")
    args = parser.parse_args()
    rounds, argon_rounds = args.rounds, args.argon_rounds
    argon = Argon2idKSF()
    if args.smoke:
        rounds, argon_rounds = 3, 1
        argon = Argon2idKSF(time_cost=1, memory_cost_kib=1024, parallelism=1)

    fast = OpaqueConfig(ksf=IdentityKSF())
    slow = OpaqueConfig(ksf=argon)
    keys = server.generate_server_key_pair()
    seed = server.generate_oprf_seed()
    request, reg_state = client.create_registration_request(b"password")
    response = server.create_registration_response(request, keys.public_key, CRED, seed)
    record, _ = client.finalize_registration_request(reg_state, response, fast)
    slow_record, _ = client.finalize_registration_request(reg_state, response, slow)

    def server_registration() -> None:
        server.create_registration_response(request, keys.public_key, CRED, seed)

    def client_registration(config: OpaqueConfig) -> Callable[[], None]:
        def run() -> None:
            req, state = client.create_registration_request(b"password")
            resp = server.create_registration_response(req, keys.public_key, CRED, seed)
            client.finalize_registration_request(state, resp, config)

        return run

    ke1, client_state = client.generate_ke1(b"password")

    def server_login() -> None:
        ke2, state = server.generate_ke2(fast, keys, record, CRED, seed, ke1)
        # finishing needs a matching KE3; the MAC check is negligible next to KE2
        del ke2, state

    def full_server_login() -> None:
        k1, cs = client.generate_ke1(b"password")
        ke2, state = server.generate_ke2(fast, keys, record, CRED, seed, k1)
        result = client.generate_ke3(cs, ke2, fast)
        server.server_finish(state, result.ke3)

    def client_login(config: OpaqueConfig, rec: object) -> Callable[[], None]:
        ke2, _ = server.generate_ke2(config, keys, rec, CRED, seed, ke1)  # type: ignore[arg-type]

        def run() -> None:
            k1, cs = client.generate_ke1(b"password")
            del k1
            # re-use the precomputed KE2 answering the first KE1
            client.generate_ke3(client_state, ke2, config)
            del cs

        return run

    rows = [
        ("server: registration response", measure(server_registration, rounds)),
        ("server: KE2 (login start)", measure(server_login, rounds)),
        ("client+server: whole login, Identity KSF", measure(full_server_login, rounds)),
        ("registration round, Identity KSF", measure(client_registration(fast), rounds)),
        ("client: KE1+KE3, Identity KSF", measure(client_login(fast, record), rounds)),
        (
            f"registration round, Argon2id t={argon.time_cost} "
            f"m={argon.memory_cost_kib}KiB p={argon.parallelism}",
            measure(client_registration(slow), argon_rounds),
        ),
        ("client: KE1+KE3, Argon2id", measure(client_login(slow, slow_record), argon_rounds)),
    ]
    print(f"{'operation':<66} {'mean ms':>9} {'median ms':>10} {'n':>5}")
    for name, times in rows:
        mean = statistics.fmean(times) * 1000
        median = statistics.median(times) * 1000
        print(f"{name:<66} {mean:>9.2f} {median:>10.2f} {len(times):>5}")


if __name__ == "__main__":
    main()
