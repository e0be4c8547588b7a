"""One regression test per defect of issue 22 (numbers in the names), on real gloo ranks.

Each failed on the code before its fix (the file was run against that commit) and passes
after it. One spawn per world size runs every case; the tests read its results.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from tp_passes.testing import run_ranks
from tp_passes.testing.models import ModelConfig, RefLlama


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def _guard(fn, *args):
    """A case's result, or its error as text (one case failing must not hide the others)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the tests read the message
        return f"{type(e).__name__}: {e}"


# -- 1, 2: the shared-weight series with release_weights=True survives recompiles ---------

STEPS = [  # (tokens, dynamic, torch._dynamo.reset() before)
    (7, False, False),
    (7, False, False),
    (9, False, False),  # a new token count: a recompile
    (5, True, True),  # reset, then dynamic=True
    (6, True, False),
    (7, False, True),  # reset, static again
]


def _series(world: int, fc2: bool) -> dict:
    import torch._dynamo

    from tp_passes.report import all_reports, reset_reports

    torch._dynamo.reset()
    reset_reports()
    rank, layers, p = dist.get_rank(), 5, 1
    group = dist.group.WORLD if fc2 else None  # FlashComm2 on TP, the plain series on DP
    c = ModelConfig(layers=layers)
    model, ref = RefLlama(c, group), RefLlama(c, group)
    opts = {"shared_weights": ["o_proj"], "prefetch_step": p, "release_weights": True,
            "shared_weights_apply": True}  # at world 2 rank 0 holds 3 + 2 windows: no saving
    opts.update({"flashcomm2": 1} if fc2 else {})
    errs = []
    with torch.no_grad():
        for t, dynamic, reset in STEPS:
            if reset:
                torch._dynamo.reset()
            if reset or not errs:
                run = torch.compile(
                    model, backend="tp_passes", options={**opts, "inner": "eager"},
                    dynamic=dynamic or None,
                )
            ids = (torch.arange(t) * (1 if fc2 else rank + 2)) % c.vocab
            errs.append(_rel(run(ids)[0], ref(ids)[0]))
    series = [e for r in all_reports() for e in r.entries if e.rewrite == "shared_weights"]
    # what this rank holds of the series: the model's o_proj weights (plain series) or
    # FlashComm2's gathered weights (cached on the TP shards), then the ring's windows
    from tp_passes.weights import derived_values, live_rings

    o_projs = [m.o_proj.weight for m in (layer.self_attn for layer in model.layers)]
    if fc2:
        held = sum(v.untyped_storage().nbytes() for w in o_projs for v in derived_values(w))
    else:
        held = sum(w.untyped_storage().nbytes() for w in o_projs)
    rings = live_rings()
    return {
        "errs": errs,
        "applied": [e.applied for e in series],
        "owned": series[-1].details["owned_layers"],
        "layer_bytes": series[-1].details["layer_bytes"],
        "held": held,
        "windows": sum(w.numel() * w.element_size() for w in rings[-1].windows),
        "p": p,
    }


# -- 4: FlashComm2's summed bias never writes into the model's own fp32 bias ---------------


def _bias_kept(world: int) -> dict:
    import torch._dynamo

    import tp_passes

    torch._dynamo.reset()
    group = dist.group.WORLD
    # a plain nn.Linear o_proj: its fp32 bias is added on every TP rank before the reduce
    c = ModelConfig(layers=2, o_proj_bias=True, reduce_in_parent=True)
    model, ref = RefLlama(c, group), RefLlama(c, group)
    before = [p.clone() for p in model.parameters()]
    ids = torch.arange(7) % c.vocab
    errs = []
    with torch.no_grad():
        errs.append(_rel(torch.compile(model, backend="tp_passes",
                                       options={"flashcomm2": 1, "inner": "eager"})(ids)[0],
                         ref(ids)[0]))
        tp_passes.refresh_weights()
        errs.append(_rel(model(ids)[0], ref(ids)[0]))  # the model itself, uncompiled
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return {"errs": errs, "unchanged": unchanged}


# -- 5: SP + Inductor on a dynamic graph first traced with one row per rank --------------


def _dynamic_t_equals_n(world: int) -> list[float]:
    import torch._dynamo

    torch._dynamo.reset()
    c = ModelConfig(layers=2)
    model, ref = RefLlama(c, dist.group.WORLD), RefLlama(c, dist.group.WORLD)
    run = torch.compile(
        model, backend="tp_passes", dynamic=True,
        options={"sequence_parallel": True, "inner": "inductor"},
    )
    with torch.no_grad():
        return [_rel(run(torch.arange(t) % c.vocab)[0], ref(torch.arange(t) % c.vocab)[0])
                for t in (world, 5, 1)]


# -- 6: refresh_weights() after torch._dynamo.reset() + destroy_groups() -------------------


def _refresh_after_reset(world: int) -> dict:
    import torch._dynamo

    import tp_passes

    torch._dynamo.reset()
    c = ModelConfig(layers=2, o_proj_bias=True)
    model = RefLlama(c, dist.group.WORLD)
    ids = torch.arange(6) % c.vocab
    with torch.no_grad():
        torch.compile(model, backend="tp_passes", options={"flashcomm2": 1, "inner": "eager"})(ids)
    torch._dynamo.reset()
    tp_passes.destroy_groups()
    rebuilt = tp_passes.refresh_weights()  # the dropped graph's gathers must not run again
    with torch.no_grad():  # and the model still compiles and runs on new groups
        ref = RefLlama(c, dist.group.WORLD)(ids)[0]
        got = torch.compile(model, backend="tp_passes",
                            options={"flashcomm2": 1, "inner": "eager"})(ids)[0]
    return {"rebuilt": rebuilt, "err": _rel(got, ref)}


# -- 7: parallelize takes the same dict torch.compile's options take ----------------------


def _dict_config(world: int) -> dict:
    import tp_passes

    c = ModelConfig(layers=2)
    model, ref = RefLlama(c, dist.group.WORLD), RefLlama(c, dist.group.WORLD)
    entries = tp_passes.parallelize(model, {"flashcomm2": 1})
    ids = torch.arange(7) % c.vocab
    with torch.no_grad():
        err = _rel(model(ids)[0], ref(ids)[0])
    try:
        tp_passes.parallelize(model, 3)
        wrong = ""
    except TypeError as e:
        wrong = str(e)
    return {"err": err, "applied": sum(e["applied"] for e in entries), "wrong": wrong}


# -- found by the soak: an eager series on o_proj linears whose parent FlashComm2 rewrote ----


def _eager_series_over_parent(world: int) -> dict:
    """The parent's rewritten forward reads o_proj's weight itself (o_proj's forward no
    longer runs): the series must lend that read its ring window. Before the fix a rank
    that does not own a layer read its freed storage and the other ranks hung."""
    import tp_passes

    c = ModelConfig(layers=3, reduce_in_parent=True, o_proj_bias=True)
    model, ref = RefLlama(c, dist.group.WORLD), RefLlama(c, dist.group.WORLD)
    entries = tp_passes.parallelize(
        model,
        {"flashcomm2": 1, "shared_weights": ["o_proj"], "prefetch_step": 1,
         "shared_weights_apply": True},  # 3 layers: a small series saves nothing
    )
    errs = []
    with torch.no_grad():
        for t in (5, 7, 5):  # the ring wraps across forwards
            ids = torch.arange(t) % c.vocab
            errs.append(_rel(model(ids)[0], ref(ids)[0]))
    held = [layer.self_attn.o_proj.weight.untyped_storage().nbytes() for layer in model.layers]
    return {
        "errs": errs,
        "fc2": [e["module"] for e in entries if e["rewrite"] == "flashcomm2" and e["applied"]],
        "series": [e for e in entries if e["rewrite"] == "shared_weights"],
        "held": held,
    }


def _cast_parent(world: int) -> str:
    """A parent FlashComm2 rewrote eagerly, then cast: its traced graphs bake the dtype in.
    Before the fix a rank failed inside the graph (a dtype mismatch in a matmul), where
    another may already wait in a collective; now every rank refuses before any."""
    import tp_passes

    c = ModelConfig(layers=1, reduce_in_parent=True)
    model = RefLlama(c, dist.group.WORLD)
    tp_passes.parallelize(model, {"flashcomm2": 1})
    model.to(torch.bfloat16)
    try:
        with torch.no_grad():
            model(torch.arange(5) % c.vocab)
    except TypeError as e:
        return str(e)
    return "no error"


def _all(rank: int, world: int) -> dict:
    out = {
        "1_series": _guard(_series, world, False),
        "2_series_fc2": _guard(_series, world, True),
        "4": _guard(_bias_kept, world),
        "5": _guard(_dynamic_t_equals_n, world),
        "6": _guard(_refresh_after_reset, world),
        "8": _guard(_eager_series_over_parent, world),
    }
    if world == 2:
        out["9"] = _cast_parent(world)
    if world == 2:
        out["7"] = _guard(_dict_config, world)
    return out


@functools.cache
def _results(world: int) -> list[dict]:
    return run_ranks(_all, world, timeout=900)


def _case(world: int, key: str) -> list:
    per_rank = [res[key] for res in _results(world)]
    for rank, r in enumerate(per_rank):
        assert not isinstance(r, str), f"rank {rank}: {r}"
    return per_rank


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("key", ["1_series", "2_series_fc2"])
def test_1_2_series_with_release_weights_survives_recompiles(world, key):
    for rank, r in enumerate(_case(world, key)):
        assert len(r["errs"]) == len(STEPS) and max(r["errs"]) <= 1e-5, (rank, r)
        assert r["applied"] and all(r["applied"]), (rank, r)
        # memory: the owned layers, plus the ring's windows
        assert r["held"] == len(r["owned"]) * r["layer_bytes"], (rank, r)
        assert r["windows"] == (r["p"] + 1) * r["layer_bytes"], (rank, r)


@pytest.mark.parametrize("world", [2, 4])
def test_4_flashcomm2_leaves_the_models_bias_alone(world):
    for rank, r in enumerate(_case(world, "4")):
        assert r["unchanged"], f"rank {rank}: a model parameter changed"
        assert max(r["errs"]) <= 1e-5, (rank, r)


@pytest.mark.parametrize("world", [2, 4])
def test_5_sp_inductor_dynamic_graph_traced_at_t_equals_n(world):
    for rank, errs in enumerate(_case(world, "5")):
        assert max(errs) <= 1e-5, (rank, errs)


@pytest.mark.parametrize("world", [2, 4])
def test_6_refresh_weights_skips_graphs_dropped_by_reset(world):
    for rank, r in enumerate(_case(world, "6")):
        assert r["rebuilt"] == 0, (rank, r)
        assert r["err"] <= 1e-5, (rank, r)


def test_7_parallelize_takes_a_dict():
    for rank, r in enumerate(_case(2, "7")):
        assert r["applied"] == 2 and r["err"] <= 1e-5, (rank, r)
        assert "TPConfig or a dict" in r["wrong"] and "int" in r["wrong"], r


@pytest.mark.parametrize("world", [2, 4])
def test_8_eager_series_over_a_parent_flashcomm2_rewrote(world):
    per_rank = _case(world, "8")
    layer_bytes = max(max(r["held"]) for r in per_rank)  # a rank may own no layer (world 4)
    for rank, r in enumerate(per_rank):
        assert max(r["errs"]) <= 1e-5, (rank, r)
        assert len(r["fc2"]) == 3, (rank, r)  # every layer's parent rewritten
        assert len(r["series"]) == 1 and r["series"][0]["applied"], (rank, r)
        # each layer's gathered o_proj block is held by exactly one rank of the series
        assert layer_bytes > 0 and set(r["held"]) <= {0, layer_bytes}, (rank, r)
    owners = [sum(h > 0 for h in hs) for hs in zip(*(r["held"] for r in _case(world, "8")))]
    assert owners == [1, 1, 1], owners


def test_9_a_cast_parent_rewritten_eagerly_is_refused_with_the_reason():
    for rank, msg in enumerate(_results(2)):
        msg = msg["9"]
        assert "weight in torch.float32" in msg, (rank, msg)
        assert "is now torch.bfloat16" in msg and "Cast the model before parallelize" in msg
