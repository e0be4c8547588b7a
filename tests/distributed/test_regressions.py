"""One regression test per defect of issue 9 (numbers in the names), on real gloo ranks.

Each failed on the code before the fix (a hang counts: `run_ranks` has a deadline and
reports it as a failure) and passes after it.
"""

import pytest
import torch
import torch.distributed as dist

import tp_passes
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.report import all_reports
from tp_passes.testing import RankFailure, run_ranks


def _rel(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _ids(shape, seed=0, vocab=96):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _compile(model, **opts):
    return torch.compile(model, backend="tp_passes", options={"inner": "eager", **opts})


def _tp_groups(world, tp, strided=False):
    """Create every TP group (collective, same order everywhere); return mine."""
    lists = (
        [list(range(i, world, world // tp)) for i in range(world // tp)]
        if strided
        else [list(range(i, i + tp)) for i in range(0, world, tp)]
    )
    mine = None
    for ranks in lists:
        pg = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = pg
    return mine


# -- 2, 3: recompiles of a FlashComm2 model with a rank-0-only bias, and with released weights


def _recompile_fc2(rank, world, release):
    model = RefLlama(ModelConfig(layers=2, o_proj_bias=True), dist.group.WORLD)
    out = []
    with torch.no_grad():
        for t in (7, 5, 7):  # new token count, then torch._dynamo.reset() and the first again
            torch._dynamo.reset()
            ref = None if release else model(_ids((t,), t))
            got = _compile(model, flashcomm2=1, release_weights=release, strict=True)(_ids((t,), t))
            out.append(got)
            if ref is not None:
                assert _rel(got, ref) < 1e-5
    return [o.sum().item() for o in out]


def test_2_recompile_with_rank0_only_bias_does_not_hang():
    res = run_ranks(_recompile_fc2, 2, False, timeout=120)
    assert res[0] == pytest.approx(res[1])


def test_3_recompile_after_release_weights_reads_no_released_weight():
    ref = run_ranks(_recompile_fc2, 2, False, timeout=120)
    got = run_ranks(_recompile_fc2, 2, True, timeout=120)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)


# -- 4: derived weights follow casts, load_state_dict and in-place updates


def _stale(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=2, o_proj_bias=True), dist.group.WORLD)
    ids = _ids((7,))
    errors = []
    with torch.no_grad():
        compiled = _compile(model, flashcomm2=1)
        compiled(ids)
        model.to(torch.bfloat16)  # a cast: Dynamo recompiles; the gathered weight must follow
        errors.append(_rel(compiled(ids), model(ids)))
        sd = {k: v * 1.5 for k, v in model.state_dict().items()}
        model.load_state_dict(sd)  # in place: the compiled graph must not run on old shards
        try:
            compiled(ids)
            errors.append("stale weight served")
        except Exception as e:
            assert "refresh_weights" in str(e), e
        assert tp_passes.refresh_weights() >= 2
        errors.append(_rel(compiled(ids), model(ids)))
    return errors


def test_4_cast_and_update_are_never_served_stale():
    for errors in run_ranks(_stale, 2, timeout=180):
        assert errors[0] < 2e-2 and errors[1] < 2e-2, errors


def _module_tp_update(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1), None)
    ids = _ids((6,))
    with torch.no_grad():
        compiled = _compile(model, lmhead_tp=2, mlp_tp=2)
        compiled(ids)
        model.lm_head.weight.mul_(-2.0)  # RL weight sync: every rank updates in place
        model.layers[0].mlp.down_proj.weight.add_(0.5)
        return _rel(compiled(ids), model(ids))


def test_4_module_tp_shards_follow_in_place_updates():
    for rel in run_ranks(_module_tp_update, 2):
        assert rel < 1e-5


def _eager_shard_truth(rank, world):
    model = RefLlama(ModelConfig(layers=1), None)
    tp_passes.parallelize(model, tp_passes.TPConfig(oproj_tp=2, release_weights=True))
    w = model.layers[0].self_attn.o_proj.weight
    sd = model.state_dict()["layers.0.self_attn.o_proj.weight"]
    return list(w.shape), w.untyped_storage().nbytes(), list(sd.shape)


def test_4_eager_parameter_is_the_shard():
    for shape, nbytes, sd_shape in run_ranks(_eager_shard_truth, 2):
        assert shape == [32, 64] and sd_shape == [32, 64]  # o_proj: [H/k, A]
        assert nbytes == 64 * 32 * 4


# -- 5: the eager path checks what the graph path checks


def _eager_vs_graph(rank, world, model_kwargs, sizes, tp):
    group = _tp_groups(world, tp) if tp > 1 else None
    cfg = ModelConfig(layers=1, **model_kwargs)
    ids = _ids((5,), rank // tp)  # TP ranks share tokens, DP ranks differ
    with torch.no_grad():
        ref = RefLlama(cfg, group)(ids)
        model = RefLlama(cfg, group)
        entries = tp_passes.parallelize(model, tp_passes.TPConfig(sequence_parallel=False, **sizes))
        eager = _rel(model(ids), ref)
        torch._dynamo.reset()
        graph = _rel(_compile(RefLlama(cfg, group), sequence_parallel=False, **sizes)(ids), ref)
    graph_applied = sorted((e.rewrite, e.module) for e in all_reports()[-1].entries if e.applied)
    eager_applied = sorted((e["rewrite"], e["module"]) for e in entries if e["applied"])
    return eager, graph, eager_applied, graph_applied


@pytest.mark.parametrize(
    "model_kwargs, sizes, tp",
    [
        ({"lm_head_bias": True}, {"lmhead_tp": 2}, 1),
        ({"mlp_bias": True}, {"mlp_tp": 2}, 1),
        ({"act": "gelu"}, {"mlp_tp": 2}, 1),
        ({}, {"oproj_tp": 2}, 2),
    ],
)
def test_5_eager_decides_like_the_graph_path(model_kwargs, sizes, tp):
    world = 2 * tp
    for eager, graph, eager_applied, graph_applied in run_ranks(
        _eager_vs_graph, world, model_kwargs, sizes, tp
    ):
        assert eager < 1e-5 and graph < 1e-5
        assert eager_applied == graph_applied


# -- 6: in-place dist.all_reduce: the original matmul does not stay alive


def _inplace(rank, world, opts):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=2, inplace_all_reduce=True), dist.group.WORLD)
    ids = _ids((7,))
    with torch.no_grad():
        ref = model(ids)
        got = _compile(model, **opts)(ids)
    return _rel(got, ref), all_reports()[-1]


def test_6_inplace_all_reduce_rewrite_leaves_no_dead_matmul():
    sp = {"sequence_parallel": True}
    for opts in ({"flashcomm2": 1, "release_weights": True, **sp}, sp):
        for rel, rep in run_ranks(_inplace, 2, opts):
            assert rel < 1e-5
            assert rep.collectives.get("all_reduce", 0) == 0
            # no matmul runs twice (the rewrite's own and the original kept alive by copy_)
            assert rep.matmuls_after == rep.matmuls_before, (rep.matmuls_before, rep.matmuls_after)


# -- 7: oproj_tp on an o_proj that already feeds a TP all-reduce is skipped


def _oproj_on_tp(rank, world, strict):
    group = _tp_groups(world, 2)
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1), group)
    ids = _ids((5,), rank // 2)
    with torch.no_grad():
        ref = model(ids)
        got = _compile(model, oproj_tp=2, release_weights=True, strict=strict)(ids)
    (e,) = [e for e in all_reports()[-1].entries if e.rewrite == "oproj_tp"]
    return _rel(got, ref), e.applied, e.reason


def test_7_oproj_tp_skips_a_tensor_parallel_o_proj():
    for rel, applied, reason in run_ranks(_oproj_on_tp, 4, False):
        assert rel < 1e-5 and not applied and "already tensor-parallel" in reason
    with pytest.raises(RankFailure, match="already tensor-parallel"):
        run_ranks(_oproj_on_tp, 4, True)


# -- 8: tied embeddings, release_weights, only one of the two rewritten


def _tied_one(rank, world, kind, graph):
    torch._dynamo.reset()
    cfg = ModelConfig(layers=1, tie_embeddings=True)
    ids = _ids((6,), rank)
    with torch.no_grad():
        ref = RefLlama(cfg, None)(ids)
        model = RefLlama(cfg, None)
        if graph:
            got = _compile(model, release_weights=True, **{kind: 2})(ids)
            got = _compile(model, release_weights=True, **{kind: 2})(ids)  # and again
        else:
            tp_passes.parallelize(model, tp_passes.TPConfig(release_weights=True, **{kind: 2}))
            got = model(ids)
    return _rel(got, ref)


@pytest.mark.parametrize("kind", ["lmhead_tp", "embedding_tp"])
@pytest.mark.parametrize("graph", [True, False])
def test_8_tied_weight_is_not_freed_while_read(kind, graph):
    for rel in run_ranks(_tied_one, 2, kind, graph):
        assert rel < 1e-5


# -- 9: a second model with another layout in the same process


def _two_layouts(rank, world):
    out = []
    for tp_model in (True, False, True):
        torch._dynamo.reset()
        model = RefLlama(ModelConfig(layers=1), dist.group.WORLD if tp_model else None)
        ids = _ids((5,), 0 if tp_model else rank)
        opts = {"flashcomm2": 1} if tp_model else {"mlp_tp": 2}
        with torch.no_grad():
            out.append(_rel(_compile(model, strict=True, **opts)(ids), model(ids)))
    return out


def test_9_models_with_different_layouts_in_one_process():
    for rels in run_ranks(_two_layouts, 2):
        assert max(rels) < 1e-5


# -- 10: configs that differ across ranks raise on every rank, never hang


def _diverging_graph(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1), None)
    with torch.no_grad():
        _compile(model, **({"mlp_tp": 2} if rank == 0 else {}))(_ids((5,)))


def _diverging_eager(rank, world):
    model = RefLlama(ModelConfig(layers=1), None)
    tp_passes.parallelize(
        model, tp_passes.TPConfig(**({"mlp_tp": 2} if rank == 0 else {"oproj_tp": 2}))
    )
    model(_ids((5,)))


@pytest.mark.parametrize("fn", [_diverging_graph, _diverging_eager])
def test_10_diverging_configs_raise(fn):
    with pytest.raises(RankFailure, match="differs across ranks"):
        run_ranks(fn, 2, timeout=90)


# -- 11: mlp_tp applies with the default inner compiler (Inductor)


def _mlp_inductor(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1), None)
    ids = _ids((6,), rank)
    with torch.no_grad():
        got = torch.compile(model, backend="tp_passes", options={"mlp_tp": 2, "strict": True})(ids)
        rel = _rel(got, model(ids))
    return rel, sorted(e.rewrite for e in all_reports()[-1].entries if e.applied)


@pytest.mark.inductor
def test_11_mlp_tp_with_inductor():
    for rel, applied in run_ranks(_mlp_inductor, 2, timeout=600):
        assert rel < 1e-4 and applied == ["mlp_tp"]


# -- 12: a bias on TP rank 0 only is a skip on every rank, not a disagreement


def _mlp_bias_tp_dp(rank, world):
    group = _tp_groups(world, 2)
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1, mlp_bias=True), group)
    ids = _ids((5,), rank // 2)
    with torch.no_grad():
        got = _compile(model, mlp_tp=2)(ids)
        rel = _rel(got, model(ids))
    (e,) = [e for e in all_reports()[-1].entries if e.rewrite == "mlp_tp"]
    return rel, e.applied, e.reason


def test_12_rank0_only_bias_skips_everywhere():
    for rel, applied, reason in run_ranks(_mlp_bias_tp_dp, 4):
        assert rel < 1e-5 and not applied and "bias" in reason


# -- 13: module TP on strided TP groups


def _strided(rank, world, graph):
    group = _tp_groups(world, 2, strided=True)  # [0, 2], [1, 3]
    torch._dynamo.reset()
    cfg = ModelConfig(layers=1)
    ids = _ids((5,), min(dist.get_process_group_ranks(group)))  # one replica's tokens
    with torch.no_grad():
        ref = RefLlama(cfg, group)(ids)
        model = RefLlama(cfg, group)
        if graph:
            # without SP the TP all-reduce reads the module TP result directly
            got = _compile(model, mlp_tp=2, lmhead_tp=2, strict=True, sequence_parallel=False)(ids)
            rep = all_reports()[-1]
            # the module TP result is used, not recomputed from the original matmuls: the only
            # extra matmul is the merged gate_up's, which mlp_dp runs as gate and up
            extra = rep.matmuls_after - rep.matmuls_before - 1
        else:
            tp_passes.parallelize(model, tp_passes.TPConfig(mlp_tp=2, lmhead_tp=2, strict=True))
            got = model(ids)
            extra = 0
    return _rel(got, ref), extra


@pytest.mark.parametrize("graph", [True, False])
def test_13_module_tp_on_strided_tp_groups(graph):
    for rel, extra_matmuls in run_ranks(_strided, 4, graph):
        assert rel < 1e-5 and extra_matmuls == 0


# -- 14: a 0-dim all-reduce is skipped with a reason


def _scalar(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1, scalar_all_reduce=True), dist.group.WORLD)
    ids = _ids((5,))
    with torch.no_grad():
        rel = _rel(_compile(model)(ids), model(ids))
    reasons = [e.reason for e in all_reports()[-1].entries if not e.applied]
    return rel, reasons


def test_14_scalar_all_reduce_is_skipped():
    for rel, reasons in run_ranks(_scalar, 2):
        assert rel < 1e-5
        assert any("0-dim all-reduce has no token dimension" in r for r in reasons)


# -- 4 (graph path): what the model holds after release_weights


def _after_release(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=1), None)
    ids = _ids((6,), rank)
    with torch.no_grad():
        ref = RefLlama(ModelConfig(layers=1), None)(ids)
        compiled = _compile(model, lmhead_tp=2, mlp_tp=2, release_weights=True)
        rel = _rel(compiled(ids), ref)
        again = _rel(
            compiled(_ids((9,), rank)), RefLlama(ModelConfig(layers=1), None)(_ids((9,), rank))
        )
    w = model.lm_head.weight
    errors = []
    for what in (model.state_dict, lambda: model.to(torch.bfloat16)):
        try:
            what()
            errors.append("no error")
        except RuntimeError as e:
            errors.append(str(e))
    return rel, again, list(w.shape), w.untyped_storage().nbytes(), errors


def test_4_released_weights_refuse_state_dict_and_casts():
    for rel, again, shape, nbytes, errors in run_ranks(_after_release, 2):
        assert rel < 1e-5 and again < 1e-5  # a new shape recompiles from the cached shards
        assert shape == [96, 64] and nbytes == 0
        for e in errors:  # names a released weight (the first module state_dict/.to reaches)
            assert "release_weights" in e and ".weight" in e, e
