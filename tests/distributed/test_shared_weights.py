"""Shared-weight series on real gloo ranks: every rank's output against the original model,
graph and eager, and what each rank holds (storage bytes) and when each broadcast is issued.

Cases are batched per spawn (one process group per world size) to keep the suite fast.
"""

import glob
import os
import re

import pytest
import torch

import tp_passes
from tp_passes import weights
from tp_passes.testing import run_ranks
from tp_passes.testing.models import ModelConfig, RefLlama

FORWARDS = 3  # > 1: the ring wraps into the next forward


def _storage(t):
    return t.untyped_storage().nbytes()


def _final_graph_order(dump_dir, rank):
    """From the dumped final graph: series matmuls and broadcasts in graph order, with the
    broadcast each series matmul's weight waits on (None: a window filled before the call)."""
    (path,) = glob.glob(os.path.join(dump_dir, f"rank{rank}", "graph*", "*_final.py"))
    nodes = {}  # name -> (line, op, args)
    for i, line in enumerate(open(path).read().splitlines()):
        m = re.match(r"\s*(\w+)(?::[^=]*)? = torch\.ops\.(\w+)\.(\w+)\.\w+\(([^)]*)", line)
        if m:
            nodes[m.group(1)] = (
                i,
                f"{m.group(2)}.{m.group(3)}",
                [a.strip() for a in m.group(4).split(",")],
            )
    broadcasts = sorted(
        line for line, op, _ in nodes.values() if op == "_c10d_functional.broadcast_"
    )
    series = []  # (mm line, line of the broadcast it waits on or None)
    for line, op, args in nodes.values():
        if op not in ("aten.mm", "aten.addmm"):
            continue
        t = nodes.get(args[-1])
        if t is None or t[1] not in ("aten.permute", "aten.t"):
            continue
        w = nodes.get(t[2][0])
        if w is None or w[1] != "_c10d_functional.wait_tensor":
            continue
        src = nodes.get(w[2][0])
        series.append((line, src[0] if src and src[1] == "_c10d_functional.broadcast_" else None))
    return sorted(series), broadcasts


def _run_case(rank, world, case, dump_dir):
    mode, L, p, dtype, fc2 = case["mode"], case["layers"], case["p"], case["dtype"], case["fc2"]
    torch._dynamo.reset()
    tp_model = fc2 or case.get("tp_shard")
    group = torch.distributed.group.WORLD if tp_model else None  # a TP model
    cfg = ModelConfig(layers=L, vocab=40, intermediate=24)
    gen = torch.Generator().manual_seed(100 + (0 if tp_model else rank))  # TP: the same ids
    T = 5 if tp_model else 3 + 2 * rank  # uneven, and different on every DP rank
    inputs = [torch.randint(0, cfg.vocab, (T,), generator=gen) for _ in range(FORWARDS)]
    with torch.no_grad():
        ref_model = RefLlama(cfg, group).to(dtype)
        refs = [ref_model(ids) for ids in inputs]
        model = RefLlama(cfg, group).to(dtype)
        options = {
            "shared_weights": [] if case.get("fc2_alone") else ["o_proj"],
            "prefetch_step": p,
            "flashcomm2": 1 if fc2 else 0,
            "sequence_parallel": False,
            "strict": not case.get("tp_shard"),
            "release_weights": not case.get("update"),
            # True: the small series here are applied although some save nothing
            "shared_weights_apply": case.get("apply", True),
        }
        if mode == "parallelize":
            entries = tp_passes.parallelize(model, tp_passes.TPConfig(**options))
            run = model
        else:
            options.update(inner=mode, dump=bool(dump_dir), dump_dir=dump_dir or "./unused")
            run = torch.compile(model, backend="tp_passes", options=options, fullgraph=True)
        if case.get("out_of_order"):  # layer 1 before layer 0: refused before any broadcast
            try:
                model.layers[1].self_attn.o_proj(torch.zeros(2, 64, dtype=dtype))
            except RuntimeError as e:
                out_of_order = str(e)
        outs = [run(ids) for ids in inputs]
        if mode != "parallelize":
            entries = tp_passes.last_report()
        if case.get("update"):  # weights updated in place on every rank, then refreshed
            for m in (ref_model, model):
                for layer in m.layers:
                    layer.self_attn.o_proj.weight.mul_(1.5)
            tp_passes.refresh_weights()
            refs.append(ref_model(inputs[0]))
            outs.append(run(inputs[0]))
    errs = [
        ((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
        for o, r in zip(outs, refs)
    ]
    o_proj = [m.o_proj.weight for m in (layer.self_attn for layer in model.layers)]
    series = [e for e in entries if e["rewrite"] == "shared_weights"]
    out = {
        "rank": rank,
        "errs": errs,
        "series": series,
        "rewrites": sorted(e["rewrite"] for e in entries if e["applied"]),
    }
    out["o_proj_storage"] = [_storage(w) for w in o_proj]
    rings = weights.live_rings()
    out["ring_bytes"] = sum(_storage(w) for w in rings[-1].windows) if rings and series else 0
    if fc2 and mode != "parallelize":  # FlashComm2's gathered weights this rank keeps (cached)
        # a weight made and handed to the series' owner is not held here
        out["gathered_bytes"] = sum(_storage(v) for w in o_proj for v in weights.derived_values(w))
    if fc2 and mode == "parallelize":
        out["gathered_bytes"] = sum(_storage(w) for w in o_proj)
    if case.get("out_of_order"):
        out["out_of_order"] = out_of_order
    if dump_dir:
        out["order"] = _final_graph_order(dump_dir, rank)
    return out


def _cases(rank, world, cases, dump_root):
    results = []
    for i, case in enumerate(cases):
        dump = os.path.join(dump_root, f"case{i}") if case.get("dump") else ""
        results.append(_run_case(rank, world, case, dump))
    return results


def _case(mode, layers, p, dtype=torch.float32, fc2=False, **kw):
    return {"mode": mode, "layers": layers, "p": p, "dtype": dtype, "fc2": fc2, **kw}


def _check_plain(case, res, world):
    """Equal outputs; this rank holds its owned layers plus the ring, nothing else."""
    tol = 1e-5 if case["dtype"] == torch.float32 else 2e-2
    assert max(res["errs"]) <= tol, (case, res["errs"])
    (entry,) = res["series"]
    assert entry["applied"], entry
    d = entry["details"]
    L, k, R = case["layers"], world, case["p"] + 1
    assert d["owners"] == [i % k for i in range(L)]
    layer = d["layer_bytes"]
    assert layer == 64 * 64 * case["dtype"].itemsize  # o_proj [H, A]
    owned = [i for i in range(L) if i % k == res["rank"]]  # the group is the world here
    assert d["owned_layers"] == owned
    # storage counted: owned layers keep their bytes, every other layer's is freed
    assert res["o_proj_storage"] == [layer if i in owned else 0 for i in range(L)]
    assert res["ring_bytes"] == R * layer
    assert (
        d["weight_bytes_after"]
        == (len(owned) + R) * layer
        == sum(res["o_proj_storage"]) + res["ring_bytes"]
    )
    assert d["weight_bytes_before"] == L * layer
    assert d["broadcast_bytes_per_step"] == (L - len(owned)) * layer


def _check_order(case, res):
    """Each broadcast is issued p series layers before the matmul that waits on it; the
    first p matmuls read windows filled before the call (the previous forward's tail)."""
    series, broadcasts = res["order"]
    L, p = case["layers"], case["p"]
    assert len(series) == L and len(broadcasts) == L
    for i, (mm_line, waited) in enumerate(series):
        # broadcast i sits between matmul i - 1 and matmul i
        assert (i == 0 or series[i - 1][0] < broadcasts[i]) and broadcasts[i] < mm_line
        if i < p:
            assert waited is None
        else:
            assert waited == broadcasts[i - p]  # issued p layers earlier


def _world_cases(world):
    """Graph path ("eager" / "inductor": the inner compiler) and eager path ("parallelize")."""
    L = 5  # 5 % 2 and 5 % 4 != 0: ranks own different numbers of layers
    cases = []
    for p in (0, 1, 2):
        cases.append(_case("eager", L, p, dump=True))
        cases.append(_case("parallelize", L, p))
    cases += [_case("eager", 3, 1, torch.bfloat16), _case("parallelize", 3, 1, torch.bfloat16)]
    if world == 2:
        cases.append(_case("inductor", L, 2))
        cases.append(_case("eager", L, 1, update=True))
        cases.append(_case("parallelize", L, 1, out_of_order=True))
        cases.append(_case("eager", L, 1, tp_shard=True))  # TP shards differ: skipped
        cases.append(_case("parallelize", L, 1, tp_shard=True))
    for mode in ("eager", "parallelize"):  # "auto": group rank 0 holds 3 + 3 windows >= 5
        cases.append(_case(mode, L, 2, apply="auto"))
    for mode in ("eager", "parallelize"):  # FlashComm2 (m = 1) alone, then with the series
        # 6 layers: owned + ring = 3 + 2 (world 2) or 2 + 2 (world 4) windows < 6
        cases.append(_case(mode, 6, 1, fc2=True, fc2_alone=True))
        cases.append(_case(mode, 6, 1, fc2=True, apply="auto"))  # saves: applied by "auto"
    return cases


_RUNS: dict[int, tuple] = {}  # world -> (cases, per-rank results): one spawn per world


def _ran(world, tmp_path_factory):
    if world not in _RUNS:
        cases = _world_cases(world)
        dump = str(tmp_path_factory.mktemp(f"dump{world}"))
        _RUNS[world] = (cases, run_ranks(_cases, world, cases, dump, timeout=900))
    return (world, *_RUNS[world])


@pytest.fixture(scope="module", params=[2, 4])
def ran(request, tmp_path_factory):
    return _ran(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def ran2(tmp_path_factory):
    """World 2 only: the update, out-of-order and TP-shard cases."""
    return _ran(2, tmp_path_factory)


def test_every_rank_equals_the_original_and_holds_owned_layers_plus_ring(ran):
    world, cases, per_rank = ran
    for i, case in enumerate(cases):
        if case["fc2"] or case.get("tp_shard") or case.get("update") or case.get("apply"):
            continue
        owned_total = 0
        for res in per_rank:
            _check_plain(case, res[i], world)
            owned_total += len(res[i]["series"][0]["details"]["owned_layers"])
        assert owned_total == case["layers"]  # every layer lives on exactly one rank


def test_broadcasts_issued_prefetch_step_layers_ahead_in_the_final_graph(ran):
    world, cases, per_rank = ran
    checked = 0
    for i, case in enumerate(cases):
        if case.get("dump"):
            for res in per_rank:
                _check_order(case, res[i])
                checked += 1
    assert checked == 3 * world


def test_flashcomm2_with_shared_series_equal_outputs_less_memory(ran):
    world, cases, per_rank = ran
    pairs = [(i, i + 1) for i, c in enumerate(cases) if c.get("fc2_alone")]
    assert len(pairs) == 2
    for alone, shared in pairs:
        L, R = cases[shared]["layers"], cases[shared]["p"] + 1
        for res in per_rank:
            a, s = res[alone], res[shared]
            assert max(a["errs"]) <= 1e-5 and max(s["errs"]) <= 1e-5, (a["errs"], s["errs"])
            assert "flashcomm2" in s["rewrites"] and "shared_weights" in s["rewrites"]
            full = 64 * 64 * 4  # FlashComm2 m = 1: the full-width [H, A] o_proj per layer
            assert a["gathered_bytes"] == L * full
            (entry,) = s["series"]
            owned = len(entry["details"]["owned_layers"])
            assert s["gathered_bytes"] == owned * full  # only the owned gathered weights stay
            assert s["gathered_bytes"] + s["ring_bytes"] == (owned + R) * full < a["gathered_bytes"]


def test_weights_updated_in_place_then_refreshed_and_out_of_order_layers_refused(ran2):
    world, cases, per_rank = ran2
    update = next(i for i, c in enumerate(cases) if c.get("update"))
    order = next(i for i, c in enumerate(cases) if c.get("out_of_order"))
    for res in per_rank:
        assert len(res[update]["errs"]) == FORWARDS + 1 and max(res[update]["errs"]) <= 1e-5
        msg = res[order]["out_of_order"]
        assert "layers.1.self_attn.o_proj.weight ran out of order" in msg
        assert "expects layers.0.self_attn.o_proj.weight next" in msg


def test_tensor_parallel_shards_are_not_shared(ran2):
    world, cases, per_rank = ran2
    shard_cases = [i for i, case in enumerate(cases) if case.get("tp_shard")]
    assert len(shard_cases) == 2  # graph and eager
    for i in shard_cases:
        case = cases[i]
        for res in per_rank:
            assert max(res[i]["errs"]) <= 1e-5
            (entry,) = res[i]["series"]
            assert not entry["applied"]
            assert "differs across the ranks [0, 1]" in entry["reason"], entry["reason"]
            assert res[i]["o_proj_storage"] == [64 * 32 * 4] * case["layers"]  # untouched


def test_auto_leaves_a_series_that_saves_no_memory(ran):
    world, cases, per_rank = ran
    skipped = [i for i, c in enumerate(cases) if c.get("apply") == "auto" and not c["fc2"]]
    assert len(skipped) == 2  # graph and eager
    for i in skipped:
        for res in per_rank:
            assert max(res[i]["errs"]) <= 1e-5
            (entry,) = res[i]["series"]
            assert not entry["applied"] and not entry["blocked"], entry
            assert "saves no memory (shared_weights_apply='auto')" in entry["reason"], entry
            owned0 = len(range(0, 5, world))
            assert f"{owned0} owned layers + 3 windows >= the series' 5 layers" in entry["reason"]
            assert res[i]["o_proj_storage"] == [64 * 64 * 4] * 5  # nothing freed
