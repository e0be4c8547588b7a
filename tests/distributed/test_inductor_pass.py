"""`tp_passes.TPPass` as Inductor's post-grad custom pass with the default Inductor backend,
on real gloo ranks: outputs equal the uncompiled model on every rank, and a second set of
processes that reuses Inductor's FX graph cache (the pass does not run) still does."""

import pytest
import torch
import torch.distributed as dist

from tp_passes.testing import run_ranks

T = 13  # not a multiple of 2 or 4


def _compile_and_compare(rank, world, cache_dir):
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
        got = torch.compile(model, options={"post_grad_custom_post_pass": pass_})(ids)
    entries = last_report() if counters["inductor"]["fxgraph_cache_miss"] else []
    return {
        "err": (got - ref).abs().max().item() / ref.abs().max().item(),
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "applied": sorted({e["rewrite"] for e in entries if e["applied"]}),
        "skipped": {e["rewrite"]: e["reason"] for e in entries if not e["applied"]},
    }


@pytest.mark.parametrize("world", [2, 4])
def test_post_grad_pass_equals_uncompiled_and_survives_the_fx_graph_cache(world, tmp_path):
    first = run_ranks(_compile_and_compare, world, str(tmp_path), timeout=400)
    for r in first:
        assert r["err"] < 1e-5 and r["misses"] >= 1 and r["hits"] == 0, r
        assert r["applied"] == ["mm_reduce_scatter", "sequence_parallel"], r
        assert "post-grad pass cannot provide" in r["skipped"]["flashcomm2"], r
    second = run_ranks(_compile_and_compare, world, str(tmp_path), timeout=400)
    for r in second:  # new processes, same cache: the cached rewritten graph, no pass
        assert r["err"] < 1e-5 and r["hits"] >= 1 and r["misses"] == 0, r


def test_uuid_follows_the_config():
    import tp_passes

    a, b = (
        tp_passes.TPPass({"sequence_parallel": True}),
        tp_passes.TPPass({"sequence_parallel": True}),
    )
    assert a.uuid() == b.uuid() and len(a.uuid()) == 64
    assert tp_passes.TPPass({"sequence_parallel": False}).uuid() != a.uuid()
