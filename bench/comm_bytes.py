"""Bytes on the wire per rank per forward, counted from the compiled graph, against the
analytic minimum, for every rewrite.

Counted: the final graph of `torch.compile(backend="tp_passes")` on the reference TP
Llama, executed on the fake process group (8 ranks; real shapes, no real traffic), each
collective costed as a ring algorithm would move it (`tp_passes.wire`). Analytic: the
formulas below, written from the rewrite's math and the model's shapes alone. T is a
multiple of every group size, so no padding is needed and the two must agree exactly;
the last case pads (T = 37 on 8 ranks) and says so.

    python bench/comm_bytes.py [--out bench/out/comm_bytes.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from tp_passes.groups import destroy_groups
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.report import all_reports, reset_reports

N = 8
E = 4  # fp32 bytes
CFG = ModelConfig(
    vocab=256, hidden=64, heads=16, kv_heads=8, head_dim=8, intermediate=128, layers=2
)
H, A, V, L, I = CFG.hidden, CFG.heads * CFG.head_dim, CFG.vocab, CFG.layers, CFG.intermediate


def rs(n, nbytes):  # reduce-scatter of an nbytes input
    return (n - 1) * nbytes / n


def ag(n, out_bytes):  # all-gather producing out_bytes
    return (n - 1) * out_bytes / n


def a2a(n, nbytes):
    return (n - 1) * nbytes / n


def ar(n, nbytes):
    return 2 * (n - 1) * nbytes / n


def analytic(case: str, T: int, k: int = N) -> float:
    th = T * H * E
    n_ar = 1 + 2 * L  # embedding + o_proj + down_proj per layer
    if case == "original (TP all-reduce)":
        return n_ar * ar(N, th)
    if case == "sequence_parallel":  # every all-reduce -> reduce-scatter + one all-gather each
        return n_ar * (rs(N, th) + ag(N, th))
    if case == "flashcomm2=1":  # o_proj: all_to_all of x_r [T, A/n] + all_gather of [T/n, H]
        return L * (a2a(N, T * A // N * E) + ag(N, th)) + (1 + L) * ar(N, th)
    if case == "flashcomm2=2":
        m, G = 2, N // 2
        per = a2a(G, T * A // N * E) + rs(m, m * T // N * H * E) + ag(N, th)
        return L * per + (1 + L) * ar(N, th)
    # module TP in pure DP, group of k: every collective carries k ranks' tokens
    if case == "oproj_tp":  # by output rows: gather x, all_to_all my H/k columns back
        return L * (ag(k, k * T * A * E) + a2a(k, th))
    if case == "embedding_tp":
        return ag(k, k * T * 8) + rs(k, k * th)  # int64 ids
    if case == "lmhead_tp":
        return ag(k, k * th) + a2a(k, k * T * (V // k) * E)
    if case == "mlp_tp":  # gather x and the intermediate, all_to_all my H/k columns back
        return L * (ag(k, k * th) + ag(k, k * T * I * E) + a2a(k, th))
    raise KeyError(case)


CASES = {  # case -> (TP group for the model, options)
    "original (TP all-reduce)": (
        True,
        {"sequence_parallel": False, "fuse_mm_reduce_scatter": False},
    ),
    "sequence_parallel": (True, {"sequence_parallel": True}),
    "flashcomm2=1": (True, {"flashcomm2": 1, "sequence_parallel": False}),
    "flashcomm2=2": (True, {"flashcomm2": 2, "sequence_parallel": False}),
    "oproj_tp": (False, {"oproj_tp": 4}),
    "embedding_tp": (False, {"embedding_tp": 4}),
    "lmhead_tp": (False, {"lmhead_tp": 4}),
    "mlp_tp": (False, {"mlp_tp": 4}),
}


def counted(tp: bool, opts: dict, T: int) -> tuple[float, list]:
    torch._dynamo.reset()
    reset_reports()
    destroy_groups()  # each case infers its own layout (TP model vs pure DP)
    model = RefLlama(CFG, dist.group.WORLD if tp else None)
    with torch.no_grad():
        torch.compile(model, backend="tp_passes", options=dict(opts, inner="eager"))(
            torch.arange(T) % V
        )
    rep = all_reports()[-1]
    return rep.wire_bytes_after, rep.wire_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out/comm_bytes.json")
    args = parser.parse_args()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)
    rows = []
    for T in (64, 37):
        for case, (tp, opts) in CASES.items():
            k = (
                opts.get("oproj_tp")
                or opts.get("embedding_tp")
                or opts.get("lmhead_tp")
                or opts.get("mlp_tp")
                or N
            )
            if T % (N * 2) and case not in ("original (TP all-reduce)", "sequence_parallel"):
                continue  # the padded run only shows the SP padding overhead
            measured, per_op = counted(tp, opts, T)
            expect = analytic(case, T, k)
            row = {
                "case": case,
                "T": T,
                "group": k,
                "measured_bytes_per_rank": measured,
                "analytic_min_bytes_per_rank": expect,
                "measured_over_analytic": round(measured / expect, 4),
                "collectives": per_op,
            }
            if T % N:
                row["note"] = (
                    f"T={T} is padded to {-(-T // N) * N} rows for reduce-scatter/all-gather; "
                    "the analytic minimum is for unpadded T"
                )
            rows.append(row)
            print(
                f"T={T:3d} {case:26s} measured {measured:>10,.0f}  "
                f"analytic {expect:>10,.0f}  ratio {row['measured_over_analytic']}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"world": N, "dtype": "float32", "model": str(CFG), "rows": rows}, indent=2)
    )
    print("wrote", args.out)


if __name__ == "__main__":
    main()
