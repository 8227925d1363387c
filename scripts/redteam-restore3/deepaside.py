import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.test_hostile_snapshots import Hostile

base = Path(tempfile.mkdtemp(prefix="rt3da-"))
h = Hostile(base / "repo")
sid = h.snapshot([h.file("x", b"new x\n")])
t = base / "t"
t.mkdir()
fd = os.open(t, os.O_RDONLY)
os.mkdir("x", dir_fd=fd)
for _ in range(1200):
    nfd = os.open("x", os.O_RDONLY, dir_fd=fd) if _ == 0 else os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = nfd
    os.mkdir("d", dir_fd=fd)
env = {
    **os.environ,
    "BACKVAULT_KEY": h.key,
    "HOME": str(base),
    "BACKVAULT_CONFIG_DIR": str(base / "c"),
    "BACKVAULT_CACHE_DIR": str(base / "cc"),
    "BACKVAULT_KEYRING": "file",
}
p = subprocess.run(
    [
        sys.executable,
        "-m",
        "backvault.cli",
        "-r",
        str(h.path),
        "restore",
        sid,
        "--target",
        str(t),
        "--overwrite",
    ],
    env=env,
    capture_output=True,
    text=True,
)
print("rc", p.returncode, p.stderr[-600:])
print(os.listdir(t))
