import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.test_hostile_snapshots import Hostile

mode, depth = sys.argv[1], int(sys.argv[2])
base = Path(tempfile.mkdtemp(prefix="rt3deep-"))
h = Hostile(base / "repo")
name = "n" * 255 if mode == "mem" else "d"
nodes = [h.file("leaf.txt", b"x\n")]
for _ in range(depth):
    nodes = [h.folder(name, nodes)]
sid = h.snapshot(nodes)
args = [
    sys.executable,
    "-m",
    "backvault.cli",
    "-r",
    str(h.path),
    "restore",
    sid,
    "--target",
    str(base / "out"),
]
if mode == "include":
    args += ["--include", "nomatch.txt"]
env = {
    **os.environ,
    "BACKVAULT_KEY": h.key,
    "HOME": str(base),
    "BACKVAULT_CONFIG_DIR": str(base / "c"),
    "BACKVAULT_CACHE_DIR": str(base / "cc"),
    "BACKVAULT_KEYRING": "file",
}
t = time.time()
p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(
    mode,
    depth,
    "rc",
    p.returncode,
    f"secs {time.time() - t:.1f}",
    f"maxrss MB {ru.ru_maxrss // 1024}",
    p.stderr[-300:],
)
subprocess.run(["rm", "-rf", str(base)])
