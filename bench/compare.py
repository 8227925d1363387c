"""backvault against restic (and borg, when installed) on a chat store, side by side.

    bench/run [--scale 1.0] [--shape chat|db-heavy] [--workdir DIR] [--smoke]

Steps, for each tool: first full backup, a backup with nothing changed, `--mutate 1` (a
day of chatting) then an incremental backup, a restore, and a check that reads all data.
Prints wall time, peak memory (the most memory the tool's processes held together, as the
sum of their proportional set sizes sampled every 50 ms) and repository growth, the true size of the change (changed database
pages + new media), and backvault's ratios.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import backvault  # noqa: E402
from bench.chatstore import SHAPES, build, mutate  # noqa: E402


@dataclass
class Run:
    seconds: float
    max_rss_mb: float
    cpu_seconds: float = 0.0  # user + system, summed over the tool's processes


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int, seen: dict[int, float]) -> None:
    """Record the CPU time (user + system) of a process and its descendants in ``seen``
    (by pid; the last value seen is what a process used, as it may exit before the tool
    does: backvault's workers are children of a fork server, not waited for by it)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            seen[pid] = (int(stats[pid][11]) + int(stats[pid][12])) / _TICK
        todo.extend(children.get(pid, []))


def tree_pss_kib(root: int) -> int:
    """Memory of a process and all its descendants (backvault's worker processes count):
    the sum of their proportional set sizes, so that pages they share (the Python
    interpreter and libraries) count once, not once per process; resident size where
    the kernel has no smaps_rollup."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        for source, field in (
            (f"/proc/{pid}/smaps_rollup", "Pss:"),
            (f"/proc/{pid}/status", "VmRSS:"),
        ):
            try:
                with open(source) as handle:
                    found = [int(line.split()[1]) for line in handle if line.startswith(field)]
            except OSError:
                continue
            if found:
                total += found[0]
                break
        todo.extend(children.get(pid, []))
    return total


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> Run:
    # Start every step with nothing waiting to be written back: the copy of the store and
    # the previous step must not slow the next tool down.
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak_kib = 0
    finished = threading.Event()

    cpu: dict[int, float] = {}

    def sample() -> None:
        nonlocal peak_kib
        while not finished.wait(0.05):
            peak_kib = max(peak_kib, tree_pss_kib(proc.pid))
            tree_cpu(proc.pid, cpu)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    finished.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(cmd[:6])} failed ({code}): {err[-2000:]}")
    # A process too short-lived to be sampled: its own peak resident size. CPU: the
    # processes the tool waited for (wait4 counts those), or what sampling saw, whichever
    # is more (forked workers of a fork server exit unseen by wait4).
    waited = usage.ru_utime + usage.ru_stime
    return Run(seconds, (peak_kib or usage.ru_maxrss) / 1024, max(waited, sum(cpu.values())))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def db_copy(path: Path, to: Path) -> None:
    src = sqlite3.connect(path)
    dst = sqlite3.connect(to)
    src.backup(dst)
    dst.close()
    src.close()


def changed_pages_bytes(before: Path, after: Path) -> int:
    page = 4096
    changed = 0
    with open(before, "rb") as a, open(after, "rb") as b:
        while True:
            x, y = a.read(page), b.read(page)
            if not x and not y:
                return changed
            if x != y:
                changed += len(y) or len(x)


def tools(work: Path) -> dict[str, dict[str, object]]:
    env = {
        **os.environ,
        "BACKVAULT_CONFIG_DIR": str(work / "cfg"),
        "BACKVAULT_CACHE_DIR": str(work / "cache"),
        "BACKVAULT_KEYRING": "file",
        "RESTIC_PASSWORD": "bench",
        "RESTIC_CACHE_DIR": str(work / "rcache"),
        "BORG_PASSPHRASE": "bench",
        "BORG_BASE_DIR": str(work / "borgbase"),
    }
    found: dict[str, dict[str, object]] = {}
    bv = [sys.executable, "-m", "backvault.cli", "-q"]
    found["backvault"] = {
        "env": env,
        "init": lambda repo: [*bv, "-r", str(repo), "init"],
        "backup": lambda repo, src: [*bv, "-r", str(repo), "backup", str(src)],
        "restore": lambda repo, target: [
            *bv,
            "-r",
            str(repo),
            "restore",
            "latest",
            "--target",
            str(target),
        ],
        "check": lambda repo: [*bv, "-r", str(repo), "check", "--read-data"],
    }
    restic = shutil.which("restic")
    if restic:
        found["restic"] = {
            "env": env,
            "init": lambda repo: [restic, "-q", "-r", str(repo), "init"],
            "backup": lambda repo, src: [restic, "-q", "-r", str(repo), "backup", str(src)],
            "restore": lambda repo, target: [
                restic,
                "-q",
                "-r",
                str(repo),
                "restore",
                "latest",
                "--target",
                str(target),
            ],
            "check": lambda repo: [restic, "-q", "-r", str(repo), "check", "--read-data"],
        }
    borg = shutil.which("borg")
    if borg:
        found["borg"] = {
            "env": env,
            "init": lambda repo: [borg, "init", "-e", "repokey-blake2", str(repo)],
            "backup": lambda repo, src: [
                borg,
                "create",
                "--compression",
                "zstd,3",
                f"{repo}::{{now:%Y%m%d%H%M%S%f}}",
                str(src),
            ],
            "restore": lambda repo, target: [
                "sh",
                "-c",
                f"mkdir -p {target} && cd {target} && {borg} extract {repo}::$({borg} list --last 1 --short {repo})",
            ],
            "check": lambda repo: [borg, "check", "--verify-data", str(repo)],
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="chat",
        help="chat: 1.1 GB, mostly media; db-heavy: a 1.45 GB database and 0.2 GB of media",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a tiny store, for CI")
    args = parser.parse_args()
    scale = 0.005 if args.smoke else args.scale
    work = args.workdir or Path(tempfile.mkdtemp(prefix="backvault-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    pristine = work / (f"store-{scale}" if args.shape == "chat" else f"store-{args.shape}-{scale}")
    if not pristine.exists():
        print(f"building the {args.shape} store (scale {scale}) …", flush=True)
        partial = pristine.with_name(pristine.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build(partial, scale, shape=args.shape)
        partial.rename(pristine)
    # A package pip installed has its modules compiled to bytecode; this checkout's are
    # compiled here, once (this environment sets PYTHONDONTWRITEBYTECODE, with which every
    # command compiled ~0.1 s of modules again).
    compileall.compile_dir(Path(backvault.__file__).parent, quiet=1)
    results: dict[str, dict[str, object]] = {}
    true_change = 0
    # backvault's device key cache and settings (restic and borg do not use them); kept
    # after the run, so that its repository can still be opened for a closer look.
    shutil.rmtree(work / "cfg", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    for name, tool in tools(work).items():
        source = work / "chat"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(pristine, source)  # every tool starts from the same bytes
        repo = work / f"repo-{name}"
        shutil.rmtree(repo, ignore_errors=True)
        env = tool["env"]
        subprocess.run(
            tool["init"](repo),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # type: ignore[operator]
        row: dict[str, object] = {}
        row["full"] = timed(tool["backup"](repo, source), env)  # type: ignore[operator]
        row["size_full"] = du(repo)
        row["nochange"] = timed(tool["backup"](repo, source), env)  # type: ignore[operator]
        before_db = work / "before.db"
        db_copy(source / "msgstore.db", before_db)
        media_before = du(source / "Media")
        mutate(source, 1.0)
        after_db = work / "after.db"
        db_copy(source / "msgstore.db", after_db)
        true_change = changed_pages_bytes(before_db, after_db) + du(source / "Media") - media_before
        size_before = du(repo)
        row["incremental"] = timed(tool["backup"](repo, source), env)  # type: ignore[operator]
        row["growth"] = du(repo) - size_before
        target = work / f"restore-{name}"
        shutil.rmtree(target, ignore_errors=True)
        row["restore"] = timed(tool["restore"](repo, target), env)  # type: ignore[operator]
        row["check"] = timed(tool["check"](repo), env)  # type: ignore[operator]
        shutil.rmtree(target, ignore_errors=True)
        results[name] = row
    store_mb = du(pristine) / 2**20
    print(
        f"\nchat store: {store_mb:.0f} MiB (database {(pristine / 'msgstore.db').stat().st_size / 2**20:.0f} MiB); "
        f"{os.cpu_count()} cores; true change after --mutate 1: {true_change / 2**20:.1f} MiB"
    )
    header = f"{'tool':<10} {'full s':>7} {'no-change s':>11} {'incr s':>7} {'growth MiB':>10} {'restore s':>9} {'check s':>8} {'peak MiB':>9}"
    print(header)
    for name, row in results.items():
        peak = max(r.max_rss_mb for r in row.values() if isinstance(r, Run))
        print(
            f"{name:<10} {row['full'].seconds:>7.2f} {row['nochange'].seconds:>11.2f} {row['incremental'].seconds:>7.2f} "  # type: ignore[attr-defined]
            f"{row['growth'] / 2**20:>10.1f} {row['restore'].seconds:>9.2f} {row['check'].seconds:>8.2f} {peak:>9.0f}"
        )  # type: ignore[attr-defined,operator]
    print("\nCPU seconds by step (user + system, all the tool's processes)")
    steps = ("full", "nochange", "incremental", "restore", "check")
    print(f"{'tool':<10} " + " ".join(f"{step:>11}" for step in steps))
    for name, row in results.items():
        print(f"{name:<10} " + " ".join(f"{row[step].cpu_seconds:>11.2f}" for step in steps))  # type: ignore[attr-defined]
    print("\npeak memory by step (MiB, PSS of all the tool's processes)")
    steps = ("full", "nochange", "incremental", "restore", "check")
    print(f"{'tool':<10} " + " ".join(f"{step:>11}" for step in steps))
    for name, row in results.items():
        print(f"{name:<10} " + " ".join(f"{row[step].max_rss_mb:>11.0f}" for step in steps))  # type: ignore[attr-defined]
    if "restic" in results:
        ours, theirs = results["backvault"], results["restic"]
        ratio = {
            k: ours[k].seconds / theirs[k].seconds
            for k in ("full", "nochange", "incremental", "restore", "check")
        }  # type: ignore[attr-defined]
        print(
            "\nbackvault / restic wall time: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items())
        )
        print(
            f"incremental growth: backvault {ours['growth'] / max(1, true_change):.2f}x the true change, "  # type: ignore[operator]
            f"restic {theirs['growth'] / max(1, true_change):.2f}x; restic/backvault growth "  # type: ignore[operator]
            f"{theirs['growth'] / max(1, ours['growth']):.1f}x"
        )  # type: ignore[operator]
    print(
        json.dumps(
            {
                k: {m: (v.__dict__ if isinstance(v, Run) else v) for m, v in row.items()}
                for k, row in results.items()
            }
        )
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
