"""Module TP across data-parallel ranks inside vLLM, planned when the model is loaded.

In pure-DP decode every DP rank holds the whole lm_head, embedding, o_proj and MLP. Module
TP shards such a weight over k DP ranks and exchanges activations instead (vllm-ascend's
`finegrained_tp_config`). Per layer, on DP rank j of its module TP group of k ranks::

    before (vLLM's layer, weight W replicated on every DP rank)
        y = layer.quant_method.apply(layer, x)                 # x @ W.T
    after (layer.weight is W_j, this rank's shard)
        y = torch.ops.tp_passes.dp_module(x, "<layer key>")
          = cut(reduce_scatter(apply_j(all_to_all(cols(pad(x))))))      # o_proj
          = cut(all_to_all(apply_j(all_gather(pad(h)))))                # lm_head
          = cut(reduce_scatter(lookup_j(all_gather(pad(ids)))))         # embedding
          = cut(reduce_scatter(mlp_j(all_gather(pad(x)))))              # MLP

`apply_j` / `lookup_j` / `mlp_j` are the layer's own kernels on its shard, so whatever vLLM's
platform makes of a weight after loading (a oneDNN prepacked handle on CPU, NZ format on
Ascend, a quantized layout) is made from the shard. The math is `tp_passes.comm`'s, the
same functions the graph rewrites trace.

Three things make this safe inside vLLM:

- **Load time.** `plan` runs right before vLLM's `process_weights_after_loading`: it
  checks the plan across ranks, creates the groups on vLLM's grid (`RankLayout` of
  DP x PP x PCP x TP; TP > 1 composes: the DP exchange happens inside each TP shard, and
  the layer's own TP reduce follows) and replaces each selected weight by its shard. A tied
  embedding and lm_head share one Parameter, so one shard serves both. `install` runs after
  loading and routes the layers through the op; a compiled graph holds only the op and a
  layer key, so nothing rank-specific happens in a compiler callback.
- **Lockstep.** Every DP rank must enter every op on every step. vLLM guarantees a forward
  per step on every DP rank where its engines run in lockstep (torchrun with
  ``distributed_executor_backend="external_launcher"``, or MoE models' DP engines): an idle
  rank runs a dummy batch. A dummy batch computes no logits, so `after_dummy_run` runs
  `compute_logits` on zero rows. Dense models under ``vllm serve --data-parallel-size``
  have independent engines: module TP is refused there, never left to hang.
- **Uneven token counts.** Each op first all-gathers (rows, layer key) over its group:
  ranks pad to the largest row count and cut back, and a rank that entered another layer
  makes every rank raise instead of exchanging mismatched tensors.
"""

from __future__ import annotations

import copy
import logging
import types
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F

from tp_passes import comm
from tp_passes.config import TPConfig
from tp_passes.groups.layout import RankLayout
from tp_passes.groups.registry import NamedGroup, agree_across_ranks, module_tp_group
from tp_passes.owner import owner
from tp_passes.patterns.base import weight_bytes
from tp_passes.patterns.module_tp import excluded, mlp_names, selects
from tp_passes.report import Entry

GROUP_NAMES = {
    "oproj_tp": "otp",
    "embedding_tp": "embedtp",
    "lmhead_tp": "lmheadtp",
    "mlp_tp": "mlptp",
}
KINDS = tuple(GROUP_NAMES)


@dataclass
class DPModule:
    """One vLLM layer (or MLP) whose weight is sharded over a module TP group."""

    kind: str  # "oproj_tp" | "embedding_tp" | "lmhead_tp" | "mlp_tp"
    path: str
    layer: nn.Module
    group: NamedGroup
    k: int
    j: int
    width: int  # output features of the original layer (lm_head: its padded vocab slice)
    dtype: torch.dtype  # the weight's (the embedding's output dtype)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    wire_bytes_per_token: int = 0
    local: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by `install`
    # run-time counts: calls, calls with no rows of this rank's own (an idle rank's dummy
    # logits), calls padded because another rank brought more rows
    calls: dict[str, int] = field(default_factory=lambda: {"calls": 0, "empty": 0, "padded": 0})

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path}"

    @property
    def code(self) -> int:
        """The layer key as a number, exchanged with the row counts."""
        return zlib.crc32(self.key.encode())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The op's body: pad to the group's largest row count, exchange, cut."""
        ids = self.kind == "embedding_tp"
        flat = x.reshape(-1) if ids else x.reshape(-1, x.shape[-1])
        lead = x.shape if ids else x.shape[:-1]  # the output is [*lead, width]
        rows = flat.shape[0]
        t_max = agree_rows(rows, self.code, self.key, self.group.group_name, self.k)
        self.calls["calls"] += 1
        self.calls["empty"] += rows == 0
        self.calls["padded"] += rows < t_max
        if t_max == 0:  # every rank empty: no exchange (same decision on every rank)
            return x.new_zeros(*lead, self.width, dtype=out_dtype(self, x))
        pad = (0, t_max - rows) if flat.dim() == 1 else (0, 0, 0, t_max - rows)
        padded, g, k = F.pad(flat, pad), self.group.group_name, self.k
        if self.kind == "oproj_tp":
            y = comm.oproj_dp(padded, None, g, k, mm=self.local)
        elif self.kind == "embedding_tp":
            y = comm.embedding_dp(padded, self.layer.weight, self.j, g, k, lookup=self.local)
        elif self.kind == "lmhead_tp":
            y = comm.lmhead_dp(padded, None, g, k, self.width, mm=self.local)
        else:
            y = comm.mlp_dp(padded, None, None, None, g, k, local=self.local)
        y = _waited(y)[:rows]
        return y.reshape(*lead, y.shape[-1])


def out_dtype(m: DPModule, x: torch.Tensor) -> torch.dtype:
    return m.dtype if m.kind == "embedding_tp" else x.dtype


def _waited(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def agree_rows(rows: int, code: int, key: str, group: str, k: int) -> int:
    """The largest row count in the group; raise on every rank if ranks are in different
    layers (one small all_gather)."""
    mine = torch.tensor([rows, code], dtype=torch.int64)
    every = _waited(funcol.all_gather_single(mine, 0, group)).reshape(k, 2)
    if len(set(every[:, 1].tolist())) > 1:
        raise RuntimeError(
            f"tp_passes: ranks of a module TP group entered different layers ({key} here; "
            f"layer codes {every[:, 1].tolist()}): the DP ranks are not in lockstep"
        )
    return int(every[:, 0].max())


# -- the op ---------------------------------------------------------------------------------

def _planned() -> dict[str, DPModule]:
    """Layer key -> planned layer of the models this process loaded (filled by `install`),
    held by the package's owner."""
    return owner().integrations.setdefault("vllm.module_tp", {})


def plans() -> weakref.WeakKeyDictionary:
    """vLLM model -> its DPPlan, made when the model's weights were loaded."""
    return owner().integrations.setdefault("vllm.plans", weakref.WeakKeyDictionary())


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
        return x.new_empty(*lead, m.width, dtype=out_dtype(m, x))

    return torch.ops.tp_passes.dp_module.default


def call_counts() -> dict[str, dict[str, int]]:
    """Per planned layer of this process: calls, empty calls, padded calls."""
    return {key: dict(m.calls) for key, m in _planned().items()}


# -- planning at load time --------------------------------------------------------------------


@dataclass
class DPPlan:
    """What `plan` decided for one model: the sharded layers and one entry per layer."""

    modules: list[DPModule] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)


def lockstep_reason(vllm_config: Any) -> str:
    """Why DP ranks of this vLLM config may not step together ("" when they do)."""
    pc = vllm_config.parallel_config
    if pc.data_parallel_size < 2:
        return f"needs data_parallel_size >= 2 (got {pc.data_parallel_size})"
    if pc.distributed_executor_backend == "external_launcher":
        return ""
    if getattr(vllm_config.model_config, "is_moe", False):
        return ""  # vLLM runs MoE models' DP engines in lockstep (dummy batches when idle)
    return (
        "the DP engines of a dense model step independently in this vLLM setup "
        f"(distributed_executor_backend={pc.distributed_executor_backend!r}); a collective "
        "across DP ranks could hang. Start vLLM with torchrun and "
        'distributed_executor_backend="external_launcher" to run DP ranks in lockstep'
    )


def layout_of(vllm_config: Any) -> RankLayout:
    """vLLM's grid of this run: world = ExternalDP x DP x PP x PCP x TP."""
    import torch.distributed as dist

    pc = vllm_config.parallel_config
    return RankLayout(
        dist.get_world_size(),
        tp=pc.tensor_parallel_size,
        dp=pc.data_parallel_size,
        pp=pc.pipeline_parallel_size,
        pcp=getattr(pc, "prefill_context_parallel_size", 1),
    )


def _candidates(model: nn.Module, config: TPConfig) -> list[tuple[str, str, nn.Module]]:
    """(kind, path, module) of every vLLM layer a module TP size selects, in model order."""
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    out = []
    for path, m in model.named_modules():
        if excluded(path, config.include_draft_and_vision):
            continue
        if isinstance(m, ParallelLMHead):
            kind = "lmhead_tp"
        elif isinstance(m, VocabParallelEmbedding):
            kind = "embedding_tp"
        elif isinstance(m, RowParallelLinear):
            kind = "oproj_tp"
        elif mlp_names(m) is not None:
            kind = "mlp_tp"
            names_given = config.names_for("mlp_tp", ())
            if getattr(config, kind) and (not names_given or selects(config, kind, path)):
                out.append((kind, path, m))
            continue
        else:
            continue
        if getattr(config, kind) and selects(config, kind, path):
            out.append((kind, path, m))
    return out


def _why_not(
    kind: str, m: nn.Module, config: TPConfig, tied: dict[int, list[tuple[str, str]]]
) -> str:
    """Why layer `m` cannot be sharded ("" if it can)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    layers = [getattr(m, n) for n in mlp_names(m)] if kind == "mlp_tp" else [m]
    for layer in layers:
        qm = getattr(layer, "quant_method", None)
        if not isinstance(qm, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
            return f"weight is quantized ({type(qm).__name__}): sharding it is not implemented"
    if kind == "mlp_tp":
        names = mlp_names(m)
        if len(names) != 2 or not hasattr(m, "act_fn"):
            return f"MLP layers {names} are not vLLM's merged gate_up_proj + act_fn + down_proj"
        if any(getattr(getattr(m, n), "bias", None) is not None for n in names):
            return "MLP with biases is not supported"
        return ""
    if kind == "lmhead_tp" and getattr(m, "bias", None) is not None:
        return "lm_head with bias is not supported"
    sharing = tied.get(id(m.weight), [])
    if len(sharing) > 1 and len({getattr(config, k) for k, _ in sharing}) > 1:
        sizes = ", ".join(f"{k}={getattr(config, k)} ({p})" for k, p in sharing)
        return f"tied weight shared by layers with different module TP sizes: {sizes}"
    return ""


def plan(model: nn.Module, vllm_config: Any, config: TPConfig) -> DPPlan:
    """Shard the selected layers' weights in place. Collective over vLLM's world group
    (config and layout, group creation) and its DP group (the layers).

    Runs before vLLM's weight post-processing. Returns the plan; `install` activates it.
    """
    import torch.distributed as dist
    from vllm.distributed import get_dp_group

    result = DPPlan()
    wanted = [k for k in KINDS if getattr(config, k)]
    if not wanted:
        return result
    pc = vllm_config.parallel_config
    why_all = lockstep_reason(vllm_config) or "; ".join(
        f"{k}={getattr(config, k)} does not divide data_parallel_size={pc.data_parallel_size}"
        for k in wanted
        if pc.data_parallel_size % getattr(config, k)
    )
    if why_all:  # decided from the config alone: no collective, nothing changed
        result.entries = [
            Entry(k, "", False, why_all, getattr(config, k), blocked=True) for k in wanted
        ]
        _refuse_or_warn(result.entries, config.strict)
        return result
    layout = layout_of(vllm_config)
    agree_across_ranks((config.to_dict(), repr(layout)), "the module TP config and layout")
    # every rank creates every group, in one order (pipeline stages hold different layers)
    groups = {k: module_tp_group(GROUP_NAMES[k], getattr(config, k), layout) for k in wanted}
    decided = _decide(model, config)
    agree_across_ranks(
        [(k, p, w) for k, p, _, w in decided],
        "the module TP layers at model load",
        group=get_dp_group().cpu_group,  # the same pipeline stage and TP index
    )
    result.entries = [
        Entry(k, p, False, w, getattr(config, k), blocked=True) for k, p, _, w in decided if w
    ]
    _refuse_or_warn(result.entries, config.strict)
    # id(weight Parameter) -> (full shape, full bytes): tied layers share one shard
    full: dict[int, tuple[tuple[int, ...], int]] = {}
    for kind, path, m, why in decided:
        if why:
            continue
        k, group = getattr(config, kind), groups[kind]
        j = dist.get_rank(group.pg)
        if kind == "mlp_tp":
            gate_up, down = (getattr(m, n) for n in mlp_names(m))
            before = weight_bytes([gate_up.weight, down.weight])
            width, dtype = down.weight.shape[0], down.weight.dtype
            wire = _wire_per_token(kind, k, gate_up.weight.shape[1], width, dtype)
            _shard(gate_up, comm.shard_halves(gate_up.weight.data, k, j))
            _shard(down, comm.shard_padded(down.weight.data, 1, k, j))
            after = weight_bytes([gate_up.weight, down.weight])
        else:
            w = m.weight
            if id(w) not in full:  # a tied weight is sharded once, for both layers
                full[id(w)] = (tuple(w.shape), weight_bytes([w]))
                _shard(m, comm.shard_padded(w.data, 1 if kind == "oproj_tp" else 0, k, j))
            (rows, cols), before = full[id(w)]
            # o_proj and lm_head put out rows of W; the embedding looks up rows of width cols
            width = cols if kind == "embedding_tp" else rows
            wire = _wire_per_token(kind, k, cols, width, w.dtype)
            after, dtype = weight_bytes([w]), w.dtype
        result.modules.append(
            DPModule(kind, path, m, group, k, j, width, dtype, before, after, wire)
        )
    return result


def _refuse_or_warn(blocked: list[Entry], strict: bool) -> None:
    if not blocked:
        return
    what = "; ".join(f"{e.rewrite} at {e.module or '-'}: {e.reason}" for e in blocked)
    if strict:
        raise RuntimeError(f"tp_passes (strict): module TP cannot be applied: {what}")
    logging.getLogger("tp_passes").warning("tp_passes: module TP skipped: %s", what)


def _decide(model: nn.Module, config: TPConfig) -> list[tuple[str, str, nn.Module, str]]:
    """(kind, path, module, why not) for every selected layer ("" when it can be sharded)."""
    cands = _candidates(model, config)
    # a weight Parameter shared by several layers (tied embedding and lm_head)
    users: dict[int, list[str]] = {}
    for path, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            users.setdefault(id(w), []).append(path)
    selected: dict[int, list[tuple[str, str]]] = {}
    for kind, path, m in cands:
        if kind != "mlp_tp":
            selected.setdefault(id(m.weight), []).append((kind, path))
    out = []
    for kind, path, m in cands:
        why = _why_not(kind, m, config, selected)
        if not why and kind != "mlp_tp":
            others = sorted(set(users[id(m.weight)]) - {p for _, p in selected[id(m.weight)]})
            if others:
                why = f"weight is tied to {', '.join(others)}, which is not selected with it"
        out.append((kind, path, m, why))
    return out


def _shard(layer: nn.Module, shard: torch.Tensor) -> None:
    """`layer.weight` now holds `shard`: the same Parameter object (vLLM's weight loader
    attributes and any tied user stay), the full storage freed."""
    layer.weight.data = shard


# -- after loading: route the layers through the op -----------------------------------------


def install(model: nn.Module, p: DPPlan) -> list[Entry]:
    """Route every planned layer through ``tp_passes.dp_module`` (after vLLM processed the
    shards into its kernels' formats); return the applied entries."""
    op = dp_module_op()
    entries = []
    for m in p.modules:
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
        entries.append(
            Entry(
                m.kind,
                m.path,
                True,
                "planned at model load: weight sharded before vLLM's weight post-processing",
                m.k,
                {
                    "group_ranks": list(m.group.ranks),
                    "weight_bytes_before": m.weight_bytes_before,
                    "weight_bytes_after": m.weight_bytes_after,
                    "wire_bytes_per_token": m.wire_bytes_per_token,
                },
            )
        )
    return entries


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


def _wire_per_token(kind: str, k: int, cols: int, width: int, dtype: torch.dtype) -> int:
    """Bytes a rank sends per token of its batch (the ring formulas of `tp_passes.wire`),
    plus the row-count exchange (16 bytes per rank per call, not per token: left out).
    `cols`: the input features (o_proj, lm_head, MLP) or the embedding width."""
    item, frac = torch.empty((), dtype=dtype).element_size(), (k - 1) / k
    if kind == "oproj_tp":  # all_to_all of x, reduce_scatter of the k*T partial rows
        return round(frac * cols * item + frac * k * width * item)
    if kind == "embedding_tp":  # all_gather of ids, reduce_scatter of the k*T looked-up rows
        return round((k - 1) * 8 + frac * k * width * item)
    if kind == "lmhead_tp":  # all_gather of h, all_to_all of the k*T logit slices
        return round((k - 1) * cols * item + frac * width * item)
    return round((k - 1) * cols * item + frac * k * width * item)  # MLP: all_gather, RS


# -- vLLM hooks (installed by the plugin) -------------------------------------------------------


def plan_loaded_model(model: nn.Module, vllm_config: Any) -> None:
    """Before vLLM's weight post-processing: plan and shard (see `plan`)."""
    from tp_passes.vllm.config import config_from_vllm

    if model in plans():
        raise RuntimeError(
            "tp_passes: the weights of this model were sharded across DP ranks when it was "
            "loaded; reloading weights into it is not supported (start a new LLM instead)"
        )
    plans()[model] = plan(model, vllm_config, config_from_vllm(vllm_config))


def after_dummy_run(runner: Any, out: Any) -> None:
    """After a dummy forward (an idle DP rank's step, warmup): compute logits on zero rows
    when lm_head is sharded, so this rank takes part in the busy ranks' exchange. Every
    rank that runs a dummy forward does this, so profile and warmup runs stay symmetric."""
    model = runner.get_model()
    p = plans().get(model)
    if p is None or not any(m.kind == "lmhead_tp" for m in p.modules):
        return
    hidden = out[0] if isinstance(out, tuple) else out
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:
        with torch.inference_mode():
            model.compute_logits(hidden[:0])
    else:  # a dummy run without hidden states (e.g. a non-last pipeline stage)
        raise RuntimeError(
            "tp_passes: lm_head module TP needs the hidden states of every dummy run; this "
            f"vLLM dummy run returned {type(hidden).__name__}"
        )
