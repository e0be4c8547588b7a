"""The eager path: the same rewrites applied to modules, for code that is not compiled.

    tp_passes.parallelize(model, tp_passes.TPConfig(flashcomm2=1))

Layers that own their all-reduce (a row-parallel linear whose forward ends in the
reduce) get a new forward built from the same `tp_passes.comm` functions the graph
rewrites trace, so the two paths compute the same numbers:

- sequence parallelism / mm + reduce-scatter: ``all_gather(reduce_scatter(x @ w.T))``
  (the fused kernel where the device has one). Without a compiler the residual stream
  cannot stay token-sharded, so eagerly this moves the same bytes as the all-reduce; it
  exists so the eager path matches the graph path, not to save bandwidth.
- FlashComm2: all_to_all + full-width o_proj + all_gather; the gathered weight is made
  once at `parallelize` time and becomes the layer's `weight`.
- module TP across DP ranks (o_proj, embedding, lm_head, MLP): see below.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch._guards import detect_fake_mode

from tp_passes import comm, weights
from tp_passes.config import MODULE_NAME_KEYS, TPConfig
from tp_passes.fx import reduced_matmuls, splice
from tp_passes.groups.layout import RankLayout
from tp_passes.groups.registry import agree_across_ranks, flashcomm2_groups, module_tp_group
from tp_passes.lowering import mm_reduce_scatter_impl
from tp_passes.patterns.flashcomm2 import flashcomm2_size_error
from tp_passes.patterns.module_tp import (
    ModuleMatch, excluded, find_module_matches, mlp_names, module_tp_forward, selects, shard_specs,
)
from tp_passes.report import Entry


@dataclass
class RowParallel:
    """What the eager rewrites need to know about a row-parallel linear.

    A plain layer gives its `weight`; a layer that keeps its weight in a form we cannot
    reshard (vLLM on CPU: a prepacked oneDNN handle) gives `partial` instead, its own
    matmul without the reduce, and only rewrites that leave the weight alone apply.
    """

    weight: torch.Tensor | None  # [H, A/n]
    bias: torch.Tensor | None  # added once (TP rank 0 in the original)
    group: Any  # ProcessGroup of the reduce
    partial: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> x @ w.T (+ bias on rank 0)
    wrap: Callable[[torch.Tensor], Any] = lambda y: y  # the layer's return form
    why_opaque: str = ""  # why `weight` is None


def as_row_parallel(module: nn.Module) -> RowParallel | None:
    """Recognize a row-parallel linear that ends in an all-reduce.

    Protocol: a 2-D `weight`, `reduce_results` true, and the group as `tp_group`, or as
    `tp.group` (the reference model). vLLM's layers: `tp_passes.vllm.eager`.
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not getattr(module, "reduce_results", False):
        return None
    group = getattr(module, "tp_group", None) or getattr(getattr(module, "tp", None), "group", None)
    if group is None or dist.get_world_size(group) == 1:
        return None
    return RowParallel(w, getattr(module, "bias", None), group)


def _sp_forward(rp: RowParallel, device_type: str):
    g, n = rp.group.group_name, dist.get_world_size(rp.group)
    j = dist.get_rank(rp.group)
    bias = rp.bias if j == 0 else None
    fused, _ = mm_reduce_scatter_impl(device_type, n, g)

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        if rp.partial is not None:  # the layer's own matmul (or lookup): [..., F]
            p = rp.partial(x)
            p2 = p.reshape(-1, p.shape[-1])
            return rp.wrap(comm.gather_rows(comm.reduce_scatter_rows(p2, g, n), g, n, p2.shape[0]).view(p.shape))
        x2 = x.reshape(-1, x.shape[-1])
        ys = comm.mm_reduce_scatter(x2, rp.weight, bias, g, n) if bias is not None else fused(x2, rp.weight, g, n)
        return rp.wrap(comm.gather_rows(ys, g, n, x2.shape[0]).view(*x.shape[:-1], -1))

    return forward


def _flashcomm2_forward(rp: RowParallel, module: nn.Module, groups: Any, m: int):
    """FlashComm2 on a row-parallel layer whose `weight` is now the gathered [H, A/m] block."""
    n = dist.get_world_size(rp.group)
    otp, odp, g = groups[0].group_name, groups[1].group_name, rp.group.group_name
    bias = rp.bias  # the module's own parameter: a cast or a reload reaches it

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        x2 = x.reshape(-1, x.shape[-1])
        ys = comm.flashcomm2_rows(x2, self.weight, odp, n // m, otp, m)
        if bias is not None:
            ys = ys + bias
        return rp.wrap(comm.gather_rows(ys, g, n, x2.shape[0]).view(*x.shape[:-1], -1))

    return forward


# -- module TP across DP ranks ------------------------------------------------------------
#
# The graph path's own code, run on each selected module: the module is traced with
# make_fx (symbolic token count), the same matcher (`find_module_matches`) decides, and the
# same replacement is spliced into the module's graph, which becomes the module's forward.
# So the module's own work around the match (a vocab-parallel embedding's masking, a TP
# all-reduce after down_proj) stays, and both paths compute the same numbers. After the
# rewrite the module's parameters *are* the shards (as torch's parallelize_module or
# vLLM's layers hold them); the forward reads them from the module on every call, so
# `state_dict()`, `.to()` and weight loading see the truth.


@dataclass
class Candidate:
    """A module the config selects for module TP, and what the matcher made of it."""

    path: str
    module: nn.Module
    gm: fx.GraphModule  # module(x) traced: inputs (*parameters, x)
    all_leaves: list[str]  # the module's parameters, in input order
    match: ModuleMatch | None  # None: the traced module has no such pattern
    leaves: list[str] = field(default_factory=list)  # the match's weights, replacement order
    derived: list[weights.Derived] = field(default_factory=list)

    def invariant(self) -> tuple:
        return (self.path, self.match.invariant())


def _trace(module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list[str]]:
    """make_fx of module(x), token count symbolic, inputs (*parameters, x) positional."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    named = list(module.named_parameters(remove_duplicate=False))
    leaves = [n for n, _ in named]

    def call(*flat: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, dict(zip(leaves, flat[:-1])), (flat[-1],))
        return out[0] if isinstance(out, tuple) else out

    gm = make_fx(call, tracing_mode="symbolic")(*[p.detach() for _, p in named], x)
    gm.graph._codegen = fx.graph.CodeGen()  # positional inputs: shard inputs get appended
    gm.recompile()
    return gm, leaves


def _candidates(model: nn.Module, config: TPConfig) -> list[Candidate]:
    """Every module a module TP size selects and the matcher accepts (no collective)."""
    out = []
    for path, module in model.named_modules():
        w = getattr(module, "weight", None)
        kinds = [kind for kind in ("oproj_tp", "embedding_tp", "lmhead_tp")
                 if getattr(config, kind) and selects(config, kind, path) and isinstance(w, torch.Tensor)]
        names = mlp_names(module) if config.mlp_tp else None
        if names and not excluded(path, config.include_draft_and_vision) and (
            not config.names_for("mlp_tp", ()) or selects(config, "mlp_tp", path)
        ):
            kinds.append("mlp_tp")
            w = getattr(module, names[0]).weight
        if not kinds:
            continue
        kind = kinds[0]
        x = torch.zeros(3, dtype=torch.int64) if kind == "embedding_tp" else torch.zeros(3, w.shape[1], dtype=w.dtype)
        gm, leaves = _trace(module, x)
        one = dataclasses.replace(config, **{k: getattr(config, k) if k == kind else 0 for k in MODULE_NAME_KEYS})
        found = find_module_matches(gm, [f"{path}.{n}" for n in leaves] + ["x"], one, reduced_matmuls(gm.graph))
        if len(found) != 1:  # as the graph path: a module without the pattern is no match
            continue
        c = Candidate(path, module, gm, leaves, found[0])
        if any(str(n.target).startswith("c10d.") for n in gm.graph.nodes if n.op == "call_function"):
            # make_fx keeps dist.all_reduce as c10d.allreduce_ without its wait: the traced
            # graph would read the result before the collective completes
            c.match.reason = c.match.reason or (
                "eager: the module issues an in-place collective (dist.all_reduce), which its "
                "traced graph cannot run in order; the graph path (torch.compile) rewrites it")
        leaf_of = dict(zip(gm.graph.find_nodes(op="placeholder"), leaves))
        c.leaves = [leaf_of[w] for w in c.match.weights]
        out.append(c)
    return out


def _rewrite_module(c: Candidate, group: Any) -> None:
    """Splice the match's replacement into the module's graph; it becomes the forward."""
    m, gm, g, k = c.match, c.gm, group.group_name, c.match.k
    graph = gm.graph
    phs = list(graph.find_nodes(op="placeholder"))
    fake_mode = detect_fake_mode([ph.meta["val"] for ph in phs])
    shard_nodes = []
    for d in c.derived:
        with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
            node = graph.placeholder(f"shard_{len(shard_nodes)}")
        node.meta["val"] = fake_mode.from_tensor(d.value, static_shapes=True)
        shard_nodes.append(node)
    fn = module_tp_forward(m, g, k, dist.get_rank(group.pg), c.derived[0].source.shape[0])
    args = [m.x, *shard_nodes] + ([m.bias] if m.bias is not None else [])
    out = splice(graph, fn, args, m.out, fake_mode)
    m.out.replace_all_uses_with(out)
    graph.eliminate_dead_code()
    gm.recompile()
    module, embedding = c.module, m.kind == "embedding_tp"

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        params = [module.get_parameter(n) for n in c.all_leaves]
        shards = [module.get_parameter(n) for n in c.leaves]
        flat = x.reshape(-1, 1) if embedding else x.reshape(-1, x.shape[-1])
        padded, t_max = comm.pad_to_group_max(flat, g, k)  # the group's ranks may bring different T
        if t_max < 2:  # the graph was traced for a symbolic T >= 2 (torch specializes 0 and 1)
            padded = torch.nn.functional.pad(padded, (0, 0, 0, 2 - padded.shape[0]))
        y = gm(*params, padded.reshape(-1) if embedding else padded, *shards)
        y = y[0] if isinstance(y, (list, tuple)) else y
        return y[: flat.shape[0]].reshape(*(x.shape if embedding else x.shape[:-1]), y.shape[-1])

    module.forward = types.MethodType(forward, module)


def _apply_module_tp(cands: list[Candidate], layout: RankLayout) -> list[Entry]:
    """Shard the selected modules: their parameters become the shards (tied ones once)."""
    entries: list[Entry] = []
    todo = [c for c in cands if not c.match.reason]
    groups = {c.path: module_tp_group(c.match.k, layout) for c in todo}  # collective, agreed order
    for c in todo:
        specs = shard_specs(c.match.kind, len(c.leaves))
        full = [c.module.get_parameter(leaf) for leaf in c.leaves]
        c.derived = [weights.Derived(f"{c.path}.{leaf}", weights.WeightSpec(kind, dim, groups[c.path].pg), w, w)
                     for leaf, w, (kind, dim) in zip(c.leaves, full, specs)]
    weights.materialize([d for c in todo for d in c.derived])
    shards: dict[tuple, nn.Parameter] = {}  # (id(full), spec key) -> shard: tied weights share one
    for c in todo:
        before = after = 0
        for leaf, d in zip(c.leaves, c.derived):
            key = (id(d.source), d.spec.key())
            if key not in shards:
                shards[key] = nn.Parameter(d.value, requires_grad=False)
                after += d.value.numel() * d.value.element_size()
            before += d.source.numel() * d.source.element_size()
            owner, _, name = leaf.rpartition(".")
            setattr(c.module.get_submodule(owner) if owner else c.module, name, shards[key])
        _rewrite_module(c, groups[c.path])
        entries.append(Entry(c.match.kind, c.path, True, "", c.match.k,
                             {"weight_bytes_before": before, "weight_bytes_after": after}))
    return entries


def parallelize(
    model: nn.Module,
    config: TPConfig,
    *,
    device_type: str = "cpu",
    recognize: Callable[[nn.Module], RowParallel | None] = as_row_parallel,
) -> list[dict]:
    """Rewrite `model`'s modules in place; return one report entry per match.

    Collective: call on every rank with the same model and config. Before any other
    collective the ranks agree on the plan (config, matched modules, row-parallel layers):
    a mismatch raises on every rank instead of hanging. `recognize` finds the row-parallel
    linears (vLLM passes its own).
    """
    cands = _candidates(model, config) if config.module_tp_sizes() else []
    rps = {name: rp for name, module in model.named_modules() if (rp := recognize(module)) is not None}
    tp_groups = sorted({tuple(sorted(dist.get_process_group_ranks(rp.group))) for rp in rps.values()})
    invariant = {"config": config.to_dict(), "modules": [c.invariant() for c in cands], "row_parallel": sorted(rps)}
    local = ([c.match.has_bias for c in cands], tp_groups)
    everyone = agree_across_ranks(invariant, "the eager rewrite plan (config, matched modules or layers)", local)
    layout, why = RankLayout.infer([groups for _, groups in everyone])
    for i, c in enumerate(cands):
        c.match.decide(any(e[0][i] for e in everyone), layout, why)
    entries = [Entry(c.match.kind, c.path, False, c.match.reason, c.match.k, blocked=True)
               for c in cands if c.match.reason]
    if config.strict and entries:
        raise RuntimeError("tp_passes (strict): " + "; ".join(f"{e.rewrite} at {e.module}: {e.reason}" for e in entries))
    entries += _apply_module_tp(cands, layout) if any(not c.match.reason for c in cands) else []
    rewritten = tuple(c.path for c in cands if not c.match.reason)
    entries += _row_parallel(model, config, rps, rewritten, layout, why, device_type)
    return [asdict(e) for e in entries]


def _row_parallel(model, config: TPConfig, rps: dict, rewritten: tuple, layout, why: str,
                  device_type: str) -> list[Entry]:
    """FlashComm2 or reduce_scatter + all_gather on the layers that own their all-reduce."""
    entries = []
    sp = config.sequence_parallel in (True, "auto")
    fuse = config.fuse_mm_reduce_scatter in (True, "auto")
    m = config.flashcomm2
    for name, rp in rps.items():
        if any(name == p or name.startswith(p + ".") for p in rewritten):
            continue
        module = model.get_submodule(name)
        n = dist.get_world_size(rp.group)
        if m and selects(config, "oproj_tp", name):
            blocker = flashcomm2_size_error(m, n) or rp.why_opaque or (why if layout is None else "")
            if blocker:
                entry = Entry("flashcomm2", name, False, blocker, n, blocked=True)
                if config.strict:
                    raise RuntimeError(f"tp_passes (strict): {entry.rewrite} at {name}: {entry.reason}")
                entries.append(entry)
            else:
                groups = flashcomm2_groups(layout, m)
                d = weights.Derived(f"{name}.weight", weights.WeightSpec("gather", 1, groups[1].pg),
                                    rp.weight, rp.weight)
                weights.materialize([d])
                before = rp.weight.numel() * rp.weight.element_size()
                module.weight = nn.Parameter(d.value, requires_grad=False)  # the module holds the block
                module.forward = types.MethodType(_flashcomm2_forward(rp, module, groups, m), module)
                entries.append(Entry("flashcomm2", name, True, "", n, {
                    "weight_bytes_before": before, "weight_bytes_after": d.value.numel() * d.value.element_size()}))
                continue
        if sp or (config.fuse_mm_reduce_scatter is True):
            module.forward = types.MethodType(_sp_forward(rp, device_type), module)
            entries.append(Entry("mm_reduce_scatter" if fuse and rp.weight is not None else "sequence_parallel", name, True,
                                 "eager: reduce_scatter + all_gather inside the layer (same bytes as the all-reduce)", n))
    return entries
