import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from measure import cli_env, timed

from tests.test_hostile_snapshots import Hostile

folders, per = int(sys.argv[1]), int(sys.argv[2])
base = Path(tempfile.mkdtemp(prefix="rt3cache-"))
h = Hostile(base / "repo")
top = []
for f in range(folders):
    nodes = [{"name": f"{f}-{i:07d}", "type": "fifo"} for i in range(per)]
    top.append(h.folder(f"dir{f}", nodes))
sid = h.snapshot(top)
size = sum(p.stat().st_size for p in (base / "repo").rglob("*") if p.is_file())
env = cli_env(base, h.key)
# a target on a 64 KiB tmpfs: the restore plans (loads every tree), then stops for want of inodes/space
t = base / "t"
t.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=50", "tmpfs", str(t)], check=True)
p, secs, maxrss = timed(
    [sys.executable, "-m", "backvault.cli", "-r", str(h.path), "restore", sid, "--target", str(t)],
    env,
)
print(
    f"{folders}x{per} entries, repo {size // 1024} KiB: rc {p.returncode} {secs:.0f}s maxrss {maxrss} MB",
    p.stderr[-200:].strip(),
)
subprocess.run(["umount", str(t)])
subprocess.run(["rm", "-rf", str(base)])
