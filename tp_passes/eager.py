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
  once at `parallelize` time.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tp_passes import comm, weights
from tp_passes.config import TPConfig
from tp_passes.groups.registry import flashcomm2_groups, module_tp_group
from tp_passes.lowering import mm_reduce_scatter_impl
from tp_passes.patterns.flashcomm2 import flashcomm2_size_error
from tp_passes.patterns.module_tp import excluded, mlp_names, selects
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


def _flashcomm2_forward(rp: RowParallel, m: int, release: bool):
    tp = rp.group
    n = dist.get_world_size(tp)
    G = n // m
    otp, odp = flashcomm2_groups(tp, m)
    w_block = weights.materialize(rp.weight, weights.WeightSpec("gather", 1, odp.pg))
    bias = rp.bias.detach().clone() if rp.bias is not None else None
    if release:
        weights.release([rp.weight])
    g = tp.group_name

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        x2 = x.reshape(-1, x.shape[-1])
        ys = comm.flashcomm2_rows(x2, w_block, odp.group_name, G, otp.group_name, m)
        if bias is not None:
            ys = ys + bias
        return rp.wrap(comm.gather_rows(ys, g, n, x2.shape[0]).view(*x.shape[:-1], -1))

    return forward, w_block


# -- module TP across DP ranks ------------------------------------------------------------


def _module_group(k: int) -> tuple[Any, str, int]:
    """(process group, group name, my index) of my module TP group of size k."""
    g = module_tp_group(k, tp=1)
    return g.pg, g.group_name, dist.get_rank(g.pg)


def _tokens_first(fn, g: str, k: int):
    """Wrap fn(x2d) -> [T', F]: flatten leading dims, pad T to the group max, unpad."""

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
        xp, _ = comm.pad_to_group_max(x2, g, k)
        out = fn(xp)[: x2.shape[0]]
        lead = x.shape[:-1] if x.dim() > 1 else x.shape
        return out.reshape(*lead, out.shape[-1])

    return run


def _oproj_forward(w: torch.Tensor, bias: torch.Tensor | None, k: int):
    pg, g, j = _module_group(k)
    w_j = weights.materialize(w, weights.WeightSpec("shard", 1, pg))  # input columns chunk j
    return _tokens_first(lambda x: comm.oproj_dp(x, w_j, g, k) + (0 if bias is None else bias), g, k)


def _embedding_forward(w: torch.Tensor, k: int):
    pg, g, j = _module_group(k)
    w_j = weights.materialize(w, weights.WeightSpec("shard", 0, pg))  # vocab rows chunk j (padded)
    run = _tokens_first(lambda ids: comm.embedding_dp(ids, w_j, j, g, k), g, k)
    return lambda ids: run(ids.unsqueeze(-1)).reshape(*ids.shape, -1)


def _lmhead_forward(w: torch.Tensor, k: int):
    pg, g, j = _module_group(k)
    w_j, vocab = weights.materialize(w, weights.WeightSpec("shard", 0, pg)), w.shape[0]  # tied: same shard
    return _tokens_first(lambda h: comm.lmhead_dp(h, w_j, g, k, vocab), g, k)


def _mlp_forward(up_weights: list[torch.Tensor], down: torch.Tensor, act, k: int):
    """up_weights: [merged gate_up] or [gate, up]."""
    pg, g, j = _module_group(k)
    if len(up_weights) == 1:
        gate_j, up_j = weights.materialize(up_weights[0], weights.WeightSpec("shard_halves", 0, pg)).chunk(2)
    else:
        gate_j, up_j = (weights.materialize(w, weights.WeightSpec("shard", 0, pg)) for w in up_weights)
    down_j = weights.materialize(down, weights.WeightSpec("shard", 1, pg))
    return _tokens_first(lambda x: comm.mlp_dp(x, gate_j, up_j, down_j, g, k, act), g, k)


def _module_tp(model: nn.Module, config: TPConfig) -> tuple[list[Entry], list[torch.Tensor]]:
    """Apply oproj/embedding/lmhead/mlp TP to modules; return entries and the full weights."""
    entries: list[Entry] = []
    full: list[torch.Tensor] = []
    named = dict(model.named_modules())

    def rewrite(path: str, module: nn.Module, kind: str, k: int, fwd, used: list[torch.Tensor]) -> None:
        module.forward = types.MethodType(lambda self, x: fwd(x), module)
        before = sum(w.numel() * w.element_size() for w in used)
        entries.append(Entry(kind, path, True, "", k, {"weight_bytes_before": before,
                                                       "weight_bytes_after_approx": before // k}))
        full.extend(used)

    for path, module in named.items():
        w = getattr(module, "weight", None)
        if config.oproj_tp and selects(config, "oproj_tp", path) and isinstance(w, torch.Tensor):
            k = config.oproj_tp
            rewrite(path, module, "oproj_tp", k, _oproj_forward(w, getattr(module, "bias", None), k), [w])
        elif config.embedding_tp and selects(config, "embedding_tp", path) and isinstance(w, torch.Tensor):
            k = config.embedding_tp
            rewrite(path, module, "embedding_tp", k, _embedding_forward(w, k), [w])
        elif config.lmhead_tp and selects(config, "lmhead_tp", path) and isinstance(w, torch.Tensor):
            k = config.lmhead_tp
            rewrite(path, module, "lmhead_tp", k, _lmhead_forward(w, k), [w])
        elif (
            config.mlp_tp
            and (names := mlp_names(module)) is not None
            and not excluded(path, config.include_draft_and_vision)
            and (not config.names_for("mlp_tp", ()) or selects(config, "mlp_tp", path))
        ):
            k = config.mlp_tp
            *ups, down = [getattr(module, n).weight for n in names]
            rewrite(path, module, "mlp_tp", k, _mlp_forward(ups, down, getattr(module, "act_fn", F.silu), k), [*ups, down])
    return entries, full


def parallelize(
    model: nn.Module,
    config: TPConfig,
    *,
    device_type: str = "cpu",
    recognize: Callable[[nn.Module], RowParallel | None] = as_row_parallel,
) -> list[dict]:
    """Rewrite `model`'s row-parallel linears in place; return one report entry per match.

    Collective (FlashComm2 gathers weights): call on every rank with the same model and
    config. `recognize` finds the row-parallel linears (vLLM passes its own).
    """
    entries, full_weights = _module_tp(model, config) if config.module_tp_sizes() else ([], [])
    if config.release_weights:
        weights.release(full_weights)
    sp = config.sequence_parallel in (True, "auto")
    fuse = config.fuse_mm_reduce_scatter in (True, "auto")
    rewritten = {e.module for e in entries}
    for name, module in model.named_modules():
        rp = recognize(module) if name not in rewritten else None
        if rp is None:
            continue
        n = dist.get_world_size(rp.group)
        m = config.flashcomm2
        if m and selects(config, "oproj_tp", name):
            why = flashcomm2_size_error(m, n) or rp.why_opaque
            if why:
                entry = Entry("flashcomm2", name, False, why, n, blocked=True)
                if config.strict:
                    raise RuntimeError(f"tp_passes (strict): {entry.rewrite} at {name}: {entry.reason}")
                entries.append(entry)
            else:
                fwd, w_block = _flashcomm2_forward(rp, m, config.release_weights)
                module.forward = types.MethodType(fwd, module)
                entries.append(Entry("flashcomm2", name, True, "", n, {"weight_bytes_after": w_block.numel() * w_block.element_size()}))
                continue
        if sp or (config.fuse_mm_reduce_scatter is True):
            module.forward = types.MethodType(_sp_forward(rp, device_type), module)
            entries.append(Entry("mm_reduce_scatter" if fuse and rp.weight is not None else "sequence_parallel", name, True,
                                 "eager: reduce_scatter + all_gather inside the layer (same bytes as the all-reduce)", n))
    return [asdict(e) for e in entries]
