"""Compile-time cost of the rewrites: ms per 1000 ATen nodes and share of the whole compile.

Runs in one process on the fake process group (TP = 8), the reference TP Llama with
8, 16, 32 and 64 layers, inner compiler "eager" (so the whole compile is Dynamo + AOT +
our rewrites; Inductor would add its own codegen time on top). Writes JSON.

    python bench/compile_cost.py [--out bench/out/compile_cost.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from tp_passes.backend import tp_passes_backend
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.report import all_reports, reset_reports

CASES = {
    "sequence_parallel": {"sequence_parallel": True},
    "flashcomm2=1 + SP": {"flashcomm2": 1, "sequence_parallel": True},
}


def measure(layers: int, opts: dict, tokens: int = 64) -> dict:
    torch._dynamo.reset()
    reset_reports()
    model = RefLlama(
        ModelConfig(
            vocab=256, hidden=128, heads=16, kv_heads=8, head_dim=8, intermediate=256, layers=layers
        ),
        dist.group.WORLD,
    )
    ids = torch.arange(tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=tp_passes_backend, options=dict(opts, inner="eager"))(ids)
    total_ms = (time.perf_counter() - t0) * 1e3
    reps = all_reports()
    nodes = sum(r.nodes for r in reps)
    rewrite_ms = sum(r.rewrite_ms for r in reps)
    by_family: dict[str, float] = {}
    for r in reps:
        for family, ms in r.rewrite_ms_by_family.items():
            by_family[family] = by_family.get(family, 0.0) + ms
    return {
        "layers": layers,
        "graphs": len(reps),
        "aten_nodes": nodes,
        "rewrite_ms": round(rewrite_ms, 2),
        "rewrite_ms_per_1000_nodes": round(1000 * rewrite_ms / nodes, 2),
        "compile_ms_total": round(total_ms, 2),
        "rewrite_share_of_compile": round(rewrite_ms / total_ms, 4),
        # find + decide + replace + finish per family; "common": sites, agreement, lint
        "share_by_family": {f: round(ms / total_ms, 4) for f, ms in sorted(by_family.items())},
        "rewrites_applied": sum(e.applied for r in reps for e in r.entries),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out/compile_cost.json")
    parser.add_argument("--layers", type=int, nargs="*", default=[8, 16, 32, 64])
    args = parser.parse_args()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    torch.set_num_threads(1)
    results = {"world": 8, "tp": 8, "inner": "eager", "cases": {}}
    for name, opts in CASES.items():
        results["cases"][name] = [measure(layers, opts) for layers in args.layers]
        for row in results["cases"][name]:
            print(name, row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
