"""The opaque op that runs a layer planned at load time, ``torch.ops.tp_passes.planned_layer``,
and module TP's layers behind it (FlashComm2's are in `tp_passes.vllm.flashcomm2`).

A compiled graph holds only ``planned_layer(x, "<layer key>")``; the op finds the planned layer
by its key, pads to the module TP group's largest row count, runs the family's exchange
(`ModuleTP.exchange`) around vLLM's own kernel on this rank's shard through vLLM's
collectives for the group (`VLLMCollectives`: on CPU its shared-memory ops), and cuts the
padding off. `install` routes vLLM's layers through it once their shards were processed
into vLLM's kernel formats.

Row counts. Inside a forward, every layer of a step has the same rows: when vLLM's DP
metadata is set (MoE models) the group's counts are read from it, with no collective;
otherwise the first op of the step agrees them once per group (`comm.group_rows`, which
also checks the ranks entered the same layer) and the step's other layers reuse them.
lm_head runs after the forward, on the sampled rows only: it agrees its own counts, once
per step as well.
"""

from __future__ import annotations

import copy
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from tp_passes import comm, cost
from tp_passes.groups.registry import NamedGroup
from tp_passes.owner import owner
from tp_passes.patterns import ModuleTP
from tp_passes.patterns.module_tp import mlp_names
from tp_passes.report import Entry


class VLLMCollectives(comm.Collectives):
    """The exchange through vLLM's GroupCoordinator of the module TP group: on CPU its
    shared-memory communicator (microseconds where gloo takes a fraction of a
    millisecond), on devices its device communicator. vLLM's CPU shared-memory ops have
    all_gather and all_reduce for float dtypes only: all_to_all is an all_gather and a
    local select, reduce_scatter an all_reduce and a local slice, and integers travel
    bit-cast as float32 (the ops copy bytes)."""

    def __init__(self, coordinator: Any) -> None:
        self.coord, self.k = coordinator, coordinator.world_size
        self.j = coordinator.rank_in_group
        self.transport = transport_of(coordinator)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if x.is_floating_point():
            return self.coord.all_gather(x, 0)
        return self.coord.all_gather(x.view(torch.float32), 0).view(x.dtype)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[0] // self.k
        every = self.all_gather(x).reshape(self.k, self.k, c, *x.shape[1:])
        return every[:, self.j].reshape(x.shape)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[0] // self.k
        return self.coord.all_reduce(x.contiguous()).narrow(0, self.j * c, c)


def transport_of(coordinator: Any) -> str:
    """What the exchange runs on, for the report."""
    dc = coordinator.device_communicator
    if type(getattr(dc, "dist_module", None)).__name__ == "_CPUSHMDistributed":
        return "vLLM CPU shared memory (_C.shm_all_gather / shm_allreduce)"
    return f"vLLM {type(dc).__name__}"


@dataclass
class DPModule:
    """One vLLM layer (or MLP) whose weight is sharded over a module TP group."""

    rewrite: ModuleTP
    path: str
    layer: nn.Module
    group: NamedGroup
    width: int  # output features of the original layer (lm_head: its padded vocab slice)
    dtype: torch.dtype  # the weight's (the embedding's output dtype)
    dp_ranks: list[int]  # the group's members as indices of vLLM's DP group
    details: dict[str, Any] = field(default_factory=dict)  # bytes, for the report
    local: Any = None  # vLLM's kernels on the shard, set by `install`
    collectives: comm.Collectives | None = None  # set by `install`
    # run-time counts: calls, calls with no rows of this rank's own (an idle rank's dummy
    # logits), calls padded because another rank brought more rows, agreement collectives
    calls: dict[str, int] = field(
        default_factory=lambda: {"calls": 0, "empty": 0, "padded": 0, "agreed": 0}
    )

    @property
    def kind(self) -> str:
        return self.rewrite.name

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path}"

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.dtype if self.kind == "embedding_tp" else x.dtype

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape if self.kind == "embedding_tp" else x.shape[:-1]
        return x.new_empty(*lead, self.width, dtype=self.out_dtype(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The op's body: pad to the group's largest row count, exchange, cut."""
        ids = self.kind == "embedding_tp"
        flat = x.reshape(-1) if ids else x.reshape(-1, x.shape[-1])
        lead = x.shape if ids else x.shape[:-1]  # the output is [*lead, width]
        rows, c = flat.shape[0], self.collectives
        j = self.group.ranks.index(torch.distributed.get_rank())
        counts = self.counts(rows, j)
        t_max = max(counts)
        self.calls["calls"] += 1
        self.calls["empty"] += rows == 0
        self.calls["padded"] += rows < t_max
        if t_max == 0:  # every rank empty: no exchange (same decision on every rank)
            return x.new_zeros(*lead, self.width, dtype=self.out_dtype(x))
        w_j = getattr(self.layer, "weight", None)  # an MLP has its weights on its children
        k = self.group.size
        y = self.rewrite.exchange(comm.pad_to(flat, t_max), c, k, j, self.width, self.local, w_j)
        y = y[:rows]
        return y.reshape(*lead, y.shape[-1])

    def counts(self, rows: int, j: int) -> list[int]:
        """Every group member's rows for this call (see the module docstring)."""
        ctx = _forward_context() if self.kind != "lmhead_tp" else None
        if ctx is None:
            self.calls["agreed"] += 1
            return comm.group_rows(rows, self.key, self.collectives, self.group.size)
        meta = ctx.dp_metadata
        if meta is not None:
            counts = [int(meta.num_tokens_across_dp_cpu[i]) for i in self.dp_ranks]
        else:
            step = _step_counts()
            if step.get("context") is None or step["context"]() is not ctx:
                step.clear()
                step["context"] = weakref.ref(ctx)
            members = self.group.ranks  # groups of the same ranks share the step's counts
            if members not in step:  # the step's first op on these ranks agrees for the rest
                self.calls["agreed"] += 1
                step[members] = comm.group_rows(rows, self.key, self.collectives, self.group.size)
            counts = step[members]
        if counts[j] != rows:
            raise RuntimeError(
                f"tp_passes: {self.key} got {rows} rows but this step's row count on this rank "
                f"is {counts[j]} (group counts {counts}): a module TP layer must see every "
                "token of the step"
            )
        return counts


def _forward_context() -> Any:
    """vLLM's forward context of the running step; None outside a forward (or without
    vLLM loaded: the op's body also runs in tests without it)."""
    fc = sys.modules.get("vllm.forward_context")
    return fc.get_forward_context() if fc and fc.is_forward_context_available() else None


def _step_counts() -> dict[Any, Any]:
    """The current step's agreed row counts per group's ranks (and the step's forward
    context, weakly), held by the package's owner."""
    return owner().integrations.setdefault("vllm.step_counts", {})


# -- the op ----------------------------------------------------------------------------------


def _planned() -> dict[str, Any]:
    """Layer key -> planned layer of the models this process loaded (filled by `install`
    here, in `tp_passes.vllm.flashcomm2` and in `.shared_weights`), held by the owner."""
    return owner().integrations.setdefault("vllm.module_tp", {})


def planned_layer_op() -> Any:
    """``torch.ops.tp_passes.planned_layer(x, key)``, registered on first use: runs the
    layer planned at load under `key` (a `DPModule`, `FlashComm2Layer` or `SeriesLayer`).
    Opaque to Dynamo and Inductor: module TP pads by a row count known only at run time,
    the series issues broadcasts ahead, and all run vLLM's own kernels and collectives."""
    if hasattr(torch.ops.tp_passes, "planned_layer"):
        return torch.ops.tp_passes.planned_layer.default

    @torch.library.custom_op("tp_passes::planned_layer", mutates_args=())
    def planned_layer(x: torch.Tensor, key: str) -> torch.Tensor:
        return _planned()[key].forward(x).contiguous()

    @planned_layer.register_fake
    def _(x: torch.Tensor, key: str) -> torch.Tensor:
        return _planned()[key].fake(x)

    return torch.ops.tp_passes.planned_layer.default


def route_linear(layer: nn.Module, key: str) -> None:
    """`layer` (a vLLM linear) runs as ``planned_layer(x, key)``, returning what its own
    forward returns (``(output, bias)`` where it returns its bias)."""
    op = planned_layer_op()

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        y = op(x, key)
        if not self.return_bias:
            return y
        return y, (self.bias if self.skip_bias_add else None)

    layer.forward = types.MethodType(forward, layer)


def call_counts() -> dict[str, dict[str, int]]:
    """Per planned layer of this process: calls, empty calls, padded calls."""
    return {key: dict(m.calls) for key, m in _planned().items() if isinstance(m, DPModule)}


# -- after loading: route the layers through the op -----------------------------------------


def install(modules: list[DPModule], decode_batch: int) -> list[Entry]:
    """Route every planned layer through ``tp_passes.planned_layer`` (after vLLM processed the
    shards into its kernels' formats); return the applied entries, each with the
    exchange's transport and its predicted cost against the weight read it saves at a
    decode batch of `decode_batch` tokens per rank."""
    op = planned_layer_op()
    why = "planned at model load: weight sharded before vLLM's weight post-processing"
    for m in modules:
        _planned()[m.key] = m
        m.collectives = _choose_transport(m, decode_batch)
        m.details["transport"] = m.collectives.transport
        if m.kind == "mlp_tp":
            m.local = _mlp_local(m.layer)
            _route_forward(m.layer, op, m.key)
        elif m.kind == "embedding_tp":
            qm = m.layer.quant_method
            m.local = lambda ids, qm=qm, layer=m.layer: qm.embedding(layer, ids)
            _route(
                m.layer,
                "embedding",
                lambda self, layer, ids, key=m.key: comm.as_lookup(op(ids, key), ids),
            )
        else:
            qm = m.layer.quant_method
            m.local = lambda x, qm=qm, layer=m.layer: qm.apply(layer, x, None)

            def apply(self: Any, layer: nn.Module, x: torch.Tensor, bias=None, key=m.key):
                y = op(x, key)
                return y if bias is None else y + bias

            _route(m.layer, "apply", apply)
    return [Entry(m.kind, m.path, True, why, m.group.size, m.details) for m in modules]


def _choose_transport(m: DPModule, decode_batch: int) -> comm.Collectives:
    """The exchange's collectives: the cheaper at the decode batch by the cost model of
    vLLM's coordinator for the group (its shared-memory communicator on CPU, its device
    communicator elsewhere) and torch's functional collectives on the group's backend;
    vLLM's on a tie (its graphs capture its own ops). The figures go to the report."""
    backend = torch.distributed.get_backend(m.group.pg)
    options: dict[comm.Collectives, str] = {}
    if m.group.coordinator is not None:
        v = VLLMCollectives(m.group.coordinator)
        options[v] = "shm" if "shared memory" in v.transport else backend
    options[comm.Collectives(m.group.group_name)] = backend
    d = m.details
    priced = {
        c: cost.module_tp_us(
            m.rewrite.ops,
            d["wire_bytes_per_token"] * decode_batch,
            m.rewrite.read_saved(d["weight_bytes_before"], d["weight_bytes_after"]),
            cost.LINKS[link],
        )
        for c, link in options.items()
        if link in cost.LINKS
    }
    if not priced:  # no figures for this transport: vLLM's, unpriced
        return next(iter(options))
    chosen = min(priced, key=lambda c: priced[c]["exchange_us"])  # first (vLLM's) on a tie
    d["predicted_per_step"] = {"tokens": decode_batch} | priced[chosen]
    d["exchange_us_by_transport"] = {c.transport: p["exchange_us"] for c, p in priced.items()}
    return chosen


def _route(layer: nn.Module, method: str, fn: Callable) -> None:
    """Give `layer` a copy of its quant method whose `method` is `fn` (the original object,
    which other layers may share, is left alone; isinstance checks still hold)."""
    qm = copy.copy(layer.quant_method)
    setattr(qm, method, types.MethodType(fn, qm))
    layer.quant_method = qm


def _mlp_local(mlp: nn.Module) -> tuple[Callable, Callable]:
    """(up part, down part) of the MLP by its own layers, without the TP reduce (done
    after): the intermediate between them is exchanged (`comm.mlp_dp`)."""
    gate_up, down = (getattr(mlp, n) for n in mlp_names(mlp))
    gu, dn, inner = gate_up.quant_method, down.quant_method, down.input_size_per_partition

    def up(x: torch.Tensor) -> torch.Tensor:
        return mlp.act_fn(gu.apply(gate_up, x, None))

    def down_part(h: torch.Tensor) -> torch.Tensor:  # the gathered intermediate, pad cut
        return dn.apply(down, h[:, :inner].contiguous(), None)

    return up, down_part


def _route_forward(mlp: nn.Module, op: Any, key: str) -> None:
    down = getattr(mlp, mlp_names(mlp)[-1])

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = op(x, key)
        if down.reduce_results and down.tp_size > 1:  # the layer's own TP reduce, after
            from vllm.distributed import tensor_model_parallel_all_reduce

            y = tensor_model_parallel_all_reduce(y)
        return y

    mlp.forward = types.MethodType(forward, mlp)
