"""Randomized differential suite: seeded TP decoders and configs, every rank vs the original.

    TPP_FUZZ_SEED=7 TPP_FUZZ_COUNT=2000 python -m pytest -q tests/test_randomized.py -s

Each config (a pure function of seed and index, see `make_config`) builds a model in one
of four layouts (TP, pure DP, TP x DP, strided TP), picks the rewrites the layout allows,
a path (graph or eager), an inner compiler, and a follow-up users do (new shape, dynamic
shapes, torch._dynamo.reset(), model.to(dtype), an in-place weight update followed by
tp_passes.refresh_weights()); every rank compares its output with an untouched copy of the
model. The seed is printed; a failure prints the one-line repro of its config.
CI runs the default count (112 configs; CI time on 2 cores); set TPP_FUZZ_COUNT for a soak run and
TPP_FUZZ_ONLY=i to rerun one config.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist

import tp_passes
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.testing import run_ranks

SEED = int(os.environ.get("TPP_FUZZ_SEED", "20261123"))
COUNT = int(os.environ.get("TPP_FUZZ_COUNT", "112"))
ONLY = os.environ.get("TPP_FUZZ_ONLY")
BATCH = 27  # configs per spawn of ranks


def make_config(seed: int, i: int) -> dict:
    r = random.Random(f"{seed}:{i}")
    world = r.choice([2, 2, 4])
    layout = r.choice(["tp", "dp"] + (["tpdp", "strided"] if world == 4 else []))
    tp = {"tp": world, "dp": 1}.get(layout, 2)
    heads = r.choice([4, 8])
    model = dict(  # heads and KV heads divide the TP size (RefLlama shards them evenly)
        hidden=r.choice([36, 50, 64]),
        heads=heads,
        kv_heads=r.choice([h for h in (heads, heads // 2) if h % tp == 0]),
        head_dim=r.choice([4, 6, 8]),
        intermediate=r.choice([24, 36] if tp > 1 else [24, 26, 36]),
        vocab=r.choice([48, 96] if tp > 1 else [37, 48, 50]),
        layers=r.choice([1, 2]),
        o_proj_bias=r.random() < 0.4,
        mlp_bias=r.random() < 0.2,
        lm_head_bias=r.random() < 0.15,
        act=r.choice(["silu", "silu", "gelu"]),
        merged_gate_up=r.random() < 0.7,
        tie_embeddings=tp == 1 and r.random() < 0.3,
        inplace_all_reduce=tp > 1 and r.random() < 0.25,
        # o_proj a plain Linear (its bias added on every TP rank), reduced by the attention
        reduce_in_parent=tp > 1 and r.random() < 0.25,
        seed=r.randrange(1000),
    )
    opts: dict = {}
    if tp > 1:
        opts["sequence_parallel"] = r.choice(["auto", True, False])
        opts["fuse_mm_reduce_scatter"] = r.choice(["auto", False, True])
        if r.random() < 0.5:
            opts["flashcomm2"] = r.choice([1, 2] if tp == 4 else [1])
    dp = world // tp
    if dp > 1:
        kinds = ["lmhead_tp", "embedding_tp", "mlp_tp"] + (
            [] if opts.get("flashcomm2") else ["oproj_tp"]
        )
        for kind in r.sample(kinds, r.randint(1, len(kinds))):
            opts[kind] = r.choice([2, 4] if dp == 4 else [2])
    if model["layers"] == 2 and r.random() < 0.2:  # a shared-weight series (o_shared on FC2)
        opts["shared_weights"] = ["o_proj"]
        opts["prefetch_step"] = 0
        # 2 layers save no memory: "auto" skips the series (checked), True applies it
        opts["shared_weights_apply"] = r.random() < 0.8 or "auto"
    path = r.choice(["graph", "graph", "eager"])
    opts["release_weights"] = r.random() < 0.25
    follow = r.choice(
        ["none", "shape", "dynamic", "reset", "dtype", "update", "recompile", "destroy"]
        if path == "graph"
        else ["none", "shape", "dtype"]
    )
    if (opts["release_weights"] or (path == "eager" and "shared_weights" in opts)) and follow in (
        "dtype",
        "update",
    ):
        # the full weights are gone (an eager series frees the layers a rank does not own):
        # nothing to cast or update (and a model rewritten eagerly is not compiled again)
        follow = "reset" if path == "graph" else "none"
    if path == "eager" and model["reduce_in_parent"] and opts.get("flashcomm2") and follow == "dtype":
        follow = "cast_refused"  # the parent's rewritten graph bakes its dtype in: refused
    t = r.randint(1, world + 3)
    if r.random() < 0.15:
        t = tp  # one row per TP rank (a dynamic graph traced there specializes)
    shape = [t] if r.random() < 0.7 else [r.choice([2, 3]), t]
    return dict(
        index=i,
        world=world,
        layout=layout,
        tp=tp,
        model=model,
        opts=opts,
        path=path,
        inner="inductor" if path == "graph" and (i % 60 == 17 or i % 60 == 41) else "eager",
        follow=follow,
        dtype=r.choice(["float32", "float32", "bfloat16"]),
        shape=shape,
    )


def _group(world: int, tp: int, strided: bool):
    if tp == 1:
        return None
    if tp == world:
        return dist.group.WORLD
    lists = (
        [list(range(i, world, world // tp)) for i in range(world // tp)]
        if strided
        else [list(range(i, i + tp)) for i in range(0, world, tp)]
    )
    mine = None
    for ranks in lists:  # every rank creates every group, in the same order
        pg = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = pg
    return mine


def _run_one(rank: int, world: int, c: dict) -> float:
    group = _group(world, c["tp"], c["layout"] == "strided")
    dtype = getattr(torch, c["dtype"])
    cfg = ModelConfig(**c["model"])
    replica = min(dist.get_process_group_ranks(group)) if group is not None else rank
    torch._dynamo.reset()

    def ids(shape, salt=0):  # TP ranks of one replica see the same tokens
        g = torch.Generator().manual_seed(1000 * replica + salt)
        return torch.randint(0, cfg.vocab, tuple(shape), generator=g)

    ref = RefLlama(cfg, group).to(dtype)
    model = RefLlama(cfg, group).to(dtype)
    opts = dict(c["opts"], inner=c["inner"])
    follow = c["follow"]
    # the graph path never writes into the model's parameters (release_weights frees them)
    watch = c["path"] == "graph" and not opts["release_weights"] and follow not in ("update", "dtype")
    before = [p.clone() for p in model.parameters()] if watch else []
    errors = []
    with torch.no_grad():
        if c["path"] == "graph":
            fn = torch.compile(
                model, backend="tp_passes", options=opts, dynamic=follow in ("dynamic", "recompile")
            )
        else:  # a dict, as torch.compile's options
            tp_passes.parallelize(model, {k: v for k, v in opts.items() if k != "inner"})
            fn = model
        x = ids(c["shape"])
        errors.append(_rel(fn(x), ref(x)))
        if follow in ("shape", "dynamic"):
            x = ids([s + 2 for s in c["shape"]], 1)
        elif follow == "recompile":  # the same model compiled again, dynamic, new shapes
            fn = torch.compile(model, backend="tp_passes", options=opts, dynamic=True)
            errors.append(_rel(fn(x), ref(x)))
            x = ids([s + 1 for s in c["shape"]], 2)
        elif follow == "destroy":  # reset + destroy_groups + refresh, then compile again
            torch._dynamo.reset()
            tp_passes.destroy_groups()
            tp_passes.refresh_weights()
            fn = torch.compile(model, backend="tp_passes", options=opts)
        elif follow == "reset":
            torch._dynamo.reset()
            fn = torch.compile(model, backend="tp_passes", options=opts)
        elif follow == "cast_refused":  # a clear error on every rank, before any collective
            model.to(torch.bfloat16 if dtype == torch.float32 else torch.float32)
            try:
                fn(x)
            except TypeError as e:
                if "Cast the model before parallelize" not in str(e):
                    raise
            else:
                raise AssertionError("a cast FlashComm2-rewritten parent ran without an error")
            return max(errors)
        elif follow == "dtype":
            dtype = torch.bfloat16 if dtype == torch.float32 else torch.float32
            ref.to(dtype)
            model.to(dtype)
        elif follow == "update":
            for m in (ref, model):
                for name, p in m.named_parameters():
                    if name.endswith("weight"):
                        p.mul_(1.25)
            tp_passes.refresh_weights()
        if follow != "none":
            errors.append(_rel(fn(x), ref(x)))
    if before and not all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
        raise AssertionError("a model parameter changed (the graph path wrote into it)")
    return max(errors)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _run_batch(rank: int, world: int, configs: list[dict]) -> list[tuple[int, float | str]]:
    out = []
    for c in configs:
        try:
            out.append((c["index"], _run_one(rank, world, c)))
        except Exception as e:  # report, and keep the ranks in step for the next config
            out.append((c["index"], f"{type(e).__name__}: {str(e)[:400]}"))
            dist.barrier()
    return out


def _repro(c: dict) -> str:
    return (
        f"TPP_FUZZ_SEED={SEED} TPP_FUZZ_ONLY={c['index']} "
        f"python -m pytest -q tests/test_randomized.py -s   # {c}"
    )


@pytest.mark.parametrize("world", [2, 4])
def test_randomized_differential(world, capsys):
    indices = [int(ONLY)] if ONLY is not None else range(COUNT)
    configs = [c for c in (make_config(SEED, i) for i in indices) if c["world"] == world]
    with capsys.disabled():
        print(
            f"\n[tp_passes fuzz] seed={SEED} world={world}: "
            f"{len(configs)} of {len(indices)} configs"
        )
    if not configs:
        pytest.skip(f"no config with world={world}")
    results = []
    for start in range(0, len(configs), BATCH):  # a stuck batch costs its own deadline only
        batch = configs[start : start + BATCH]
        results += run_ranks(_run_batch, world, batch, timeout=60 + 20 * len(batch), pg_timeout=60)
    by_index = {c["index"]: c for c in configs}
    bad = []
    for per_rank in results:
        for index, outcome in per_rank:
            c = by_index[index]
            tol = 1e-4 if c["dtype"] == "float32" and c["follow"] != "dtype" else 6e-2
            if isinstance(outcome, str) or outcome > tol:
                bad.append(f"{outcome}\n  repro: {_repro(c)}")
    with capsys.disabled():
        print(
            f"[tp_passes fuzz] seed={SEED} world={world}: "
            f"{len(configs)} configs, {len(bad)} mismatches"
        )
    assert not bad, "\n".join(sorted(set(bad))[:10])
