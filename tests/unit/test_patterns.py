"""Each rewrite's finder and replacement on small make_fx graphs, in one process.

The process group is torch's fake one (`fake_world`, 4 ranks, this process rank 3):
collectives trace and return tensors of the right shape, so these tests check what the
finders match, what they refuse and why, and the graph each replacement leaves; the
numbers are checked on real gloo ranks in `tests/distributed/`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from tp_passes.backend import rewrite_graph
from tp_passes.config import TPConfig
from tp_passes.fx import find_all_reduces
from tp_passes.groups import registry
from tp_passes.owner import owner
from tp_passes.patterns import (
    REWRITES,
    EmbeddingTP,
    GraphContext,
    LMHeadTP,
    MLPTP,
    OProjTP,
    find_sites,
)
from tp_passes.wire import collective_counts

T, H, A, V, I = 7, 16, 8, 24, 12


def _trace(fn, *inputs):
    return make_fx(fn, tracing_mode="fake")(*inputs)


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


# -- graphs: TP (one all-reduce after o_proj, then add + RMSNorm + the next matmul) --------


def _tp_block(x, w_o, res, w_norm, w_q):
    y = funcol.all_reduce(torch.mm(x, w_o.t()), "sum", dist.group.WORLD)
    h = y + res
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w_norm
    return torch.mm(n, w_q.t())


SP = TPConfig(sequence_parallel=True)  # the fake group has no cost figures: "auto" keeps

TP_NAMES = [
    "x",
    "layers.0.self_attn.o_proj.weight",
    "residual",
    "layers.0.norm.weight",
    "layers.1.self_attn.q_proj.weight",
]


def _tp_inputs(n: int):
    return [
        torch.randn(T, A // n),
        torch.randn(H, A // n),
        torch.randn(T, H),
        torch.randn(H),
        torch.randn(A, H),
    ]


# -- graphs: pure DP (no all-reduce), the module TP patterns ---------------------------------


def _dp_model(ids, w_e, w_o, w_gu, w_d, w_lm):
    e = F.embedding(ids, w_e)
    y = torch.mm(e, w_o.t()) + e
    gate, up = torch.mm(y, w_gu.t()).chunk(2, dim=-1)
    m = torch.mm(F.silu(gate) * up, w_d.t())
    return torch.mm(m + y, w_lm.t())


DP_NAMES = [
    "ids",
    "embed_tokens.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "lm_head.weight",
]


def _dp_inputs():
    return [
        torch.randint(0, V, (T,)),
        torch.randn(V, H),
        torch.randn(H, H),
        torch.randn(2 * I, H),
        torch.randn(H, I),
        torch.randn(V, H),
    ]


def _context(gm, config, inputs, names) -> GraphContext:
    from torch._guards import detect_fake_mode

    fakes = [p.meta["val"] for p in gm.graph.find_nodes(op="placeholder")]
    cx = GraphContext(gm, config, inputs, names, detect_fake_mode(fakes))
    cx.sites = find_sites(gm, names)
    return cx


def test_registry_order_is_the_priority():
    names = [r.name for r in REWRITES]
    assert names == [
        "oproj_tp",
        "embedding_tp",
        "lmhead_tp",
        "mlp_tp",
        "flashcomm2",
        "sequence_parallel",
        "shared_weights",
    ]
    assert len({type(r) for r in REWRITES}) == len(REWRITES)


def test_find_sites_normalizes_the_all_reduce(fake_world):
    gm = _trace(_tp_block, *_tp_inputs(fake_world))
    (site,) = find_sites(gm, TP_NAMES)
    assert site.module == "layers.0.self_attn.o_proj" and site.n == fake_world
    assert site.matmul is not None and site.weight_index == 1 and not site.reason
    assert site.ranks == tuple(range(fake_world))


def test_sequence_parallel_replaces_the_all_reduce(fake_world):
    gm = _trace(_tp_block, *_tp_inputs(fake_world))
    done = rewrite_graph(gm, SP, _tp_inputs(fake_world), TP_NAMES)
    applied = sorted(e.rewrite for e in done.entries if e.applied)
    assert applied == ["mm_reduce_scatter", "sequence_parallel"]
    assert collective_counts(gm) == {"reduce_scatter_tensor": 1, "all_gather_into_tensor": 1}
    sp = next(e for e in done.entries if e.rewrite == "sequence_parallel")
    assert sp.details["ops_on_sharded_tokens_in_graph"] >= 5  # add, pow, mean, rsqrt, muls
    # the all_gather sits right before the next matmul: the norm runs on T/n tokens
    ops = _ops(gm)
    assert ops.index("_c10d_functional.all_gather_into_tensor.default") > ops.index(
        "aten.rsqrt.default"
    )
    assert not find_all_reduces(gm.graph)


def test_sequence_parallel_off_reports_why(fake_world):
    gm = _trace(_tp_block, *_tp_inputs(fake_world))
    done = rewrite_graph(
        gm,
        TPConfig(sequence_parallel=False, fuse_mm_reduce_scatter=False),
        _tp_inputs(fake_world),
        TP_NAMES,
    )
    assert [(e.rewrite, e.applied, e.reason) for e in done.entries] == [
        ("sequence_parallel", False, "sequence_parallel=False")
    ]
    assert collective_counts(gm) == {"all_reduce": 1}


def test_flashcomm2_takes_the_site_before_sequence_parallel(fake_world):
    n = fake_world
    inputs = _tp_inputs(n)
    gm = _trace(_tp_block, *inputs)
    done = rewrite_graph(gm, TPConfig(flashcomm2=1, sequence_parallel=True), inputs, TP_NAMES)
    assert [(e.rewrite, e.applied) for e in done.entries] == [("flashcomm2", True)]
    assert collective_counts(gm) == {"all_to_all_single": 1, "all_gather_into_tensor": 1}
    (w,) = done.derived  # the o_proj weight gathered over ODP: [H, A]
    assert w.value.shape == (H, A) and w.name == "layers.0.self_attn.o_proj.weight"
    e = done.entries[0]
    assert e.details["weight_bytes_after"] == n * e.details["weight_bytes_before"]


def test_flashcomm2_size_that_does_not_divide_is_refused(fake_world):
    gm = _trace(_tp_block, *_tp_inputs(fake_world))
    done = rewrite_graph(
        gm, TPConfig(flashcomm2=3, sequence_parallel=True), _tp_inputs(fake_world), TP_NAMES
    )
    fc2 = next(e for e in done.entries if e.rewrite == "flashcomm2")
    assert not fc2.applied and fc2.blocked and "flashcomm2=3 must divide" in fc2.reason
    # the site stays with sequence parallelism
    assert any(e.rewrite == "sequence_parallel" and e.applied for e in done.entries)


def test_bare_graph_module_without_real_weights(fake_world):
    """The driver runs on a bare GraphModule (as an Inductor pass would): rewrites that
    need real weights skip with that reason, the others apply."""
    gm = _trace(_tp_block, *_tp_inputs(fake_world))
    done = rewrite_graph(gm, TPConfig(flashcomm2=1, sequence_parallel=True), input_names=TP_NAMES)
    fc2 = next(e for e in done.entries if e.rewrite == "flashcomm2")
    assert not fc2.applied and "no real tensor" in fc2.reason, fc2
    assert any(e.rewrite == "sequence_parallel" and e.applied for e in done.entries)


def test_strict_turns_a_skip_into_an_error_before_any_change(fake_world):
    gm = _trace(_tp_block, *_tp_inputs(fake_world))
    before = gm.code
    with pytest.raises(RuntimeError, match="strict.*flashcomm2 at layers.0.self_attn.o_proj"):
        rewrite_graph(gm, TPConfig(flashcomm2=3, strict=True), _tp_inputs(fake_world), TP_NAMES)
    assert gm.code == before


# -- module TP finders -----------------------------------------------------------------------


def test_module_tp_finders_on_a_pure_dp_graph(fake_world):
    inputs = _dp_inputs()
    gm = _trace(_dp_model, *inputs)
    cfg = TPConfig(oproj_tp=2, embedding_tp=2, lmhead_tp=2, mlp_tp=2)
    cx = _context(gm, cfg, inputs, DP_NAMES)
    found = {r.name: r.find(cx) for r in REWRITES}
    assert [m.module for m in found["oproj_tp"]] == ["layers.0.self_attn.o_proj"]
    assert [m.module for m in found["embedding_tp"]] == ["embed_tokens"]
    assert [m.module for m in found["lmhead_tp"]] == ["lm_head"]
    (mlp,) = found["mlp_tp"]
    assert mlp.module == "layers.0.mlp" and mlp.act == "silu" and not mlp.reason
    assert [cx.name(w) for w in mlp.weights] == DP_NAMES[3:5]
    assert not found["flashcomm2"] and not found["sequence_parallel"]  # no all-reduce


def test_mlp_finder_refuses_what_is_not_a_gated_mlp(fake_world):
    def not_gated(x, w_gu, w_d):
        gate, up = torch.mm(x, w_gu.t()).chunk(2, dim=-1)
        return torch.mm(torch.neg(gate) * up, w_d.t())

    inputs = [torch.randn(T, H), torch.randn(2 * I, H), torch.randn(H, I)]
    names = ["x", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"]
    gm = _trace(not_gated, *inputs)
    (m,) = MLPTP().find(_context(gm, TPConfig(mlp_tp=2), inputs, names))
    assert "aten.neg.default" in m.reason and "not a gated MLP" in m.reason


def test_oproj_finder_refuses_an_o_proj_that_is_already_tensor_parallel(fake_world):
    inputs = _tp_inputs(fake_world)
    gm = _trace(_tp_block, *inputs)
    (m,) = OProjTP().find(_context(gm, TPConfig(oproj_tp=2), inputs, TP_NAMES))
    assert "already tensor-parallel" in m.reason


def test_tied_lm_head_is_found_through_the_embedding(fake_world):
    def tied(ids, w):
        return torch.mm(F.embedding(ids, w), w.t())

    inputs = [torch.randint(0, V, (T,)), torch.randn(V, H)]
    gm = _trace(tied, *inputs)
    cx = _context(gm, TPConfig(lmhead_tp=2, embedding_tp=2), inputs, ["ids", "embed_tokens.weight"])
    assert [m.module for m in LMHeadTP().find(cx)] == ["embed_tokens (tied lm_head)"]
    assert [m.module for m in EmbeddingTP().find(cx)] == ["embed_tokens"]


@pytest.mark.parametrize(
    "field, collectives",
    [
        ("oproj_tp", {"all_gather_into_tensor": 1, "all_to_all_single": 1}),
        ("embedding_tp", {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}),
        ("lmhead_tp", {"all_gather_into_tensor": 1, "all_to_all_single": 1}),
        ("mlp_tp", {"all_gather_into_tensor": 2, "all_to_all_single": 1}),
    ],
)
def test_module_tp_replacement(fake_world, field, collectives):
    inputs = _dp_inputs()
    gm = _trace(_dp_model, *inputs)
    done = rewrite_graph(gm, TPConfig(**{field: 2}), inputs, DP_NAMES)
    (e,) = done.entries
    assert e.rewrite == field and e.applied, e
    assert collective_counts(gm) == collectives
    assert e.details["weight_bytes_after"] * 2 == e.details["weight_bytes_before"]
    # the shards are new graph inputs; the full weights are no longer read
    phs = list(gm.graph.find_nodes(op="placeholder"))
    assert len(phs) == len(inputs) + len(done.derived)
    assert all(
        not phs[DP_NAMES.index(w.rpartition(".")[0] + ".weight")].users
        for w in e.details["weights"]
    )
    # the layout was inferred (pure DP: no TP group) and said so; init_groups never ran
    assert "inferred from the model's TP groups" in done.layout
    assert owner().explicit is None
    assert registry.get_group_info(type(_rewrite(field)).group).size == 2


def _rewrite(name: str):
    return next(r for r in REWRITES if r.name == name)


def test_module_tp_size_that_does_not_divide_dp_is_refused(fake_world):
    inputs = _dp_inputs()
    gm = _trace(_dp_model, *inputs)
    done = rewrite_graph(gm, TPConfig(oproj_tp=3), inputs, DP_NAMES)
    (e,) = done.entries
    assert not e.applied and e.blocked and "oproj_tp=3 does not divide" in e.reason
    assert collective_counts(gm) == {}


def test_host_refusal_is_the_skip_reason(fake_world):
    inputs = _dp_inputs()
    gm = _trace(_dp_model, *inputs)
    done = rewrite_graph(
        gm, TPConfig(oproj_tp=2), inputs, DP_NAMES, refused={"oproj_tp": "not here"}
    )
    assert [(e.applied, e.reason) for e in done.entries] == [(False, "not here")]


def test_one_group_name_per_partition(fake_world):
    """Group names are the registry's names (`otp`, `fc2_odp`, ...) whether init_groups or
    a compile made them; init_groups' names are not silently re-pointed by a compile."""
    from tp_passes.groups.layout import RankLayout

    registry.init_groups(TPConfig(oproj_tp=2), RankLayout(fake_world, dp=fake_world))
    inputs = _dp_inputs()
    gm = _trace(_dp_model, *inputs)
    rewrite_graph(gm, TPConfig(oproj_tp=2), inputs, DP_NAMES)
    assert registry.get_group_info("otp").ranks == (2, 3)
    gm = _trace(_dp_model, *inputs)
    with pytest.raises(ValueError, match="group 'otp' was made by init_groups"):
        rewrite_graph(gm, TPConfig(oproj_tp=4), inputs, DP_NAMES)


def test_tppass_skips_shared_weights_with_the_route_to_use(fake_world):
    from torch.fx.experimental.proxy_tensor import make_fx

    import tp_passes
    from tp_passes.report import last_report

    pass_ = tp_passes.TPPass({"shared_weights": ["o_proj"], "sequence_parallel": False})

    def graph():
        f = make_fx(lambda x, w: torch.mm(x, w.t()), tracing_mode="fake")
        return f(torch.randn(3, 4), torch.randn(5, 4)).graph

    pass_(graph())
    (entry,) = [e for e in last_report() if e["rewrite"] == "shared_weights"]
    assert not entry["applied"] and "use backend='tp_passes'" in entry["reason"]
    with pytest.raises(RuntimeError, match="shared_weights at \\?: a shared-weight series"):
        tp_passes.TPPass({"shared_weights": ["o_proj"], "strict": True})(graph())


def test_module_tp_wire_bytes_per_token_follow_the_ring_formulas():
    """The per-token bytes vLLM's load-time plan reports come from the rewrite classes."""
    from tp_passes.patterns import EmbeddingTP, LMHeadTP, MLPTP, OProjTP

    # o_proj [H=128, A=256], k=2: all_gather x (1 * 256 * 4) + all_to_all (1/2 * 128 * 4)
    assert OProjTP().wire_per_token(2, 256, 128, 4) == 1024 + 256
    # embedding width 128: ids all_gather (8) + RS of 2 rows
    assert EmbeddingTP().wire_per_token(2, 128, 128, 4) == 8 + 512
    # lm_head [V=512, H=128], k=4: all_gather h (3 * 128 * 4) + all_to_all (3/4 * 512 * 4)
    assert LMHeadTP().wire_per_token(4, 128, 512, 4) == 1536 + 1536
    # MLP H=128, I=384, k=2, bf16: all_gather x (1 * 128 * 2) and the intermediate
    # (1 * 384 * 2) + all_to_all (1/2 * 128 * 2)
    assert MLPTP().wire_per_token(2, 128, 128, 2, 384) == 256 + 768 + 128


def test_the_owner_holds_derived_weights_and_nothing_is_set_on_the_parameters(fake_world):
    """What a compile leaves behind is the owner's, keyed weakly by the tensors: the
    parameters carry no attribute of ours, and the cache goes when its tensor goes."""
    import gc
    import weakref

    from tp_passes.weights import derived_values

    inputs = _dp_inputs()
    before, cached = [dict(vars(t)) for t in inputs], len(owner().derived)
    gm = _trace(_dp_model, *inputs)
    done = rewrite_graph(gm, TPConfig(oproj_tp=2), inputs, DP_NAMES)
    assert len(owner().derived) == cached + 1
    w_o = inputs[DP_NAMES.index("layers.0.self_attn.o_proj.weight")]
    (shard,) = derived_values(w_o)
    assert shard.shape[0] * 2 == w_o.shape[0]  # the cache holds this rank's row shard
    assert [dict(vars(t)) for t in inputs] == before
    gone = weakref.ref(w_o)
    del w_o, inputs, gm, done, shard
    gc.collect()
    assert gone() is None  # the owner does not keep the model's tensors alive
    assert len(owner().derived) == cached


def test_owner_close_frees_groups_reports_and_derived_weights(fake_world):
    import tp_passes
    from tp_passes.groups.layout import RankLayout
    from tp_passes.report import GraphReport, all_reports, record
    from tp_passes.weights import BoundWeights

    tp_passes.init_groups(TPConfig(), RankLayout(fake_world, tp=fake_world))
    record(GraphReport(0, 0, []))
    bound = BoundWeights([])
    owner().close()
    assert owner().explicit is None and not owner().created and all_reports() == []
    assert bound.dropped and owner().graphs == []
