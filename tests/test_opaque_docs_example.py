"""The worked example in docs/opaque.md runs as written, between two real processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "opaque.md"


def test_docs_two_process_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "opaque_demo.py"
    script.write_text(blocks[0])
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out[0].startswith("registered; export_key")
    assert out[1] == "correct horse -> welcome ; same export_key: True"
    assert out[2] == "wrong horse -> wrong password, the server counted a guess"


def test_opaque_bench_smoke() -> None:
    bench = DOC.parent.parent / "bench" / "opaque_bench.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "server: KE2 (login start)" in out.stdout
