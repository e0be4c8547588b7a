"""init_groups on real gloo ranks: every group created, usable, and checked."""

import pytest
import torch
import torch.distributed as dist

import tp_passes
from tp_passes.groups import registry
from tp_passes import RankLayout, TPConfig
from tp_passes.groups.registry import required_groups
from tp_passes.owner import owner
from tp_passes.testing import RankFailure, run_ranks

CONFIGS = {
    4: [
        (dict(tp=1, dp=4), TPConfig(oproj_tp=2, lmhead_tp=4, embedding_tp=2, mlp_tp=4)),
        (dict(tp=2, dp=2), TPConfig(lmhead_tp=2, flashcomm2=1)),
        (dict(tp=4, dp=1), TPConfig(flashcomm2=2)),
        (dict(tp=2, pp=2), TPConfig()),
    ],
    8: [
        (dict(tp=2, dp=4), TPConfig(oproj_tp=2, mlp_tp=4, embedding_tp=2)),
        (dict(tp=2, dp=2, pp=2), TPConfig(lmhead_tp=2, mlp_tp=2)),
        (dict(tp=4, dp=2), TPConfig(flashcomm2=2, lmhead_tp=2)),
        (dict(tp=2, dp=2, pcp=2), TPConfig(oproj_tp=2)),
        (dict(tp=8, islands=[[0, 2, 4, 6, 1, 3, 5, 7]]), TPConfig(flashcomm2=4)),
    ],
}


def _check_all_groups(rank, world, cases):
    checked = []
    for layout_kwargs, config in cases:
        layout = RankLayout(world, **layout_kwargs)
        reg = tp_passes.init_groups(config, layout)
        assert tp_passes.init_groups(config, layout) is reg  # idempotent
        n_created = len(owner().created)  # process groups, shared by all registries
        tp_passes.init_groups(config, layout)
        assert len(owner().created) == n_created
        for name, rank_lists in required_groups(config, layout).items():
            mine = sorted(RankLayout.group_of(rank, rank_lists))
            info = tp_passes.get_group_info(name)
            assert list(info.ranks) == mine, (name, info.ranks, mine)
            pg = tp_passes.get_group(name)
            assert dist.get_process_group_ranks(pg) == mine
            x = torch.tensor([float(rank + 1)])
            dist.all_reduce(x, group=pg)
            assert x.item() == sum(r + 1 for r in mine), (name, x.item(), mine)
            checked.append((layout_kwargs.get("tp"), name, mine))
        # equal rank lists are one group
        keys = list(owner().created)
        assert len(keys) == len(set(keys))
        tp_passes.destroy_groups()
    return checked


@pytest.mark.parametrize("world", [4, 8])
def test_init_groups_all_reduce_on_every_group(world):
    out = run_ranks(_check_all_groups, world, CONFIGS[world])
    assert len(out) == world
    n_groups = sum(len(required_groups(c, RankLayout(world, **l))) for l, c in CONFIGS[world])
    assert all(len(r) == n_groups for r in out)


def _shared_groups(rank, world):
    reg = tp_passes.init_groups(TPConfig(oproj_tp=2, mlp_tp=2), RankLayout(world, dp=world))
    return (
        reg.groups["otp"].pg is reg.groups["mlptp"].pg
        and reg.groups["world"].pg is dist.group.WORLD
    )


def test_equal_groups_created_once():
    assert run_ranks(_shared_groups, 4) == [True] * 4


def _wrong_world(rank, world):
    try:
        tp_passes.init_groups(TPConfig(), RankLayout(8, tp=2))
    except ValueError as e:
        return str(e)
    return None


def test_world_size_mismatch_errors_before_any_collective():
    # every rank raises locally: a collective issued by any rank would hang the test
    msgs = run_ranks(_wrong_world, 4, timeout=60)
    assert all("layout.world_size=8" in m and "world size is 4" in m for m in msgs)


def _divergent(rank, world):
    cfg = TPConfig(oproj_tp=2) if rank == 0 else TPConfig(oproj_tp=4)
    tp_passes.init_groups(cfg, RankLayout(world, dp=world))


def test_rank_divergent_config_raises_not_hangs():
    with pytest.raises(RankFailure, match="differs across ranks"):
        run_ranks(_divergent, 4, timeout=60)


def _bad_module_size(rank, world):
    try:
        tp_passes.init_groups(TPConfig(oproj_tp=3), RankLayout(world, dp=world))
    except ValueError as e:
        return str(e)


def test_module_tp_size_not_dividing_dp():
    # the error names the config field, then the layout's reason
    assert (
        run_ranks(_bad_module_size, 4, timeout=60)
        == [
            "tp_passes: TPConfig.oproj_tp=3 does not fit the layout: "
            "RankLayout: module TP size k=3 does not divide dp=4"
        ]
        * 4
    )


def _get_before_init(rank, world):
    try:
        tp_passes.get_group("otp")
    except RuntimeError as e:
        return "not initialized" in str(e)


def test_get_group_before_init():
    assert run_ranks(_get_before_init, 2) == [True, True]
