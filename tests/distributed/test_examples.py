"""README's standalone example runs as it is, under torchrun, and is exact on every rank."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_standalone_example_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "standalone.py")],  # --standalone: a free port of its own
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # the ranks' lines may run together (print writes the newline separately)
    lines = re.findall(r"rank (\d): max \|diff\| ([0-9.e+-]+); applied: (\[[^\]]*\])", run.stdout)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], run.stdout
    for _, diff, applied in lines:
        assert float(diff) <= 1e-5
        assert applied == "['flashcomm2 at 0.o_proj', 'flashcomm2 at 1.o_proj']", applied
