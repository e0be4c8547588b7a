"""Module TP across DP ranks, graph path: torch.compile(backend="tp_passes") on a pure-DP
model vs the original, on every rank; weight release; equal-token check under strict."""

import pytest
import torch

from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.report import all_reports
from tp_passes.testing import RankFailure, run_ranks

KINDS = ("oproj_tp", "embedding_tp", "lmhead_tp", "mlp_tp")


def _graph(rank, world, k, dtype, shape, model_kwargs, opts):
    torch._dynamo.reset()
    cfg = ModelConfig(layers=2, **{"vocab": 37, "intermediate": 26, **model_kwargs})
    ids = torch.randint(0, cfg.vocab, shape, generator=torch.Generator().manual_seed(10 + rank))
    model = RefLlama(cfg, None).to(dtype)  # pure DP: every rank holds every weight
    with torch.no_grad():
        ref = model(ids)
        options = {"inner": "eager", "strict": True, **{kind: k for kind in KINDS}, **opts}
        got = torch.compile(model, backend="tp_passes", options=options)(ids)
        again = (
            torch.compile(model, backend="tp_passes", options=options)(ids)
            if opts.get("release_weights")
            else got
        )
    rel = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    rep = all_reports()[-1]
    applied = sorted(e.rewrite for e in rep.entries if e.applied)
    sizes = [
        (e.details["weight_bytes_before"], e.details["weight_bytes_after"])
        for e in rep.entries
        if e.applied
    ]
    empty = sorted(n for n, p in model.named_parameters() if p.untyped_storage().nbytes() == 0)
    return (
        rel,
        applied,
        rep.collectives,
        sizes,
        empty,
        (again.float() - ref.float()).abs().max().item(),
    )


@pytest.mark.parametrize("world, k", [(2, 2), (4, 4), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_matches_original(world, k, dtype):
    for shape in [(1,), (7,), (2, 5)]:
        res = run_ranks(_graph, world, k, dtype, shape, {"o_proj_bias": True}, {}, timeout=300)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for rel, applied, collectives, *_ in res:
            assert rel <= tol, (shape, rel)
            assert applied == [
                "embedding_tp",
                "lmhead_tp",
                "mlp_tp",
                "mlp_tp",
                "oproj_tp",
                "oproj_tp",
            ]
            # each o_proj, MLP and lm_head ends with one all_to_all; the embedding reduces
            assert collectives.get("all_to_all_single") == 2 + 2 + 1
            assert collectives.get("reduce_scatter_tensor") == 1


def test_separate_gate_and_up_projections():
    res = run_ranks(_graph, 2, 2, torch.float32, (2, 3), {"merged_gate_up": False}, {})
    for rel, applied, *_ in res:
        assert rel <= 1e-5
        assert applied.count("mlp_tp") == 2


def test_tied_embeddings_share_one_shard():
    res = run_ranks(_graph, 2, 2, torch.float32, (6,), {"tie_embeddings": True}, {})
    for rel, applied, *_ in res:
        assert rel <= 1e-5
        assert "lmhead_tp" in applied and "embedding_tp" in applied


def test_release_weights_keeps_one_kth():
    # vocab and widths divisible by k: the shards are exactly 1/k of the full weights
    res = run_ranks(
        _graph,
        2,
        2,
        torch.float32,
        (8,),
        {"vocab": 96, "intermediate": 96},
        {"release_weights": True},
    )
    for rel, applied, _, sizes, empty, again in res:
        assert rel <= 1e-5 and again <= 1e-5  # a recompile reuses the shards
        assert all(after * 2 == before for before, after in sizes), sizes
        assert len(empty) == 8  # embedding, lm_head, 2 o_proj, 2 gate_up, 2 down


def test_uneven_tokens_in_graph_mode_is_a_clear_error_under_strict():
    with pytest.raises(RankFailure, match="token counts.*differs across ranks"):
        run_ranks(_uneven, 2, timeout=120)


def _uneven(rank, world):
    return _graph(rank, world, 2, torch.float32, (5 + rank,), {}, {})
