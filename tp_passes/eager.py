"""The eager path: the same rewrites applied to modules, for code that is not compiled.

    tp_passes.parallelize(model, tp_passes.TPConfig(flashcomm2=1))

This is the eager driver: it finds the modules each rewrite family can take, agrees on
the plan with the other ranks, then calls each family's eager twin (in
`tp_passes.patterns`), built from the same `tp_passes.comm` functions the graph rewrites
trace, so the two paths compute the same numbers:

- module TP across DP ranks (o_proj, embedding, lm_head, MLP): the selected module is
  traced and the graph replacement spliced into it (`module_tp.parallelize_modules`);
- FlashComm2: all_to_all + full-width o_proj + all_gather; the gathered weight is made
  once here and becomes the layer's `weight`;
- sequence parallelism / mm + reduce-scatter: ``all_gather(reduce_scatter(x @ w.T))``
  inside the layer (the same bytes as the all-reduce: it exists for parity);
- shared-weight series, last: each layer's weight kept on one rank of a group and
  broadcast ahead of its use into a ring of windows (`shared_weights.share_eager`).

Layers that own their all-reduce (a row-parallel linear whose forward ends in the reduce)
are found by a `recognize` function (vLLM passes its own). Where o_proj is a plain
`nn.Linear` and the all-reduce of its product is issued by its parent (the attention
module's forward, the usual hand-written TP layout), the parent is traced with make_fx on
hidden states ``[T, H]`` and the graph driver (`rewrite_graph`: the graph path's matcher,
decision and replacement) rewrites that graph, which becomes the parent's forward
(`_rewrite_parents`).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tp_passes.config import MODULE_NAME_KEYS, TPConfig
from tp_passes.fx import functionalize_all_reduces
from tp_passes.groups.layout import RankLayout
from tp_passes.groups.registry import agree_across_ranks
from tp_passes.patterns import REWRITES, FlashComm2, GraphContext, ModuleTP, SequenceParallel
from tp_passes.patterns import shared_weights
from tp_passes.patterns.base import nothing_matched
from tp_passes.patterns.module_tp import find_module_candidates, parallelize_modules, selects
from tp_passes.report import Entry, refuse_blocked


def _as_is(y: torch.Tensor) -> torch.Tensor:
    return y


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
    wrap: Callable[[torch.Tensor], Any] = _as_is  # the layer's return form
    why_opaque: str = ""  # why `weight` is None


def as_row_parallel(module: nn.Module) -> RowParallel | None:
    """Recognize a row-parallel linear that ends in an all-reduce.

    Protocol: a 2-D `weight`, `reduce_results` true, and the group as `tp_group`, or as
    `tp.group` (the reference model). vLLM's layers: `tp_passes.vllm.eager`.
    """
    w = getattr(module, "weight", None)
    if (
        not isinstance(w, torch.Tensor)
        or w.dim() != 2
        or not getattr(module, "reduce_results", False)
    ):
        return None
    group = getattr(module, "tp_group", None) or getattr(getattr(module, "tp", None), "group", None)
    if group is None or dist.get_world_size(group) == 1:
        return None
    return RowParallel(w, getattr(module, "bias", None), group)


def parallelize(
    model: nn.Module,
    config: TPConfig | Mapping[str, Any],
    *,
    device_type: str = "cpu",
    recognize: Callable[[nn.Module], RowParallel | None] = as_row_parallel,
) -> list[dict]:
    """Rewrite `model`'s modules in place; return one report entry per match.

    Collective: call on every rank with the same model and config. Before any other
    collective the ranks agree on the plan (config, matched modules, row-parallel layers):
    a mismatch raises on every rank instead of hanging. `config`: a `TPConfig`, or a dict
    as torch.compile's options take (`TPConfig.from_dict`).
    """
    if isinstance(config, Mapping):
        config = TPConfig.from_dict(config)
    elif not isinstance(config, TPConfig):
        raise TypeError(
            f"tp_passes.parallelize: config must be a TPConfig or a dict, got {type(config).__name__}"
        )
    module_tp = [r for r in REWRITES if isinstance(r, ModuleTP)]
    cands = find_module_candidates(model, config, module_tp) if config.module_tp_sizes() else []
    rps = {
        name: rp for name, module in model.named_modules() if (rp := recognize(module)) is not None
    }
    tp_groups = sorted(
        {tuple(sorted(dist.get_process_group_ranks(rp.group))) for rp in rps.values()}
    )
    series = shared_weights.find_eager(model, config)
    parents = _reducing_parents(model, config, rps)
    invariant = {
        "config": config.to_dict(),
        "modules": [c.invariant() for c in cands],
        "row_parallel": sorted(rps),
        "parents": parents,
        "series": series,
    }
    local = ([c.match.local() for c in cands], tp_groups)
    everyone = agree_across_ranks(
        invariant, "the eager rewrite plan (config, matched modules or layers)", local
    )
    layout, why = RankLayout.infer([groups for _, groups in everyone])
    for i, c in enumerate(cands):
        c.cx.layout, c.cx.layout_reason = layout, why
        c.rewrite.decide(c.match, [e[0][i] for e in everyone], c.cx)
    entries = [
        Entry(c.rewrite.name, c.path, False, c.match.reason, c.match.size, blocked=True)
        for c in cands
        if not c.match.apply
    ]
    refuse_blocked(entries, config.strict)
    entries += parallelize_modules(cands)
    rewritten = tuple(c.path for c in cands if c.match.apply)
    cx = GraphContext(None, config, [], [], None, layout=layout, layout_reason=why)
    entries += _row_parallel(model, cx, rps, rewritten, device_type)
    done, hosts = _rewrite_parents(model, config, parents)
    entries += done
    # last, as on the graph path: a series shares the weight each layer reads by now
    entries += shared_weights.share_eager(model, config, layout, why, series, hosts)
    missing = [
        Entry("shared_weights", f"{name} series", False, f"configured, but no module named "
              f"{name!r} with a 2-D weight is in the model", 0, blocked=True)
        for name in config.shared_weights
        if name not in series
    ]
    seen = {e.rewrite for e in entries}
    if "mm_reduce_scatter" in seen:  # the sequence-parallel family's fused form
        seen.add("sequence_parallel")
    missing += nothing_matched(REWRITES, config, seen | {"shared_weights"}, "the model")
    refuse_blocked(missing, config.strict)
    return [asdict(e) for e in entries + missing]


def _row_parallel(
    model: nn.Module,
    cx: GraphContext,
    rps: dict[str, RowParallel],
    rewritten: tuple[str, ...],
    device_type: str,
) -> list[Entry]:
    """FlashComm2, else sequence parallelism, on the layers that own their all-reduce."""
    fc2 = next(r for r in REWRITES if isinstance(r, FlashComm2))
    sp = next(r for r in REWRITES if isinstance(r, SequenceParallel))
    entries = []
    for name, rp in rps.items():
        if any(name == p or name.startswith(p + ".") for p in rewritten):
            continue
        module = model.get_submodule(name)
        if cx.config.flashcomm2 and selects(cx.config, "oproj_tp", name):
            blocker = fc2.blocker_eager(rp, cx)
            if not blocker:
                entries.append(fc2.parallelize(name, module, rp, cx))
                continue
            n = dist.get_world_size(rp.group)
            entries.append(Entry(fc2.name, name, False, blocker, n, blocked=True))
            refuse_blocked(entries[-1:], cx.config.strict)
        if (entry := sp.parallelize(name, module, rp, cx, device_type)) is not None:
            entries.append(entry)
    return entries


def _reducing_parents(
    model: nn.Module, config: TPConfig, rps: dict[str, RowParallel]
) -> list[str]:
    """Modules with a selected o_proj that is a plain `nn.Linear` no `recognize` claimed:
    the all-reduce of its product is issued around it (its parent's forward)."""
    if not config.flashcomm2:
        return []
    out = []
    for path, module in model.named_modules():
        if path in rps:
            continue
        for child, sub in module.named_children():
            full = f"{path}.{child}" if path else child
            if type(sub) is nn.Linear and full not in rps and selects(config, "oproj_tp", full):
                out.append(path)
                break
    return out


def _trace_parent(module: nn.Module, h: int) -> dict[int, Any] | str:
    """make_fx of ``module(x)`` on hidden states x of [T, h] and of [B, T, h] (T, B
    symbolic), in-place all-reduces made functional: {x.dim(): (graph, parameter names)},
    the forms the module traces in; or why it traces in neither."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    params = inspect.signature(module.forward).parameters.values()
    required = [
        p for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) != 1:
        return (
            f"its forward takes {len(required)} required arguments, not only the hidden states: "
            "the eager path cannot trace it (compile the model: backend='tp_passes')"
        )
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which a replaced forward would run twice"
    named = list(module.named_parameters(remove_duplicate=False))
    leaves = [n for n, _ in named]
    w = named[0][1]

    def call(*flat: Any) -> Any:
        return functional_call(module, dict(zip(leaves, flat[:-1])), (flat[-1],))

    # 2 rows per rank or more, so no per-rank row count specializes to 1
    t = 2 * dist.get_world_size() + 1
    out, why = {}, ""
    for shape in ((t, h), (3, t, h)):
        try:
            x = torch.zeros(shape, dtype=w.dtype, device=w.device)
            gm = make_fx(call, tracing_mode="symbolic")(*[p.detach() for _, p in named], x)
        except Exception as e:  # noqa: BLE001 - any failure is a skip reason, agreed after
            why = why or f"tracing it on hidden states {list(shape)} failed: {type(e).__name__}: {e}"
            continue
        gm.graph._codegen = torch.fx.graph.CodeGen()  # positional: derived inputs get appended
        functionalize_all_reduces(gm)
        out[len(shape)] = (gm, leaves)
    return out or why


def _rewrite_parents(
    model: nn.Module, config: TPConfig, parents: list[str]
) -> tuple[list[Entry], dict[str, str]]:
    """FlashComm2 on o_proj linears whose all-reduce their parent issues: the parent's
    traced graphs go through the graph driver, and become the parent's forward.

    The derived weights are held by the modules, as on the row-parallel eager twin: the
    gathered o_proj block becomes o_proj's `weight`, others (a summed bias) buffers of
    the parent. Returns the entries and {o_proj path: parent path} of the rewritten
    parents (o_proj's own forward no longer runs: its weight is read by the parent's).
    Collective: every rank, the same `parents` (agreed by the caller).
    """
    from tp_passes.backend import rewrite_graph

    only = dataclasses.replace(
        config,
        sequence_parallel=False,  # eagerly nothing stays token-sharded after the layer
        fuse_mm_reduce_scatter=False,
        shared_weights=(),
        **{k: 0 for k in MODULE_NAME_KEYS},
    )
    traced = []
    for path in parents:
        module = model.get_submodule(path)
        o_proj = next(
            sub for c, sub in module.named_children()
            if type(sub) is nn.Linear and selects(config, "oproj_tp", f"{path}.{c}" if path else c)
        )
        traced.append((o_proj, _trace_parent(module, o_proj.weight.shape[0])))
    forms = [t if isinstance(t, str) else sorted(t) for _, t in traced]
    everyone = agree_across_ranks(parents, "the eager rewrite plan (parents)", forms)
    entries, hosts = [], {}
    paths = {m: p for p, m in model.named_modules()}
    for i, (path, (o_proj, t)) in enumerate(zip(parents, traced)):
        why = next((f[i] for f in everyone if isinstance(f[i], str)), "")
        if why or len({tuple(f[i]) for f in everyone}) > 1:
            why = why or "its traced forms differ across ranks"
            entries.append(Entry("flashcomm2", path, False, why, 0, blocked=True))
            continue
        module = model.get_submodule(path)
        rewritten = {}
        for ndim, (gm, leaves) in t.items():
            params = [module.get_parameter(leaf) for leaf in leaves]
            names = [f"{path}.{leaf}" if path else leaf for leaf in leaves] + ["x"]
            done = rewrite_graph(gm, only, [*params, torch.zeros(3, 1)], names)
            found = [e for e in done.entries if e.rewrite == "flashcomm2"]
            if not done.matches:  # a form it cannot rewrite: the module is left as it is
                why = "; ".join(e.reason for e in found) or "no o_proj all-reduce in the trace"
                entries.append(Entry("flashcomm2", path, False, f"{ndim}-D hidden states: {why}",
                                     0, blocked=True))
                break
            rewritten[ndim] = (gm, leaves, done.derived)
        else:
            _install_parent(module, rewritten)
            entries += found
            hosts[paths[o_proj]] = path
    refuse_blocked(entries, config.strict)
    return entries, hosts


def _install_parent(module: nn.Module, rewritten: dict[int, tuple[Any, list[str], list]]) -> None:
    """The rewritten graphs become the forward, chosen by the hidden states' rank; each
    takes the parameters, x, then its derived weights."""
    forms = {}
    for ndim, (gm, leaves, derived) in rewritten.items():
        slots: list[tuple[bool, str]] = []  # (a parameter?, its name) per derived input
        for i, d in enumerate(derived):
            if d.spec.kind == "gather" and d.source_index is not None:
                leaf = leaves[d.source_index]  # o_proj holds its gathered block
                owner, _, name = leaf.rpartition(".")
                block = nn.Parameter(d.value, requires_grad=False)
                setattr(module.get_submodule(owner), name, block)
                slots.append((True, leaf))
            else:
                module.register_buffer(f"tp_passes_{ndim}d_{i}", d.value, persistent=False)
                slots.append((False, f"tp_passes_{ndim}d_{i}"))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        forms[ndim] = (gm, leaves, slots)
    hidden = next(iter(rewritten.values()))[0].graph.find_nodes(op="placeholder")
    width = hidden[len(next(iter(rewritten.values()))[1])].meta["val"].shape[-1]
    traced = {n: p.dtype for n, p in module.named_parameters()}  # the graphs bake casts in

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        if x.dim() not in forms or x.shape[-1] != width:
            raise ValueError(
                f"tp_passes: this module was rewritten for hidden states of "
                f"{' or '.join(f'{n}-D' for n in sorted(forms))} [..., {width}] (FlashComm2 on "
                f"the eager path); got x of shape {tuple(x.shape)}"
            )
        gm, leaves, slots = forms[x.dim()]
        params = [_read(self, leaf) for leaf in leaves]
        cast = [(n, traced[n], p.dtype) for n, p in zip(leaves, params) if traced.get(n, p.dtype) != p.dtype]
        if cast:
            n, was, now = cast[0]
            raise TypeError(
                f"tp_passes: this module's forward was rewritten by tp_passes.parallelize "
                f"(FlashComm2, traced with {n} in {was}); {n} is now {now}. Cast the model "
                "before parallelize, or compile it (backend='tp_passes'), which follows casts"
            )
        derived = [_read(self, n) if param else self.get_buffer(n) for param, n in slots]
        return gm(*params, x, *derived)

    module.forward = types.MethodType(forward, module)


def _read(module: nn.Module, path: str) -> torch.Tensor:
    """The tensor in a parameter slot, also while a shared-weight series lends it a ring
    window (a plain tensor, which `get_parameter` refuses)."""
    owner, _, name = path.rpartition(".")
    return module.get_submodule(owner)._parameters[name]
