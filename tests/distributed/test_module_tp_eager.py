"""Module TP across DP ranks, eager path: parallelize() on a pure-DP model, every rank
serving its own (uneven) tokens, against the unmodified model."""

import pytest
import torch

import tp_passes
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.testing import run_ranks

ALL = {"oproj_tp": 2, "embedding_tp": 2, "lmhead_tp": 2, "mlp_tp": 2}


def _eager(rank, world, sizes, shapes, dtype, model_kwargs, release):
    cfg = ModelConfig(
        **{"vocab": 37, "intermediate": 26, "layers": 2, **model_kwargs}
    )  # 37 % k != 0
    ids = torch.randint(0, cfg.vocab, shapes[rank], generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = RefLlama(cfg, None).to(dtype)(ids)  # pure DP: no TP group, all weights local
        model = RefLlama(cfg, None).to(dtype)
        params_before = sum(
            p.untyped_storage().nbytes() for p in {id(p): p for p in model.parameters()}.values()
        )
        entries = tp_passes.parallelize(model, tp_passes.TPConfig(release_weights=release, **sizes))
        got = model(ids)
    rel = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    freed = sorted({e["module"] for e in entries})
    empty = [n for n, p in model.named_parameters() if p.untyped_storage().nbytes() == 0]
    params_after = sum(
        p.untyped_storage().nbytes() for p in {id(p): p for p in model.parameters()}.values()
    )
    shapes = {n: list(p.shape) for n, p in model.state_dict().items()}
    return (
        rel,
        sorted(e["rewrite"] for e in entries),
        freed,
        empty,
        params_before,
        params_after,
        shapes,
    )


@pytest.mark.parametrize("world, k", [(2, 2), (4, 4), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_four_rewrites_uneven_tokens(world, k, dtype):
    sizes = {name: k for name in ALL}
    shapes = [(1,), (7,), (5,), (9,)][:world]  # different T on every rank of a group
    res = run_ranks(_eager, world, sizes, shapes, dtype, {}, False, timeout=300)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for rel, rewrites, *_ in res:
        assert rel <= tol, rel
        assert rewrites == ["embedding_tp", "lmhead_tp", "mlp_tp", "mlp_tp", "oproj_tp", "oproj_tp"]


@pytest.mark.parametrize("merged", [True, False])
def test_hf_style_3d_tied_embeddings_biased_o_proj(merged):
    shapes = [(2, 5), (3, 4)]
    kwargs = {"tie_embeddings": True, "o_proj_bias": True, "merged_gate_up": merged}
    res = run_ranks(_eager, 2, ALL, shapes, torch.float32, kwargs, False)
    for rel, rewrites, *_ in res:
        assert rel <= 1e-5
        assert rewrites.count("mlp_tp") == 2


def test_parameters_become_the_shards():
    # the module's parameter *is* the shard (as parallelize_module would have it): no
    # zero-storage leftovers, and the parameter bytes per rank are halved at k = 2
    res = run_ranks(
        _eager, 2, ALL, [(4,), (6,)], torch.float32, {"vocab": 96, "intermediate": 96}, True
    )
    for rel, _, modules, empty, params_before, params_after, shapes in res:
        assert rel <= 1e-5
        assert empty == []
        assert shapes["layers.0.self_attn.o_proj.weight"] == [32, 64]  # [H/k, A]
        assert shapes["embed_tokens.weight"] == [48, 64] and shapes["lm_head.weight"] == [48, 64]
        assert shapes["layers.0.mlp.gate_up_proj.weight"] == [96, 64]  # half of each of gate, up
        assert shapes["layers.0.mlp.down_proj.weight"] == [32, 96]  # [H/k, I]
        # half of embedding + lm_head (96x64 each), 2 o_proj (64x64), 2 gate_up (192x64) and
        # 2 down (64x96), fp32: the rest (q/k/v, norms) is untouched
        full = 4 * (2 * 96 * 64 + 2 * 64 * 64 + 2 * 192 * 64 + 2 * 64 * 96)
        assert params_before - params_after == full // 2


def _override(rank, world):
    cfg = ModelConfig(layers=2)
    ids = torch.randint(0, cfg.vocab, (5 + rank,), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = RefLlama(cfg, None)(ids)
        model = RefLlama(cfg, None)
        config = tp_passes.TPConfig(oproj_tp=2, module_names={"oproj_tp": ["down_proj"]})
        entries = tp_passes.parallelize(model, config)
        rel = ((model(ids) - ref).abs().max() / ref.abs().max()).item()
    return rel, sorted(e["module"] for e in entries)


def test_module_names_override_selects_other_modules():
    # the o_proj rewrite is an input-column-sharded linear: any such linear can use it
    for rel, modules in run_ranks(_override, 2):
        assert rel <= 1e-5
        assert modules == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
