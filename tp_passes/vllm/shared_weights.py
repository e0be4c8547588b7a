"""The shared-weight series inside vLLM, planned when the model is loaded.

A series (`shared_weights: ["o_proj"]`) is the selected layers of a model, in model order,
whose weights are equal on every rank of the series' group of k (`shared_weights_group`):
o_proj replicated across DP ranks, or FlashComm2's full-width o_proj across TP ranks (the
"o_shared" case). Layer i is kept on group rank ``i mod k``; the others receive it, into a
ring of ``prefetch_step + 1`` windows, ``prefetch_step`` layers ahead
(`tp_passes.patterns.shared_weights.Ring`, the same ring the eager path runs)::

    before (every rank holds W_i)
        y_i = layer_i(x)
    after (the layer's forward calls torch.ops.tp_passes.planned_layer(x, "shared_weights:<path>"))
        issue broadcast(W_{i+p} into its window, src = owner(i + p))   # async
        wait for W_i's broadcast; y_i = layer_i(x) with layer_i.weight = W_i's buffer

- **Load time.** `plan` runs right before vLLM's `process_weights_after_loading`, after
  FlashComm2 gathered its blocks: checks the weights are equal across the group
  (fingerprints, one collective), makes the ring (the first p windows broadcast), frees
  the weights of the layers this rank does not own, and marks the series' layers to keep
  plain weights on CPU (`_cpu_skip_gemm_dispatch`: a window's contents change every step,
  and a oneDNN prepack per step would cost more than the product it speeds up).
- **Run time.** Every rank of the group runs every layer of every forward (the TP group
  always does; a group across DP ranks needs vLLM's lockstep, as module TP does), so the
  broadcasts pair up. The op is opaque: compiled graphs and ``enforce_eager`` run the same
  body.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tp_passes import weights
from tp_passes.config import TPConfig
from tp_passes.groups.layout import SeriesSchedule
from tp_passes.groups.registry import shared_weight_group, shared_weight_partition
from tp_passes.owner import owner
from tp_passes.patterns.shared_weights import (
    Ring,
    _selected,
    make_ring,
    no_saving,
    series_entry,
    unequal_weights,
)
from tp_passes.report import Entry, refuse_blocked
from tp_passes.vllm.dp_op import _planned, route_linear


@dataclass
class SeriesLayer:
    """Layer `i` of a series: its forward runs with its weight from the ring."""

    path: str
    layer: nn.Module
    ring: Ring
    i: int
    width: int  # output features
    run: Callable[[torch.Tensor], torch.Tensor] | None = None  # the body, set by `install`

    @property
    def key(self) -> str:
        return f"shared_weights:{self.path}"

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ring.enter(self.i)  # issues the broadcast p layers ahead, waits for mine
        params = self.layer._parameters
        saved, params["weight"] = params["weight"], w
        try:
            assert self.run is not None
            return self.run(x)
        finally:
            params["weight"] = saved


def plans() -> weakref.WeakKeyDictionary:
    """vLLM model -> (its series' layers, entries), made when its weights were loaded."""
    return owner().integrations.setdefault("vllm.shared_weights", weakref.WeakKeyDictionary())


def _why_not(module: nn.Module) -> str:
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    if not isinstance(module, LinearBase):
        return f"{type(module).__name__} is not one of vLLM's linear layers"
    if not isinstance(module.quant_method, UnquantizedLinearMethod):
        return f"weight is quantized ({type(module.quant_method).__name__}): not implemented"
    return ""


def plan(model: nn.Module, vllm_config: Any, config: TPConfig) -> tuple[list, list[Entry]]:
    """Make every configured series' ring and free the layers this rank does not own.
    Collective over vLLM's world group."""
    from tp_passes.vllm.config import layout_of, lockstep_reason

    if not config.shared_weights:
        return [], []
    layout, which = layout_of(vllm_config), config.shared_weights_group
    k = len(shared_weight_partition(layout, which)[0])
    spans_dp = which != "tp" and vllm_config.parallel_config.data_parallel_size > 1
    found: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        series = _selected(config.shared_weights, path, config)
        if series is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            found.setdefault(series, []).append((path, module))
    layers, entries = [], []
    for series, members in found.items():
        name, ws = f"{series} series", [m.weight for _, m in members]
        sched = SeriesSchedule(len(members), k, config.prefetch_step)
        shapes = sorted({(str(w.dtype), tuple(w.shape)) for w in ws})
        why = (
            (lockstep_reason(vllm_config) if spans_dp else "")
            or next((w for _, m in members if (w := _why_not(m))), "")
            or (f"the layers' weights differ in shape or dtype: {shapes}" if len(shapes) > 1 else "")
            or sched.error()
        )
        if not why and (skip := no_saving(sched, config)):
            entries.append(Entry("shared_weights", name, False, skip, k))
            continue
        names = [f"{p}.weight" for p, _ in members]
        why = why or unequal_weights(names, ws, layout, which)  # collective
        if why:
            entries.append(Entry("shared_weights", name, False, why, k, blocked=True))
            refuse_blocked(entries[-1:], config.strict)
            continue
        group = shared_weight_group(layout, which)
        j = dist.get_rank(group.pg)
        owned = {i: ws[i] for i in sched.owned(j)}
        ring = make_ring(names, sched, group, (tuple(ws[0].shape), ws[0].dtype, ws[0].device), owned)
        for i, (path, module) in enumerate(members):
            module._cpu_skip_gemm_dispatch = True  # plain weights: windows change each step
            if i not in owned:
                weights.release(ws[i], names[i], f"shared_weights at {name}", module, "weight")
            layers.append(SeriesLayer(path, module, ring, i, ws[0].shape[0]))
        entries.append(series_entry(name, ring, ws[0].numel() * ws[0].element_size()))
    return layers, entries


def install(layers: list[SeriesLayer], bodies: dict[str, Callable]) -> None:
    """Route each series layer through ``tp_passes.planned_layer``. `bodies`: path -> the
    layer's body where another load-time rewrite already replaced it (FlashComm2);
    otherwise the layer's own forward."""
    for s in layers:
        own = s.layer.forward
        s.run = bodies.get(s.path) or (lambda x, own=own: _output(own(x)))
        _planned()[s.key] = s
        route_linear(s.layer, s.key)


def _output(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def plan_loaded_model(model: nn.Module, vllm_config: Any) -> None:
    """Before vLLM's weight post-processing, after FlashComm2's plan (see `plan`)."""
    from tp_passes.vllm.config import config_from_vllm

    plans()[model] = plan(model, vllm_config, config_from_vllm(vllm_config))
