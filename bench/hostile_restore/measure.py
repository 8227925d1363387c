"""What the scripts here share: the environment of a `backvault` run kept inside one
folder, and one run timed with the peak RSS of the processes it started."""

import os
import resource
import subprocess
import time
from pathlib import Path


def cli_env(base: Path, key: str | None = None) -> dict[str, str]:
    """Config, cache and keyring under ``base`` (and the repository key, if given)."""
    env = {
        **os.environ,
        "HOME": str(base),
        "BACKVAULT_CONFIG_DIR": str(base / "c"),
        "BACKVAULT_CACHE_DIR": str(base / "cc"),
        "BACKVAULT_KEYRING": "file",
    }
    if key is not None:
        env["BACKVAULT_KEY"] = key
    return env


def timed(
    args: list[str], env: dict[str, str], timeout: float | None = None
) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """Run ``args``; gives the process, its seconds and the peak RSS in MB of every child
    process so far (the scripts run one measured command each)."""
    start = time.time()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.time() - start
    return done, seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
