"""Weight bytes per rank after module TP, for DeepSeek-V3 shapes on the meta device.

Shapes (DeepSeek-V3's config.json): hidden 7168, 128 heads x 128 v_head_dim (o_proj
input 16384), vocab 129280, 61 layers, of which the first 3 have a dense MLP
(intermediate 18432); the MoE layers' experts are not touched by module TP. Weights are
bf16 on the meta device (no memory is allocated); shards are made by the same code the
rewrites use (`weights.derive` with a "shard" spec) on a fake process group of k ranks,
and their bytes are compared with the analytic full/k.

The FlashComm2 rows price the o_proj series per rank at TP n with m = 1 (FlashComm2 keeps
the full-width [7168, 16384] weight of every layer on every rank) against the same with
a shared-weight series over the TP group ("o_shared": layer i kept on rank i mod n, a
ring of prefetch_step + 1 windows), from `SeriesSchedule`, the arithmetic the rewrite
runs; the worst rank (the one owning the most layers) is reported.

The W8A8 run puts these figures next to vllm-ascend's published ones (its Fine-grained TP
guide: DeepSeek-R1-W8A8, DP32, fine-grained TP 8, memory saved per card: o_proj 5.8, LM
head 1.51, FFN 0.9, embedding 1.51, total 9.72 "GB"): in W8A8 the o_proj and MLP weights
are int8, embedding and lm_head stay bf16, and the published numbers match GiB.

    python bench/memory.py [--out bench/out/memory.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from tp_passes import weights
from tp_passes.groups.layout import SeriesSchedule
from tp_passes.patterns import MLPTP, EmbeddingTP, LMHeadTP, OProjTP

HIDDEN, O_IN, VOCAB, LAYERS, DENSE_LAYERS, INTER = 7168, 128 * 128, 129280, 61, 3, 18432
DTYPE = torch.bfloat16

# module -> (count, rewrite, [weight shapes], int8 in W8A8); the shard specs are the rewrite's
MODULES = {
    "o_proj": (LAYERS, OProjTP(), [(HIDDEN, O_IN)], True),
    "embedding": (1, EmbeddingTP(), [(VOCAB, HIDDEN)], False),
    "lm_head": (1, LMHeadTP(), [(VOCAB, HIDDEN)], False),
    "mlp (dense layers)": (DENSE_LAYERS, MLPTP(), [(2 * INTER, HIDDEN), (HIDDEN, INTER)], True),
}
# vllm-ascend's Fine-grained TP guide, memory saved per card at TP 8 (DeepSeek-R1-W8A8)
PUBLISHED_W8A8_K8 = {
    "o_proj": 5.8,
    "embedding": 1.51,
    "lm_head": 1.51,
    "mlp (dense layers)": 0.9,
    "total": 9.72,
}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(k: int, w8a8: bool = False) -> dict:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=k)
    try:
        group = dist.group.WORLD
        rows = {}
        for name, (count, rewrite, shapes, quantized) in MODULES.items():
            full = shard = 0
            dtype = torch.int8 if w8a8 and quantized else DTYPE
            for shape, (kind, dim) in zip(shapes, rewrite.shard_specs(len(shapes))):
                w = torch.empty(shape, dtype=dtype, device="meta")
                s = weights.derive(w, weights.WeightSpec(kind, dim, group))
                full += nbytes(w) * count
                shard += nbytes(s) * count
            analytic = full / k
            rows[name] = {
                "full_bytes_per_rank": full,
                "sharded_bytes_per_rank": shard,
                "analytic_bytes_per_rank": analytic,
                "measured_over_analytic": round(shard / analytic, 4),
                "saved_GB_per_rank": round((full - shard) / 1e9, 3),
                "saved_GiB_per_rank": round((full - shard) / 2**30, 3),
            }
        return rows
    finally:
        dist.destroy_process_group()


def flashcomm2_o_shared(n: int, prefetch: int = 1) -> dict:
    """o_proj bytes per rank at TP n: plain TP, FlashComm2 (m = 1), FlashComm2 + o_shared."""
    layer = HIDDEN * O_IN * DTYPE.itemsize
    sched = SeriesSchedule(LAYERS, n, prefetch)
    worst = max(range(n), key=lambda j: sched.resident_layers(j))
    shared = sched.resident_layers(worst) * layer
    return {
        "tp": n,
        "prefetch_step": prefetch,
        "plain_tp_GiB": round(LAYERS * layer / n / 2**30, 3),
        "flashcomm2_GiB": round(LAYERS * layer / 2**30, 3),
        "flashcomm2_o_shared_GiB": round(shared / 2**30, 3),
        "owned_layers_worst_rank": len(sched.owned(worst)),
        "ring_windows": sched.windows,
        "broadcast_GiB_per_step_worst_rank": round(
            (LAYERS - len(sched.owned(worst))) * layer / 2**30, 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out/memory.json")
    args = parser.parse_args()
    result = {"model": "DeepSeek-V3 shapes", "dtype": str(DTYPE), "k": {}}
    for k in (2, 4, 8):
        result["k"][k] = measure(k)
        for name, row in result["k"][k].items():
            print(
                f"k={k} {name:20s} {row['full_bytes_per_rank'] / 1e9:7.3f} GB -> "
                f"{row['sharded_bytes_per_rank'] / 1e9:7.3f} GB  "
                f"(measured/analytic {row['measured_over_analytic']})"
            )
    measured = measure(8, w8a8=True)
    total = sum(r["saved_GiB_per_rank"] for r in measured.values())
    result["w8a8_k8_vs_vllm_ascend"] = {
        name: {"saved_GiB_per_rank": measured[name]["saved_GiB_per_rank"], "published": pub}
        for name, pub in PUBLISHED_W8A8_K8.items()
        if name != "total"
    } | {"total": {"saved_GiB_per_rank": round(total, 3), "published": 9.72}}
    for name, row in result["w8a8_k8_vs_vllm_ascend"].items():
        print(
            f"W8A8 k=8 {name:20s} saved {row['saved_GiB_per_rank']:6.3f} GiB per rank "
            f"(vllm-ascend published {row['published']})"
        )
    result["flashcomm2_o_proj"] = [flashcomm2_o_shared(n) for n in (8, 16)]
    for row in result["flashcomm2_o_proj"]:
        print(
            f"o_proj TP {row['tp']:2d}: plain TP {row['plain_tp_GiB']:6.2f} GiB, FlashComm2 "
            f"{row['flashcomm2_GiB']:6.2f} GiB, FlashComm2 + o_shared (prefetch_step 1) "
            f"{row['flashcomm2_o_shared_GiB']:6.2f} GiB per rank "
            f"({row['broadcast_GiB_per_step_worst_rank']} GiB broadcast per step)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
