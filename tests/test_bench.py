"""The benchmarks run and write the JSON they promise (figures are not asserted as timings)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compile_cost_bench_writes_json(tmp_path):
    out = tmp_path / "compile_cost.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "compile_cost.py"), "--layers", "8", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    for rows in data["cases"].values():
        (row,) = rows
        assert row["layers"] == 8 and row["aten_nodes"] > 0
        assert 0 < row["rewrite_share_of_compile"] < 1
        assert abs(row["rewrite_ms_per_1000_nodes"] - 1000 * row["rewrite_ms"] / row["aten_nodes"]) < 0.1
        assert row["rewrites_applied"] > 0
