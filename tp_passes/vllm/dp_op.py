"""The opaque op that runs a layer planned at load time: ``torch.ops.tp_passes.dp_module``.

A compiled graph holds only ``dp_module(x, "<layer key>")``; the op finds the planned layer
by its key, pads to the module TP group's largest row count (checking every rank entered
the same layer), runs the family's exchange (`ModuleTP.exchange`) around vLLM's own
kernel on this rank's shard, and cuts the padding off. `install` routes vLLM's layers
through it once their shards were processed into vLLM's kernel formats.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from tp_passes import comm
from tp_passes.groups.registry import NamedGroup
from tp_passes.owner import owner
from tp_passes.patterns import ModuleTP
from tp_passes.patterns.module_tp import mlp_names
from tp_passes.report import Entry


@dataclass
class DPModule:
    """One vLLM layer (or MLP) whose weight is sharded over a module TP group."""

    rewrite: ModuleTP
    path: str
    layer: nn.Module
    group: NamedGroup
    width: int  # output features of the original layer (lm_head: its padded vocab slice)
    dtype: torch.dtype  # the weight's (the embedding's output dtype)
    details: dict[str, Any] = field(default_factory=dict)  # bytes, for the report
    local: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by `install`
    # run-time counts: calls, calls with no rows of this rank's own (an idle rank's dummy
    # logits), calls padded because another rank brought more rows
    calls: dict[str, int] = field(default_factory=lambda: {"calls": 0, "empty": 0, "padded": 0})

    @property
    def kind(self) -> str:
        return self.rewrite.name

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path}"

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.dtype if self.kind == "embedding_tp" else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The op's body: pad to the group's largest row count, exchange, cut."""
        ids = self.kind == "embedding_tp"
        flat = x.reshape(-1) if ids else x.reshape(-1, x.shape[-1])
        lead = x.shape if ids else x.shape[:-1]  # the output is [*lead, width]
        rows, g, k = flat.shape[0], self.group.group_name, self.group.size
        padded, t_max = comm.pad_to_group_max(flat, g, k, self.key)
        self.calls["calls"] += 1
        self.calls["empty"] += rows == 0
        self.calls["padded"] += rows < t_max
        if t_max == 0:  # every rank empty: no exchange (same decision on every rank)
            return x.new_zeros(*lead, self.width, dtype=self.out_dtype(x))
        j = self.group.ranks.index(torch.distributed.get_rank())
        w_j = getattr(self.layer, "weight", None)  # an MLP has its weights on its children
        y = self.rewrite.exchange(padded, g, k, j, self.width, self.local, w_j)
        y = (y.wait() if isinstance(y, funcol.AsyncCollectiveTensor) else y)[:rows]
        return y.reshape(*lead, y.shape[-1])


# -- the op ----------------------------------------------------------------------------------


def _planned() -> dict[str, DPModule]:
    """Layer key -> planned layer of the models this process loaded (filled by `install`),
    held by the package's owner."""
    return owner().integrations.setdefault("vllm.module_tp", {})


def dp_module_op() -> Any:
    """``torch.ops.tp_passes.dp_module(x, key)``, registered on first use. Opaque to Dynamo
    and Inductor (the exchange pads by a row count known only at run time)."""
    if hasattr(torch.ops.tp_passes, "dp_module"):
        return torch.ops.tp_passes.dp_module.default

    @torch.library.custom_op("tp_passes::dp_module", mutates_args=())
    def dp_module(x: torch.Tensor, key: str) -> torch.Tensor:
        return _planned()[key].forward(x).contiguous()

    @dp_module.register_fake
    def _(x: torch.Tensor, key: str) -> torch.Tensor:
        m = _planned()[key]
        lead = x.shape if m.kind == "embedding_tp" else x.shape[:-1]
        return x.new_empty(*lead, m.width, dtype=m.out_dtype(x))

    return torch.ops.tp_passes.dp_module.default


def call_counts() -> dict[str, dict[str, int]]:
    """Per planned layer of this process: calls, empty calls, padded calls."""
    return {key: dict(m.calls) for key, m in _planned().items()}


# -- after loading: route the layers through the op -----------------------------------------


def install(modules: list[DPModule]) -> list[Entry]:
    """Route every planned layer through ``tp_passes.dp_module`` (after vLLM processed the
    shards into its kernels' formats); return the applied entries."""
    op = dp_module_op()
    why = "planned at model load: weight sharded before vLLM's weight post-processing"
    for m in modules:
        _planned()[m.key] = m
        if m.kind == "mlp_tp":
            m.local = _mlp_local(m.layer)
            _route_forward(m.layer, op, m.key)
        elif m.kind == "embedding_tp":
            qm = m.layer.quant_method
            m.local = lambda ids, qm=qm, layer=m.layer: qm.embedding(layer, ids)
            _route(m.layer, "embedding", lambda self, layer, ids, key=m.key: op(ids, key))
        else:
            qm = m.layer.quant_method
            m.local = lambda x, qm=qm, layer=m.layer: qm.apply(layer, x, None)

            def apply(self: Any, layer: nn.Module, x: torch.Tensor, bias=None, key=m.key):
                y = op(x, key)
                return y if bias is None else y + bias

            _route(m.layer, "apply", apply)
    return [Entry(m.kind, m.path, True, why, m.group.size, m.details) for m in modules]


def _route(layer: nn.Module, method: str, fn: Callable) -> None:
    """Give `layer` a copy of its quant method whose `method` is `fn` (the original object,
    which other layers may share, is left alone; isinstance checks still hold)."""
    qm = copy.copy(layer.quant_method)
    setattr(qm, method, types.MethodType(fn, qm))
    layer.quant_method = qm


def _mlp_local(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP on gathered rows by its own layers, without the TP reduce (done after)."""
    gate_up, down = (getattr(mlp, n) for n in mlp_names(mlp))
    gu, dn = gate_up.quant_method, down.quant_method

    def local(x: torch.Tensor) -> torch.Tensor:
        return dn.apply(down, mlp.act_fn(gu.apply(gate_up, x, None)), None)

    return local


def _route_forward(mlp: nn.Module, op: Any, key: str) -> None:
    down = getattr(mlp, mlp_names(mlp)[-1])

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = op(x, key)
        if down.reduce_results and down.tp_size > 1:  # the layer's own TP reduce, after
            from vllm.distributed import tensor_model_parallel_all_reduce

            y = tensor_model_parallel_all_reduce(y)
        return y

    mlp.forward = types.MethodType(forward, mlp)
