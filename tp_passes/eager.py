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
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tp_passes import comm, weights
from tp_passes.config import TPConfig
from tp_passes.groups import RankLayout
from tp_passes.groups.registry import ensure_partition, init_groups, registry_or_none
from tp_passes.lowering import mm_reduce_scatter_impl
from tp_passes.patterns.flashcomm2 import flashcomm2_size_error, is_o_proj
from tp_passes.report import Entry


@dataclass
class RowParallel:
    """What the eager rewrites need to know about a row-parallel linear."""

    weight: torch.Tensor  # [H, A/n]
    bias: torch.Tensor | None  # added once (TP rank 0 in the original)
    group: Any  # ProcessGroup of the reduce


def as_row_parallel(module: nn.Module) -> RowParallel | None:
    """Recognize a row-parallel linear that ends in an all-reduce.

    Protocol: a 2-D `weight`, `reduce_results` true, and the group as `tp_group`, or as
    `tp.group` (the reference model). vLLM's layer is recognized by the vLLM plugin.
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

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ys = comm.mm_reduce_scatter(x2, rp.weight, bias, g, n) if bias is not None else fused(x2, rp.weight, g, n)
        return comm.gather_rows(ys, g, n, x2.shape[0]).view(*x.shape[:-1], -1)

    return forward


def _flashcomm2_forward(rp: RowParallel, m: int, release: bool):
    tp = rp.group
    n, j = dist.get_world_size(tp), dist.get_rank(tp)
    G = n // m
    ranks = dist.get_process_group_ranks(tp)
    reg = registry_or_none()
    if reg is None:
        world = dist.get_world_size()
        reg = init_groups(TPConfig(flashcomm2=m), RankLayout(world, tp=n, dp=world // n))
    otp_lists, odp_lists = reg.layout.flashcomm2_groups(m)
    if sorted(ranks) not in [sorted(g) for g in reg.layout.tp_groups()]:
        raise RuntimeError(f"tp_passes: module TP group {ranks} is not a TP group of {reg.layout}")
    otp = ensure_partition(reg, f"fc2_otp_{m}", otp_lists)
    odp = ensure_partition(reg, f"fc2_odp_{m}", odp_lists)
    w_block = weights.materialize(rp.weight, weights.WeightSpec("gather", 1, odp.pg))
    bias = rp.bias.detach().clone() if rp.bias is not None else None
    if release:
        weights.release(rp.weight)
    g = tp.group_name

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ys = comm.flashcomm2_rows(x2, w_block, odp.group_name, G, otp.group_name, m)
        if bias is not None:
            ys = ys + bias
        return comm.gather_rows(ys, g, n, x2.shape[0]).view(*x.shape[:-1], -1)

    return forward, w_block


def parallelize(model: nn.Module, config: TPConfig, *, device_type: str = "cpu") -> list[dict]:
    """Rewrite `model`'s row-parallel linears in place; return one report entry per match.

    Collective (FlashComm2 gathers weights): call on every rank with the same model and
    config.
    """
    entries: list[Entry] = []
    sp = config.sequence_parallel in (True, "auto")
    fuse = config.fuse_mm_reduce_scatter in (True, "auto")
    for name, module in model.named_modules():
        rp = as_row_parallel(module)
        if rp is None:
            continue
        n = dist.get_world_size(rp.group)
        m = config.flashcomm2
        if m and is_o_proj(name):
            why = flashcomm2_size_error(m, n)
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
            entries.append(Entry("mm_reduce_scatter" if fuse else "sequence_parallel", name, True,
                                 "eager: reduce_scatter + all_gather inside the layer (same bytes as the all-reduce)", n))
    return [asdict(e) for e in entries]
