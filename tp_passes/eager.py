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
are found by a `recognize` function (vLLM passes its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tp_passes.config import TPConfig
from tp_passes.groups.layout import RankLayout
from tp_passes.groups.registry import agree_across_ranks
from tp_passes.patterns import REWRITES, FlashComm2, GraphContext, ModuleTP, SequenceParallel
from tp_passes.patterns import shared_weights
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
    config: TPConfig,
    *,
    device_type: str = "cpu",
    recognize: Callable[[nn.Module], RowParallel | None] = as_row_parallel,
) -> list[dict]:
    """Rewrite `model`'s modules in place; return one report entry per match.

    Collective: call on every rank with the same model and config. Before any other
    collective the ranks agree on the plan (config, matched modules, row-parallel layers):
    a mismatch raises on every rank instead of hanging.
    """
    module_tp = [r for r in REWRITES if isinstance(r, ModuleTP)]
    cands = find_module_candidates(model, config, module_tp) if config.module_tp_sizes() else []
    rps = {
        name: rp for name, module in model.named_modules() if (rp := recognize(module)) is not None
    }
    tp_groups = sorted(
        {tuple(sorted(dist.get_process_group_ranks(rp.group))) for rp in rps.values()}
    )
    series = shared_weights.find_eager(model, config)
    invariant = {
        "config": config.to_dict(),
        "modules": [c.invariant() for c in cands],
        "row_parallel": sorted(rps),
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
    # last, as on the graph path: a series shares the weight each layer reads by now
    entries += shared_weights.share_eager(model, config, layout, why, series)
    return [asdict(e) for e in entries]


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
