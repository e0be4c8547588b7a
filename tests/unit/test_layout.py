"""Rank layout math against an independent construction (torch reshape/permute, as vLLM
builds its groups), for every factorisation of world sizes 1-64."""

import itertools

import pytest
import torch

from tp_passes import RankLayout

SIZES = (1, 2, 4, 8)


def all_layouts():
    for world in range(1, 65):
        for tp, dp, pp, pcp in itertools.product(SIZES, repeat=4):
            if world % (tp * dp * pp * pcp) == 0:
                yield world, tp, dp, pp, pcp


LAYOUTS = list(all_layouts())


def reference_groups(grid: torch.Tensor, axis: int) -> list[list[int]]:
    """Groups along `axis` of `grid`, ordered by the other axes (vLLM's construction)."""
    moved = grid.movedim(axis, -1)
    return moved.reshape(-1, grid.shape[axis]).tolist()


def grid_of(world, tp, dp, pp, pcp):
    return torch.arange(world).reshape(-1, dp, pp, pcp, tp)


def assert_partition(groups, world):
    flat = sorted(r for g in groups for r in g)
    assert flat == list(range(world))


def test_layout_count_is_exhaustive():
    assert len(LAYOUTS) > 500
    assert any(pp > 1 and pcp > 1 and dp > 1 and tp > 1 for _, tp, dp, pp, pcp in LAYOUTS)


@pytest.mark.parametrize("world,tp,dp,pp,pcp", LAYOUTS)
def test_axis_groups_match_reference(world, tp, dp, pp, pcp):
    L = RankLayout(world, tp=tp, dp=dp, pp=pp, pcp=pcp)
    grid = grid_of(world, tp, dp, pp, pcp)
    assert L.external_dp == grid.shape[0]
    assert L.tp_groups() == reference_groups(grid, 4)
    assert L.pcp_groups() == reference_groups(grid, 3)
    assert L.pp_groups() == reference_groups(grid, 2)
    assert L.dp_groups() == reference_groups(grid, 1)
    shared = grid.permute(0, 2, 1, 3, 4).reshape(-1, dp * pcp * tp).tolist()
    assert L.shared_weight_groups() == shared
    assert L.mc2_groups() == shared
    for groups in (L.tp_groups(), L.dp_groups(), L.pp_groups(), L.pcp_groups(), shared):
        assert_partition(groups, world)

    for k in SIZES:
        if dp % k:
            with pytest.raises(ValueError, match=f"k={k}"):
                L.module_tp_groups(k)
            continue
        # chunks of k consecutive DP indices, at fixed external-DP/PP/PCP/TP index
        chunks = grid.reshape(-1, dp // k, k, pp, pcp, tp).movedim(2, -1).reshape(-1, k)
        got = L.module_tp_groups(k)
        assert got == chunks.tolist()
        assert_partition(got, world)
        for g in got:  # members differ only in DP index, consecutively
            coords = [divmod(r, pp * pcp * tp) for r in g]
            assert len({c[1] for c in coords}) == 1
            dps = [c[0] % dp for c in coords]
            assert dps == list(range(dps[0], dps[0] + k))

    for m in range(1, tp):
        if tp % m:
            continue
        G = tp // m
        otp, odp = L.flashcomm2_groups(m)
        ref_otp, ref_odp = [], []
        for tp_group in reference_groups(grid, 4):
            for i in range(G):
                ref_otp.append([tp_group[i + j * G] for j in range(m)])
            for b in range(m):
                ref_odp.append(tp_group[b * G : (b + 1) * G])
        assert otp == ref_otp and odp == ref_odp
        assert_partition(otp, world)
        assert_partition(odp, world)


def test_pp_gt_1_module_tp_is_not_the_pp_dp_tp_reshape():
    # vllm-ascend reshapes (pp, dp, tp), which disagrees with the (dp, pp, tp) grid.
    L = RankLayout(8, tp=2, dp=2, pp=2)
    assert L.module_tp_groups(2) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    wrong = torch.arange(8).reshape(2, 2, 2)[:, :, :].permute(0, 2, 1).reshape(-1, 2).tolist()
    assert L.module_tp_groups(2) != wrong
    # a module TP group must stay inside one PP stage
    stage = {r: (r // 2) % 2 for r in range(8)}
    assert all(len({stage[r] for r in g}) == 1 for g in L.module_tp_groups(2))


def test_biren_supernode_layout_from_islands():
    L = RankLayout(
        16, tp=8, pp=2, islands=[[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    )
    assert L.tp_groups() == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    assert L.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert L.dp_groups() == [[r] for r in [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]]


def test_islands_keep_every_tp_group_inside_one_island():
    islands = [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
    for tp in (1, 2, 4, 8):
        L = RankLayout(16, tp=tp, dp=16 // tp, islands=islands)
        for g in L.tp_groups():
            assert any(set(g) <= set(i) for i in islands)
        for groups in (L.tp_groups(), L.dp_groups(), L.module_tp_groups(2)):
            assert_partition(groups, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=12, tp=8), "world_size=12.*tp=8"),
        (dict(world_size=8, tp=2, dp=8), "world_size=8 is not divisible by dp\\*pp\\*pcp\\*tp=16"),
        (dict(world_size=8, tp=0), "tp must be a positive int"),
        (dict(world_size=0), "world_size must be a positive int"),
        (dict(world_size=8, pp=3), "world_size=8.*pp=3"),
        (dict(world_size=8, pcp=-1), "pcp"),
        (
            dict(world_size=8, tp=4, islands=[[0, 1, 2, 3, 4, 5], [6, 7]]),
            "islands\\[0\\] has 6 ranks.*tp=4",
        ),
        (dict(world_size=4, tp=2, islands=[[0, 1], [1, 2]]), "islands.*missing \\[3\\].*\\[1\\]"),
        (dict(world_size=4, tp=2, islands=[[0, 1], [2, 9]]), "islands.*out of range \\[9\\]"),
    ],
)
def test_invalid_layouts_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankLayout(**kwargs)


def test_invalid_group_sizes_name_the_numbers():
    L = RankLayout(8, tp=4, dp=2)
    with pytest.raises(ValueError, match="k=4 does not divide dp=2"):
        L.module_tp_groups(4)
    with pytest.raises(ValueError, match="m=4 must divide tp=4"):
        L.flashcomm2_groups(4)
    with pytest.raises(ValueError, match="m=3 must divide tp=4"):
        L.flashcomm2_groups(3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        L.module_tp_groups(0)


def test_layout_inferred_from_tp_groups():
    # contiguous TP groups: the plain grid
    L, why = RankLayout.infer([[(0, 1)], [(0, 1)], [(2, 3)], [(2, 3)]])
    assert why == "" and L == RankLayout(4, tp=2, dp=2)
    # strided TP groups become islands; module TP then pairs ranks at the same TP index
    L, _ = RankLayout.infer([[(0, 2)], [(1, 3)], [(0, 2)], [(1, 3)]])
    assert L.tp_groups() == [[0, 2], [1, 3]] and L.module_tp_groups(2) == [[0, 1], [2, 3]]
    # no all-reduce: pure DP
    assert RankLayout.infer([[], [], []])[0] == RankLayout(3, dp=3)
    # groups that do not partition the world, or several groups on one rank: no layout
    assert RankLayout.infer([[(0, 1)], [(0, 1)], [(1, 2)], [(2, 3)]])[0] is None
    L, why = RankLayout.infer([[(0, 1), (0, 2)], [(0, 1)], [], []])
    assert L is None and "more than one group" in why


# -- shared-weight series schedule ---------------------------------------------------------


def test_series_schedule_ring_never_overwrites_a_pending_window():
    from tp_passes.groups.layout import SeriesSchedule

    for length in range(2, 8):
        for k in range(2, 5):
            for p in range(0, length - 1):
                s = SeriesSchedule(length, k, p)
                assert s.error() == ""
                assert sorted(i for j in range(k) for i in s.owned(j)) == list(range(length))
                assert all(s.owner(i) == i % k for i in range(length))
                for j in range(k):
                    assert s.resident_layers(j) == len(s.owned(j)) + p + 1
                holds = {}  # window -> step whose layer it holds
                for w in range(p):  # filled before the first step
                    holds[s.window(w)] = w
                for step in range(3 * length):  # three forwards: the ring wraps
                    ahead = step + p
                    # the window written now held a step that has already run
                    assert holds.get(s.window(ahead), -1) < step or ahead == step
                    holds[s.window(ahead)] = ahead
                    assert holds[s.window(step)] == step  # this step reads its own layer
                    assert s.layer(step) == step % length


def test_series_schedule_errors_name_the_numbers():
    from tp_passes.groups.layout import SeriesSchedule

    assert "prefetch_step=3 must be in [0, 2]" in SeriesSchedule(4, 2, 3).error()
    assert "at least 2 layers, found 1" in SeriesSchedule(1, 2, 0).error()
    assert "1 rank" in SeriesSchedule(4, 1, 0).error()
