"""Differential tests of the backend on real gloo ranks: original vs rewritten, every rank."""

import functools

import pytest
import torch
import torch.distributed as dist

from tp_passes.backend import tp_passes_backend
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.report import all_reports, last_report
from tp_passes.testing import RankFailure, cases, run_ranks

LAYERS = 2
REWRITES = {
    "sp": {"sequence_parallel": True},  # mm_reduce_scatter "auto": fused where SP applies
    "sp_unfused": {"sequence_parallel": True, "fuse_mm_reduce_scatter": False},
    "fused_only": {"sequence_parallel": False, "fuse_mm_reduce_scatter": True},
    "fc2": {"flashcomm2": 1, "sequence_parallel": False},
    "fc2_sp": {"flashcomm2": 1, "sequence_parallel": True},
    "fc2_m2": {"flashcomm2": 2, "sequence_parallel": True},
    "off": {"sequence_parallel": False, "fuse_mm_reduce_scatter": False},
}


def expected_counts(name: str, world: int) -> dict:
    """Collectives the final graph must hold for a 2-layer model (embedding + 2x2 linears)."""
    n_ar = 1 + 2 * LAYERS
    if name in ("sp", "sp_unfused"):
        return {
            "all_reduce": 0,
            "reduce_scatter_tensor": n_ar,
            "all_gather_into_tensor": 1 + 2 * LAYERS,
        }
    if name == "fused_only":  # embedding all-reduce has no matmul: kept
        return {"all_reduce": 1, "reduce_scatter_tensor": 2 * LAYERS}
    if name == "fc2":
        return {"all_reduce": 1 + LAYERS, "all_to_all_single": LAYERS, "reduce_scatter_tensor": 0}
    if name == "fc2_sp":
        return {"all_reduce": 0, "all_to_all_single": LAYERS, "reduce_scatter_tensor": 1 + LAYERS}
    if name == "fc2_m2":  # extra reduce_scatter over OTP per o_proj
        return {
            "all_reduce": 0,
            "all_to_all_single": LAYERS,
            "reduce_scatter_tensor": 1 + 2 * LAYERS,
        }
    return {"all_reduce": n_ar}


def _cases(rank, world, names, dtypes, shapes, model_kwargs, inner, backend=tp_passes_backend):
    out = []
    for name, dtype, shape in cases(names, dtypes, shapes):  # TPP_SOAK=1: every combination
        torch._dynamo.reset()
        model = RefLlama(ModelConfig(layers=LAYERS, **model_kwargs), dist.group.WORLD).to(dtype)
        ids = torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(sum(shape)))
        opts = dict(REWRITES[name], inner=inner, strict=True)
        with torch.no_grad():
            ref = model(ids)
            got = torch.compile(model, backend=backend, options=opts)(ids)
        rel = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        rep = all_reports()[-1]
        applied = sorted({e["rewrite"] for e in last_report() if e["applied"]})
        out.append((name, str(dtype), shape, rel, rep.collectives, applied))
    return out


def check(results, world):
    assert len(results) == world
    for per_rank in results:
        for name, dtype, shape, rel, collectives, applied in per_rank:
            tol = 1e-5 if dtype == "torch.float32" else 2e-2
            assert rel <= tol, (name, dtype, shape, rel)
            for op, n in expected_counts(name, world).items():
                assert collectives.get(op, 0) == n, (name, op, collectives)
    # every rank saw the same plan
    assert all(
        [r[:3] + r[4:] for r in res] == [r[:3] + r[4:] for r in results[0]] for res in results
    )


@pytest.mark.parametrize("world", [2, 4])
def test_each_rewrite_matches_original(world):
    names = ["sp", "sp_unfused", "fused_only", "fc2", "fc2_sp"] + (["fc2_m2"] if world == 4 else [])
    dtypes, shapes = [torch.float32, torch.bfloat16], [(1,), (7,), (64,)]
    res = run_ranks(_cases, world, names, dtypes, shapes, {}, "eager", timeout=240)
    check(res, world)
    ran = [r[:3] for r in res[0]]  # (rewrite, dtype, shape) of every case that ran
    axes = [set(names), {str(d) for d in dtypes}, set(shapes)]
    assert [{r[i] for r in ran} for i in range(3)] == axes, ran
    for i, j in ((0, 1), (0, 2), (1, 2)):  # every pair of values of any two axes
        assert len({(r[i], r[j]) for r in ran}) == len(axes[i]) * len(axes[j]), (i, j, ran)
    assert {"sequence_parallel", "mm_reduce_scatter"} <= set(res[0][0][5])
    assert "flashcomm2" in res[0][-1][5] or world == 2


@pytest.mark.parametrize("world", [2, 4])
def test_biased_o_proj_rank0_only_and_3d_activations(world):
    # vLLM-style bias on TP rank 0 only; HF-style [B, S] ids -> [B, S, H] activations
    names = ["sp", "fc2", "fc2_sp"] + (["fc2_m2"] if world == 4 else [])
    res = run_ranks(
        _cases,
        world,
        names,
        [torch.float32],
        [(2, 5), (3,)],
        {"o_proj_bias": True},
        "eager",
        timeout=600,
    )
    check(res, world)


def test_in_place_dist_all_reduce_and_entry_point_backend():
    # dist.all_reduce(x) traces to all_reduce + copy_; backend by name through the entry point
    res = run_ranks(
        _cases,
        2,
        ["sp", "fc2_sp"],
        [torch.float32],
        [(7,)],
        {"inplace_all_reduce": True},
        "eager",
        "tp_passes",
    )
    check(res, 2)


def test_unrewritten_when_disabled():
    res = run_ranks(_cases, 2, ["off"], [torch.float32], [(5,)], {}, "eager")
    check(res, 2)
    assert res[0][0][5] == []


@pytest.mark.inductor
def test_inductor_inner_each_rewrite():
    res = run_ranks(_cases, 2, ["sp", "fc2"], [torch.float32], [(7,)], {}, "inductor", timeout=900)
    check(res, 2)


def _dynamic(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=LAYERS), dist.group.WORLD)
    compiled = torch.compile(
        model, backend=tp_passes_backend, options={"inner": "eager", "flashcomm2": 1}, dynamic=True
    )
    diffs = []
    with torch.no_grad():
        for T in (5, 33):
            ids = torch.randint(0, 96, (T,), generator=torch.Generator().manual_seed(T))
            diffs.append((compiled(ids) - model(ids)).abs().max().item())
    return diffs, len(all_reports())


def test_dynamic_token_count_one_graph():
    for diffs, n_graphs in run_ranks(_dynamic, 2):
        assert max(diffs) < 1e-5
        assert n_graphs == 1


def _divergent(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1), dist.group.WORLD)
    opts = {"inner": "eager", "strict": True, "flashcomm2": 1 if rank == 0 else 0}
    with torch.no_grad():
        torch.compile(model, backend=tp_passes_backend, options=opts)(torch.arange(4))


def test_rank_divergent_plan_raises_instead_of_hanging():
    with pytest.raises(RankFailure, match="rewrite plan .* differs across ranks"):
        run_ranks(_divergent, 2, timeout=120)


def _strict_skip(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1, heads=8, kv_heads=4), dist.group.WORLD)
    opts = {"inner": "eager", "strict": True, "flashcomm2": 3}
    with torch.no_grad():
        torch.compile(model, backend=tp_passes_backend, options=opts)(torch.arange(4))


def test_strict_turns_skip_into_error():
    with pytest.raises(RankFailure, match="flashcomm2=3 must divide the TP size n=4"):
        run_ranks(_strict_skip, 4, timeout=120)


def _eager_vs_graph(rank, world, opts, shape, dtype):
    import tp_passes

    torch._dynamo.reset()
    cfg = ModelConfig(layers=LAYERS, o_proj_bias=True)
    ids = torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        original = RefLlama(cfg, dist.group.WORLD).to(dtype)
        ref = original(ids)
        graph = torch.compile(
            original, backend=tp_passes_backend, options=dict(opts, inner="eager")
        )(ids)
        eager_model = RefLlama(cfg, dist.group.WORLD).to(dtype)
        entries = tp_passes.parallelize(eager_model, tp_passes.TPConfig.from_dict(opts))
        eager = eager_model(ids)
    scale = ref.float().abs().max().item()
    return (
        (eager.float() - ref.float()).abs().max().item() / scale,
        (eager.float() - graph.float()).abs().max().item() / scale,
        sorted((e["rewrite"], e["applied"]) for e in entries),
    )


TWIN_OPTS = {2: [{}, {"flashcomm2": 1}], 4: [{}, {"flashcomm2": 1}, {"flashcomm2": 2}]}


def _eager_twin_cases(rank, world, matrix):
    return [_eager_vs_graph(rank, world, TWIN_OPTS[world][i], s, d) for i, d, s in matrix]


@functools.cache
def _eager_twins(world: int) -> dict[int, list[tuple]]:
    """One spawn per world: options index -> [(dtype, shape, per-rank result)]."""
    matrix = cases(range(len(TWIN_OPTS[world])), [torch.float32, torch.bfloat16],
                   [(1,), (7,), (64,), (2, 5)])
    per_rank = run_ranks(_eager_twin_cases, world, matrix, timeout=600)
    out: dict[int, list[tuple]] = {}
    for n, (i, dtype, shape) in enumerate(matrix):
        out.setdefault(i, []).append((dtype, shape, [r[n] for r in per_rank]))
    return out


@pytest.mark.parametrize("world, i", [(w, i) for w, o in TWIN_OPTS.items() for i in range(len(o))])
def test_eager_twin_matches_original_and_graph(world, i):
    opts = TWIN_OPTS[world][i]
    for dtype, shape, ranks in _eager_twins(world)[i]:
        for eager_vs_ref, eager_vs_graph, entries in ranks:
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert eager_vs_ref <= tol and eager_vs_graph <= tol, (
                shape,
                dtype,
                eager_vs_ref,
                eager_vs_graph,
            )
            kinds = {k for k, ok in entries if ok}
            assert ("flashcomm2" in kinds) == bool(opts), entries
            assert len(entries) == 2 * LAYERS


def test_torchair_inner_without_torchair_is_a_clear_error():
    from torch._dynamo.exc import BackendCompilerFailed

    model = torch.nn.Linear(4, 4)
    with pytest.raises(BackendCompilerFailed, match="inner='torchair' needs torchair"):
        with torch.no_grad():
            torch.compile(model, backend=tp_passes_backend, options={"inner": "torchair"})(
                torch.ones(2, 4)
            )
