"""FlashComm2 on vLLM's o_proj layers, planned when the model is loaded.

vLLM's row-parallel o_proj on TP rank t of n holds W[:, block t] ([H, A/n]) and ends in an
all-reduce of partial products. FlashComm2 (m = flashcomm2, G = n/m, `comm.flashcomm2_rows`)
moves the exchange before the matmul::

    before (vLLM's layer)
        y = all_reduce(layer.quant_method.apply(layer, x, bias if t == 0))   # x [T, A/n]
    after (layer.weight is W[:, block of my ODP group], [H, A/m]: full width for m = 1)
        y = torch.ops.tp_passes.planned_layer(x, "flashcomm2:<path>")
          = all_gather_tp(reduce_scatter_otp(apply(all_to_all_odp(x))) + bias)

- **Load time.** `plan` runs right before vLLM's `process_weights_after_loading`: the ODP
  group gathers its TP shards into the block each rank needs, so whatever vLLM's platform
  makes of a weight after loading (a oneDNN prepacked handle on CPU, NZ format on Ascend)
  is made from it, and `apply` is the layer's own kernel. The graph rewrite cannot do this:
  by the time anything is compiled, the CPU weight is a prepacked handle.
- **Run time.** `install` routes the layer's forward through the op (compiled and
  ``enforce_eager`` alike); the collectives are vLLM's coordinators' for the groups (CPU
  shared memory). Every TP rank holds the same tokens, so nothing is agreed per step.
- **Bias.** vLLM adds a row-parallel bias on TP rank 0 only, before the reduce; here each
  rank's token piece is a whole sum, so the (replicated) bias is added to it once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from tp_passes import comm
from tp_passes.config import TPConfig
from tp_passes.groups.registry import NamedGroup, agree_across_ranks, flashcomm2_groups
from tp_passes.owner import owner
from tp_passes.patterns.base import weight_bytes
from tp_passes.patterns.flashcomm2 import flashcomm2_size_error
from tp_passes.patterns.module_tp import selects
from tp_passes.report import Entry, refuse_blocked
from tp_passes.vllm.dp_op import VLLMCollectives, _planned, route_linear
from tp_passes.weights import WeightSpec, derive

WHY = "planned at model load: o_proj block gathered before vLLM's weight post-processing"


@dataclass
class FlashComm2Layer:
    """One vLLM o_proj holding its ODP group's block of the weight."""

    path: str
    layer: nn.Module
    m: int  # flashcomm2
    width: int  # H, o_proj's output features (vLLM's CPU prepack empties layer.weight)
    groups: tuple[NamedGroup, NamedGroup, Any]  # OTP, ODP, vLLM's TP coordinator
    details: dict[str, Any] = field(default_factory=dict)
    collectives: tuple[comm.Collectives, ...] = ()  # set by `install`

    @property
    def key(self) -> str:
        return f"flashcomm2:{self.path}"

    @property
    def n(self) -> int:
        return self.groups[2].world_size

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The op's body: head-sharded x [..., A/n] -> y [..., H], every token."""
        layer, (otp, odp, tp) = self.layer, self.collectives
        x2 = x.reshape(-1, x.shape[-1])
        ys = comm.flashcomm2_rows(
            x2,
            None,
            odp,
            self.n // self.m,
            otp if self.m > 1 else None,
            self.m,
            mm=lambda v: layer.quant_method.apply(layer, v, None),
        )
        if layer.bias is not None and not layer.skip_bias_add:
            ys = ys + layer.bias
        return comm.gather_rows(ys, tp, self.n, x2.shape[0]).reshape(*x.shape[:-1], -1)


def plans() -> weakref.WeakKeyDictionary:
    """vLLM model -> its FlashComm2 layers and entries, made when its weights were loaded."""
    return owner().integrations.setdefault("vllm.flashcomm2", weakref.WeakKeyDictionary())


def _why_not(m: nn.Module) -> str:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    qm = getattr(m, "quant_method", None)
    if not isinstance(qm, UnquantizedLinearMethod):
        return f"weight is quantized ({type(qm).__name__}): gathering it is not implemented"
    if not m.input_is_parallel:
        return "input is not split by heads (input_is_parallel=False)"
    return ""


def plan(model: nn.Module, vllm_config: Any, config: TPConfig) -> tuple[list, list[Entry]]:
    """Gather the selected o_proj weights into their FlashComm2 blocks, in place.
    Collective over vLLM's world group (group creation) and TP group (the weights)."""
    from vllm.distributed import get_tp_group
    from vllm.model_executor.layers.linear import RowParallelLinear

    from tp_passes.vllm.config import layout_of

    m = config.flashcomm2
    if not m:
        return [], []
    tp = get_tp_group()
    cands = [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, RowParallelLinear)
        and mod.reduce_results
        and selects(config, "oproj_tp", path)
    ]
    why_all = (
        "TP size is 1: no all-reduce to replace"
        if tp.world_size == 1
        else flashcomm2_size_error(m, tp.world_size)
    )
    decided = [(p, mod, why_all or _why_not(mod)) for p, mod in cands]
    agree_across_ranks(
        (config.to_dict(), [(p, w) for p, _, w in decided]),
        "the FlashComm2 layers at model load",
        group=tp.cpu_group,
    )
    entries = [Entry("flashcomm2", p, False, w, m, blocked=True) for p, _, w in decided if w]
    refuse_blocked(entries, config.strict)
    if why_all:
        return [], entries
    # every rank creates the groups (a pipeline stage's layers do not decide it)
    otp, odp = flashcomm2_groups(layout_of(vllm_config), m)
    layers = []
    for path, mod in [(p, mod) for p, mod, w in decided if not w]:
        w = mod.weight
        before = weight_bytes([w])
        w.data = derive(w.data, WeightSpec("gather", 1, odp.pg))  # [H, A/n] -> [H, A/m]
        n, g, item, (h, a) = tp.world_size, tp.world_size // m, w.element_size(), w.shape
        details = {
            "m": m,
            "weight_bytes_before": before,
            "weight_bytes_after": weight_bytes([w]),
            # ring bytes per token (`tp_passes.wire`): all_to_all of x [., A/n] over ODP,
            # reduce_scatter of y [., H] over OTP (m > 1), all_gather of y over TP
            "wire_bytes_per_token": round(
                item * ((g - 1) / g * a / g + (m - 1) / n * h + (n - 1) / n * h)
            ),
        }
        layers.append(FlashComm2Layer(path, mod, m, h, (otp, odp, tp), details))
    return layers, entries


def install(layers: list[FlashComm2Layer]) -> list[Entry]:
    """Route each planned o_proj's forward through ``tp_passes.planned_layer`` (after vLLM
    processed its block into its kernel's format)."""
    for f in layers:
        otp, odp, tp = f.groups
        f.collectives = tuple(
            VLLMCollectives(g.coordinator) if g.coordinator else comm.Collectives(g.group_name)
            for g in (otp, odp)
        ) + (VLLMCollectives(tp),)
        f.details["transport"] = f.collectives[2].transport
        _planned()[f.key] = f
        route_linear(f.layer, f.key)
    return [Entry("flashcomm2", f.path, True, WHY, f.n, f.details) for f in layers]


def plan_loaded_model(model: nn.Module, vllm_config: Any) -> None:
    """Before vLLM's weight post-processing: plan and gather (see `plan`)."""
    from tp_passes.vllm.config import config_from_vllm

    plans()[model] = plan(model, vllm_config, config_from_vllm(vllm_config))
