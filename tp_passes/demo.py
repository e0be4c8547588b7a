"""CPU demo: spawn gloo ranks, build the groups a config needs, and show them.

    python -m tp_passes.demo [--world 4]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=4)
    args = parser.parse_args(argv)
    show_groups(args.world)


if __name__ == "__main__":
    main()
