import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.test_hostile_snapshots import Hostile

base = Path(tempfile.mkdtemp(prefix="rt3int-"))
h = Hostile(base / "repo")
sid = h.snapshot(
    [h.folder("notes", [h.file(f"f{i:03d}", os.urandom(2_000_000)) for i in range(150)])]
)
target = base / "out"
target.mkdir()
(target / "notes").write_text("the only copy of my notes\n")
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
        str(target),
        "--overwrite",
    ],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
)
while not (target / "notes").is_dir():
    time.sleep(0.001)
time.sleep(0.2)
p.send_signal(signal.SIGINT)
out, err = p.communicate()
print("rc", p.returncode, err[-400:])
print(
    "notes is",
    "dir" if (target / "notes").is_dir() else "file",
    "holding",
    len(os.listdir(target / "notes")) if (target / "notes").is_dir() else "",
)
found = subprocess.run(
    ["grep", "-rl", "the only copy", str(base)], capture_output=True, text=True
).stdout
print("old content found at:", found or "NOWHERE")
print(os.listdir(target))
