"""CPU demo: spawn gloo ranks, show the groups, compile a TP Llama with each rewrite.

python -m tp_passes.demo [--world 4] [--tokens 37]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from tp_passes.config import TPConfig
from tp_passes.groups import RankLayout, get_group_info, init_groups, required_groups
from tp_passes.testing import run_ranks


def _groups_on_rank(rank: int, world: int, layout: RankLayout, config: TPConfig) -> dict:
    init_groups(config, layout)
    out = {}
    for name in required_groups(config, layout):
        info = get_group_info(name)
        x = torch.ones(1)
        dist.all_reduce(x, group=info.pg)  # proves the group works
        out[name] = (list(info.ranks), int(x.item()))
    return out


def show_groups(world: int) -> None:
    layout = RankLayout(world, tp=2, dp=world // 2)
    config = TPConfig(lmhead_tp=world // 2, embedding_tp=2, flashcomm2=1)
    print(f"== groups for {layout} and {config.module_tp_sizes()} + flashcomm2=1")
    per_rank = run_ranks(_groups_on_rank, world, layout, config)
    for name in required_groups(config, layout):
        seen = sorted({tuple(r[name][0]) for r in per_rank})
        sums = {r[name][1] for r in per_rank}
        print(f"  {name:9s} {[list(g) for g in seen]}  all_reduce(1) = {sorted(sums)}")


BACKEND_CASES = {
    "auto (defaults)": {},
    "sequence_parallel=True": {"sequence_parallel": True},
    "flashcomm2=1": {"flashcomm2": 1, "sequence_parallel": False},
    "flashcomm2=1 + SP": {"flashcomm2": 1, "sequence_parallel": True},
    "flashcomm2=2 + SP": {"flashcomm2": 2, "sequence_parallel": True},
}


def _compile_on_rank(rank: int, world: int, tokens: int, cases: dict) -> list[dict]:
    from tp_passes.backend import tp_passes_backend
    from tp_passes.testing.models import ModelConfig, RefLlama
    from tp_passes.report import all_reports

    out = []
    ids = torch.randint(0, 96, (tokens,), generator=torch.Generator().manual_seed(0))
    for name, opts in cases.items():
        torch._dynamo.reset()
        model = RefLlama(ModelConfig(layers=4, o_proj_bias=True), dist.group.WORLD)
        with torch.no_grad():
            ref = model(ids)
            got = torch.compile(
                model, backend=tp_passes_backend, options=dict(opts, inner="eager")
            )(ids)
        rep = all_reports()[-1]
        applied: dict[str, int] = {}
        for e in rep.entries:
            if e.applied:
                applied[e.rewrite] = applied.get(e.rewrite, 0) + 1
        site = next(e for e in rep.entries if e.module.endswith("o_proj"))
        out.append(
            {
                "case": name,
                "choice": (site.module, site.details.get("cost", {})),
                "applied": applied,
                "collectives": rep.collectives,
                "bytes_before": rep.wire_bytes_before,
                "bytes_after": rep.wire_bytes_after,
                "max_abs_diff": (got - ref).abs().max().item(),
            }
        )
    return out


def show_backend(world: int, tokens: int) -> None:
    print(
        f"\n== torch.compile(backend='tp_passes') on a 4-layer TP Llama, "
        f"TP={world}, T={tokens} tokens"
    )
    per_rank = run_ranks(_compile_on_rank, world, tokens, BACKEND_CASES, timeout=600)
    print(
        f"  {'case':28s} {'rewrites applied':52s} {'bytes/rank before -> after':28s} "
        "max|diff| (worst rank)"
    )
    for i, row in enumerate(per_rank[0]):
        diff = max(r[i]["max_abs_diff"] for r in per_rank)
        applied = ", ".join(f"{k} x{v}" for k, v in sorted(row["applied"].items()))
        moved = f"{row['bytes_before']:,} -> {row['bytes_after']:,}"
        print(f"  {row['case']:28s} {applied:52s} {moved:28s} {diff:.2e}")
        print(f"  {'':28s} collectives: {row['collectives']}")
        module, c = row["choice"]
        if c.get("predicted_us"):
            predicted = ", ".join(f"{k} {v:.0f} us" for k, v in c["predicted_us"].items())
            print(f"  {'':28s} cost model at {module}: {predicted} -> {c['chosen']}")


DP_CONFIG = dict(
    vocab=4000, hidden=256, heads=8, kv_heads=4, head_dim=32, intermediate=688, layers=2
)


def _module_tp_on_rank(rank: int, world: int, k: int, tokens: int) -> list[dict]:
    from tp_passes.testing.models import ModelConfig, RefLlama
    from tp_passes.report import all_reports

    torch._dynamo.reset()
    cfg = ModelConfig(**DP_CONFIG)
    ids = torch.randint(0, cfg.vocab, (tokens,), generator=torch.Generator().manual_seed(rank))
    model = RefLlama(cfg, None)  # pure DP: every rank holds every weight, serves its own ids
    opts = {"inner": "eager", "oproj_tp": k, "embedding_tp": k, "lmhead_tp": k, "mlp_tp": k}
    with torch.no_grad():
        ref = model(ids)
        got = torch.compile(model, backend="tp_passes", options=opts)(ids)
    rows: dict[str, dict] = {}
    for e in all_reports()[-1].entries:
        r = rows.setdefault(e.rewrite, {"matches": 0, "before": 0, "after": 0, "wire": 0})
        r["matches"] += 1
        r["before"] += e.details["weight_bytes_before"]
        r["after"] += e.details["weight_bytes_after"]
        r["wire"] += e.details["wire_bytes_per_step"]
    diff = (got - ref).abs().max().item()
    return [dict(rewrite=name, diff=diff, **r) for name, r in sorted(rows.items())]


def show_module_tp(world: int, tokens: int) -> None:
    k = 2
    print(
        f"\n== module TP across DP ranks: {world} pure-DP ranks, groups of k={k}, "
        f"T={tokens} tokens each"
    )
    per_rank = run_ranks(_module_tp_on_rank, world, k, tokens, timeout=600)
    print(
        f"  {'rewrite':14s} {'matches':>7s} {'weight MB/rank before -> after':>32s} "
        f"{'bytes/step/rank':>16s}  max|diff| of the output, worst rank"
    )
    for i, row in enumerate(per_rank[0]):
        diff = max(r[i]["diff"] for r in per_rank)
        mb = f"{row['before'] / 1e6:.3f} -> {row['after'] / 1e6:.3f}"
        print(
            f"  {row['rewrite']:14s} {row['matches']:7d} {mb:>32s} {row['wire']:16,d}  {diff:.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=37)
    args = parser.parse_args(argv)
    show_groups(args.world)
    show_backend(args.world, args.tokens)
    show_module_tp(args.world, args.tokens)


if __name__ == "__main__":
    main()
