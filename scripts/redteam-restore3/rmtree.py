import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.test_hostile_snapshots import Hostile

ATT = 65534
FLIPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
x = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
[os.mkdir(f"d{i}", dir_fd=x) or os.mkfifo(f"p{i}", dir_fd=x) for i in range(40)]
print("ready", flush=True)
r = libc.renameat2
while True:
    for i in range(40): r(x, f"d{i}".encode(), x, f"p{i}".encode(), 2)
"""
base = Path(tempfile.mkdtemp(prefix="rt3rm-"))
os.chmod(base, 0o755)  # noqa: S103 - the attacker must reach it
h = Hostile(base / "repo")
sid = h.snapshot([h.file("x", b"new x\n")])
hung = 0
for attempt in range(int(sys.argv[1])):
    t = base / f"t{attempt}"
    t.mkdir()
    os.chown(t, ATT, ATT)
    (t / "x").mkdir()
    os.chown(t / "x", ATT, ATT)
    fl = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(t / "x")], stdout=subprocess.PIPE, text=True
    )
    assert fl.stdout.readline().strip() == "ready"
    env = {
        **os.environ,
        "BACKVAULT_KEY": h.key,
        "HOME": str(base),
        "BACKVAULT_CONFIG_DIR": str(base / "c"),
        "BACKVAULT_CACHE_DIR": str(base / "cc"),
        "BACKVAULT_KEYRING": "file",
    }
    p = subprocess.Popen(
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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = p.communicate(timeout=15)
        print(attempt, "rc", p.returncode, err.strip()[-200:])
    except subprocess.TimeoutExpired:
        hung += 1
        stack = subprocess.run(
            ["cat", f"/proc/{p.pid}/wchan"], capture_output=True, text=True
        ).stdout
        print(attempt, "HUNG, wchan:", stack)
        p.kill()
        p.communicate()
    fl.kill()
    fl.communicate()
print("hung", hung)
subprocess.run(["rm", "-rf", str(base)])
