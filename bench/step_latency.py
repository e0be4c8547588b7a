"""Step latency of each rewrite and of "auto", rewritten / original, on gloo ranks; and the
calibration behind the cost model's gloo figures.

    python bench/step_latency.py [--out bench/out/step_latency.json] [--worlds 2,4]
        [--tokens 16,256,1024] [--inner eager]

Per world size (spawned CPU ranks on gloo, TP = world): the reference TP Llama (4 layers,
hidden 512, 8 heads x 64, 4 KV heads, intermediate 1408, vocab 2048, fp32) compiled with a
static token count T, once per variant:

- `original`: torch.compile with the same pipeline and no rewrite (`aot_eager` for inner
  `eager`, `inductor` for inner `inductor`);
- `auto` (no options), `sequence_parallel` (forced), `flashcomm2=1` (SP off),
  `flashcomm2=1 + SP`.

All variants of one T are compiled first (one Dynamo cache entry per backend), then
timed in 21 interleaved rounds (each variant called once per round, in turn), so drift
on a shared machine hits them alike; latency is the median over rounds, the slowest
rank's. Ratios are variant / original; below 1 is faster. `auto` compiles to the
original's graph wherever it keeps every all-reduce, so its spread around 1.0 is the
noise floor of the machine.

Calibration (`calibration` in the JSON): per collective, the median time at 4 KiB and
4 MiB on the real group, fitted to latency + bytes / bandwidth (ring bytes per rank, as
`tp_passes.wire` counts them), and the memory bandwidth of one row-wise op (fp32 add of
8 MiB arrays). The gloo figures in `tp_passes.cost.LINKS` come from this, at world 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.testing.ranks import run_ranks

CFG = ModelConfig(
    vocab=2048, hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1408, layers=4
)
ROUNDS = 21
VARIANTS = {
    "auto": {},
    "sequence_parallel": {"sequence_parallel": True},
    "flashcomm2=1": {"flashcomm2": 1, "sequence_parallel": False},
    "flashcomm2=1 + SP": {"flashcomm2": 1, "sequence_parallel": True},
}


def _agreed_median(times: list[float]) -> float:
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank; the same on every rank
    return float(t)


def _timed_us(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def _median_us(fn, iters: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return _agreed_median([_timed_us(fn) for _ in range(iters)])


def _interleaved_us(fns: dict, rounds: int) -> dict[str, float]:
    """Median per function over `rounds` rounds that call each once, in turn: drift and
    noise on a shared machine hit every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed_us(fn))
    return {name: _agreed_median(t) for name, t in times.items()}


def calibrate(n: int) -> dict:
    """latency_us / gbps per collective on the default (gloo) group, agreed across ranks."""
    g = dist.group.WORLD.group_name
    small, large = 1024, 1024 * 1024  # fp32 elements: 4 KiB, 4 MiB
    ops = {
        # op -> (call, ring bytes per rank for an input of `e` fp32 elements)
        "all_reduce": (lambda x: funcol.all_reduce(x, "sum", g), lambda b: 2 * (n - 1) * b / n),
        "reduce_scatter": (
            lambda x: funcol.reduce_scatter_tensor(x, "sum", 0, g),
            lambda b: (n - 1) * b / n,
        ),
        "all_gather": (
            lambda x: funcol.all_gather_tensor(x[: x.numel() // n], 0, g),
            lambda b: (n - 1) * b / n,
        ),
        "all_to_all": (
            lambda x: funcol.all_to_all_single(x, None, None, g),
            lambda b: (n - 1) * b / n,
        ),
    }
    out = {}
    for op, (call, ring) in ops.items():
        t = {}
        for e in (small, large):
            x = torch.ones(e)
            t[e] = _median_us(lambda: funcol.wait_tensor(call(x)))
        b_small, b_large = ring(small * 4), ring(large * 4)
        us_per_byte = max((t[large] - t[small]) / (b_large - b_small), 1e-9)
        out[op] = {
            "latency_us": round(max(t[small] - b_small * us_per_byte, 0.0), 1),
            "gbps": round(1 / us_per_byte / 1e3, 2),
            "us_4KiB": round(t[small], 1),
            "us_4MiB": round(t[large], 1),
        }
    a, b = torch.randn(2 * large), torch.randn(2 * large)
    us = _median_us(lambda: torch.add(a, b))
    out["mem_gbps"] = round(3 * a.numel() * 4 / us / 1e3, 2)  # read a, b; write the sum
    return out


def _rank(rank: int, world: int, tokens: list[int], inner: str) -> dict:
    torch.set_num_threads(1)
    result: dict = {"calibration": calibrate(world), "latency_us": {}, "auto_choices": {}}
    model = RefLlama(CFG, dist.group.WORLD).eval()
    original_backend = "aot_eager" if inner == "eager" else "inductor"
    with torch.no_grad():
        for t in tokens:
            ids = torch.arange(t) % CFG.vocab
            torch._dynamo.reset()
            base = torch.compile(model, backend=original_backend, dynamic=False)
            fns = {"original": lambda base=base: base(ids)}
            for name, opts in VARIANTS.items():
                fn = torch.compile(
                    model, backend="tp_passes", options={"inner": inner, **opts}, dynamic=False
                )
                fn(ids)  # compiles now: the report below is this variant's
                fns[name] = lambda fn=fn: fn(ids)
                if name == "auto":
                    from tp_passes import last_report

                    sp = [e for e in last_report() if e["rewrite"] == "sequence_parallel"]
                    result["auto_choices"][t] = {
                        "applied": sum(e["applied"] for e in sp),
                        "sites": len(sp),
                        "first_site_cost": sp[0]["details"].get("cost") if sp else None,
                    }
            for fn in fns.values():  # warm-up
                fn()
                fn()
            result["latency_us"][t] = _interleaved_us(fns, ROUNDS)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/step_latency.json")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--tokens", default="16,256,1024")
    ap.add_argument("--inner", default="eager", choices=("eager", "inductor"))
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    doc: dict = {
        "model": str(CFG),
        "inner": args.inner,
        "cpu_count": os.cpu_count(),
        "worlds": {},
    }
    for world in (int(w) for w in args.worlds.split(",")):
        r0 = run_ranks(_rank, world, tokens, args.inner, timeout=3000)[0]
        ratios = {
            t: {k: round(v / row["original"], 3) for k, v in row.items() if k != "original"}
            for t, row in r0["latency_us"].items()
        }
        doc["worlds"][world] = {**r0, "ratio_vs_original": ratios}
        for t, r in ratios.items():
            print(f"world {world} T={t}: " + ", ".join(f"{k} {v:.3f}x" for k, v in r.items()))
        print(f"world {world} calibration: {json.dumps(r0['calibration'])}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
