"""Restore speed on a normal tree (no attack): 40 folders of 100 files (4 KiB and 600 KiB)
and a 6 MiB file each, about 500 MB. `speed.py DIR make` (after `backvault init` of DIR/repo with
HOME=DIR BACKVAULT_CONFIG_DIR=DIR/c BACKVAULT_CACHE_DIR=DIR/cc BACKVAULT_KEYRING=file), then
`speed.py DIR run`: time and peak RSS of one restore."""

import os
import subprocess
import sys
import time
from pathlib import Path

from measure import cli_env, timed

base = Path(sys.argv[1])
env = cli_env(base)
cli = [sys.executable, "-m", "backvault.cli", "-r", str(base / "repo")]
if sys.argv[2] == "make":
    src = base / "src"
    rnd = os.urandom(1 << 20)
    for d in range(40):
        (src / f"d{d}" / "sub").mkdir(parents=True)
        for f in range(100):
            size = 4096 if f % 10 else (600 << 10)
            with open(src / f"d{d}" / "sub" / f"f{f}", "wb") as fh:
                fh.write(os.urandom(16) + rnd[(f * 7919) % 1000 :][:size])
        with open(src / f"d{d}" / "big", "wb") as fh:
            fh.write(os.urandom(6 << 20))
    print(
        subprocess.run(
            [*cli, "backup", str(src)], env=env, capture_output=True, text=True
        ).returncode
    )
else:
    out = base / f"out{time.time()}"
    p, secs, maxrss = timed([*cli, "restore", "latest", "--target", str(out)], env)
    print(
        "rc",
        p.returncode,
        f"secs {secs:.2f}",
        f"maxrss MB {maxrss}",
        p.stderr[-300:],
    )
    subprocess.run(["rm", "-rf", str(out)])
