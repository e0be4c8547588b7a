"""`tp_passes.TPPass` as Inductor's post-grad custom pass with the default Inductor backend,
on real gloo ranks: outputs equal the uncompiled model on every rank, and a second set of
processes that reuses Inductor's FX graph cache (the pass does not run) still does."""

import pytest
import torch
import torch.distributed as dist

from tp_passes.testing import run_ranks

T = 13  # not a multiple of 2 or 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """An Inductor cache of this file's own: empty when its first test starts. Its graphs
    differ (world size, FlashComm2 prepared or not), so each first compile still misses,
    while the kernels they share and the CPU feature probes compile once."""
    return str(tmp_path_factory.mktemp("inductor_cache"))


def _compile_and_compare(rank, world, cache_dir, prepare):
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    import tp_passes
    from tp_passes.report import last_report
    from tp_passes.testing.models import ModelConfig, RefLlama

    inductor_config.fx_graph_cache = True
    torch.manual_seed(0)
    model = RefLlama(ModelConfig(layers=2), dist.group.WORLD)
    ids = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = model(ids)
        pass_ = tp_passes.TPPass({"sequence_parallel": True, "flashcomm2": 1})
        if prepare:  # FlashComm2's gathered o_proj weights, on the real model, before compiling
            pass_.prepare(model)
        got = torch.compile(model, options={"post_grad_custom_post_pass": pass_})(ids)
    entries = last_report() if counters["inductor"]["fxgraph_cache_miss"] else []
    return {
        "err": (got - ref).abs().max().item() / ref.abs().max().item(),
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "applied": sorted({e["rewrite"] for e in entries if e["applied"]}),
        "fc2_applied": sum(e["rewrite"] == "flashcomm2" and e["applied"] for e in entries),
        "skipped": {e["rewrite"]: e["reason"] for e in entries if not e["applied"]},
    }


@pytest.mark.parametrize("world", [2, 4])
def test_post_grad_pass_equals_uncompiled_and_survives_the_fx_graph_cache(world, cache_dir):
    """FlashComm2 planned on the real model by `prepare`, sequence parallelism by the pass
    on the post-grad graph; then new processes reuse Inductor's FX graph cache."""
    first = run_ranks(_compile_and_compare, world, cache_dir, True, timeout=400)
    for r in first:
        assert r["err"] < 1e-5 and r["misses"] >= 1 and r["hits"] == 0, r
        assert r["applied"] == ["flashcomm2", "mm_reduce_scatter", "sequence_parallel"], r
        assert r["fc2_applied"] == 2, r  # o_proj of both layers
    second = run_ranks(_compile_and_compare, world, cache_dir, True, timeout=400)
    for r in second:  # new processes, same cache: the cached rewritten graph, no pass
        assert r["err"] < 1e-5 and r["hits"] >= 1 and r["misses"] == 0, r


def test_weight_rewrites_without_prepare_are_skipped_with_the_reason(cache_dir):
    for r in run_ranks(_compile_and_compare, 2, cache_dir, False, timeout=400):
        assert r["err"] < 1e-5 and r["applied"] == ["mm_reduce_scatter", "sequence_parallel"]
        assert "TPPass.prepare(model)" in r["skipped"]["flashcomm2"], r


def test_uuid_follows_the_config():
    import tp_passes

    a, b = (
        tp_passes.TPPass({"sequence_parallel": True}),
        tp_passes.TPPass({"sequence_parallel": True}),
    )
    assert a.uuid() == b.uuid() and len(a.uuid()) == 64
    assert tp_passes.TPPass({"sequence_parallel": False}).uuid() != a.uuid()
