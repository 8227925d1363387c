import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from measure import cli_env, timed

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
env = cli_env(base, h.key)
p, secs, maxrss = timed(args, env, timeout=1200)
print(
    mode,
    depth,
    "rc",
    p.returncode,
    f"secs {secs:.1f}",
    f"maxrss MB {maxrss}",
    p.stderr[-300:],
)
subprocess.run(["rm", "-rf", str(base)])
