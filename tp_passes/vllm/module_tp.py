"""Module TP across data-parallel ranks inside vLLM, planned when the model is loaded.

In pure-DP decode every DP rank holds the whole lm_head, embedding, o_proj and MLP. Module
TP shards such a weight over k DP ranks and exchanges activations instead (vllm-ascend's
`finegrained_tp_config`). Per layer, on DP rank j of its module TP group of k ranks::

    before (vLLM's layer, weight W replicated on every DP rank)
        y = layer.quant_method.apply(layer, x)                 # x @ W.T
    after (layer.weight is W_j, this rank's shard; see `tp_passes.vllm.dp_op`)
        y = torch.ops.tp_passes.planned_layer(x, "<layer key>")
          = cut(reduce_scatter(apply_j(all_to_all(cols(pad(x))))))      # o_proj
          = cut(all_to_all(apply_j(all_gather(pad(h)))))                # lm_head
          = cut(reduce_scatter(lookup_j(all_gather(pad(ids)))))         # embedding
          = cut(reduce_scatter(mlp_j(all_gather(pad(x)))))              # MLP

`apply_j` / `lookup_j` / `mlp_j` are the layer's own kernels on its shard, so whatever vLLM's
platform makes of a weight after loading (a oneDNN prepacked handle on CPU, NZ format on
Ascend, a quantized layout) is made from the shard. The rewrite classes
(`tp_passes.patterns.module_tp`) own the shard specs, the checks every family shares, the
exchange and the wire bytes; this file is vLLM's adapter: which layers, and the hooks.

- **Load time.** `plan` runs right before vLLM's `process_weights_after_loading`: it
  checks the plan across ranks, creates the groups on vLLM's grid (`RankLayout` of
  DP x PP x PCP x TP; TP > 1 composes: the DP exchange happens inside each TP shard, and
  the layer's own TP reduce follows) and replaces each selected weight by its shard (a tied
  embedding and lm_head share one Parameter, so one shard serves both). `dp_op.install`
  then routes the layers through the op; a compiled graph holds only the op and a layer
  key, so nothing rank-specific happens in a compiler callback.
- **Lockstep.** Every DP rank must enter every op on every step. vLLM guarantees a forward
  per step on every DP rank where its engines run in lockstep (torchrun with
  ``distributed_executor_backend="external_launcher"``, or MoE models' DP engines): an idle
  rank runs a dummy batch. A dummy batch computes no logits, so `after_dummy_run` runs
  `compute_logits` on zero rows. Dense models under ``vllm serve --data-parallel-size``
  have independent engines: module TP is refused there, never left to hang.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from tp_passes.config import TPConfig
from tp_passes.groups.registry import agree_across_ranks, module_tp_group
from tp_passes.owner import owner
from tp_passes.patterns import REWRITES, ModuleTP
from tp_passes.patterns.base import weight_bytes
from tp_passes.patterns.module_tp import excluded, mlp_names, selects, tie_reasons
from tp_passes.report import Entry, refuse_blocked
from tp_passes.vllm.dp_op import DPModule
from tp_passes.weights import WeightSpec, derive

# the four module TP rewrites by config field ("oproj_tp", ...), in REWRITES order
FAMILIES: dict[str, ModuleTP] = {r.name: r for r in REWRITES if isinstance(r, ModuleTP)}


def plans() -> weakref.WeakKeyDictionary:
    """vLLM model -> its DPPlan, made when the model's weights were loaded."""
    return owner().integrations.setdefault("vllm.plans", weakref.WeakKeyDictionary())


# -- planning at load time --------------------------------------------------------------------


@dataclass
class DPPlan:
    """What `plan` decided for one model: the sharded layers and one entry per layer."""

    modules: list[DPModule] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)


def _candidates(model: nn.Module, config: TPConfig) -> list[tuple[str, str, nn.Module]]:
    """(kind, path, module) of every vLLM layer a module TP size selects, in model order."""
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    out = []
    for path, m in model.named_modules():
        if isinstance(m, ParallelLMHead):
            kind = "lmhead_tp"
        elif isinstance(m, VocabParallelEmbedding):
            kind = "embedding_tp"
        elif isinstance(m, RowParallelLinear):
            kind = "oproj_tp"
        elif mlp_names(m) is not None:  # every gated MLP, unless names are given
            kind = "mlp_tp"
        else:
            continue
        if kind == "mlp_tp" and not config.names_for(kind, ()):
            chosen = not excluded(path, config.include_draft_and_vision)
        else:
            chosen = selects(config, kind, path)
        if getattr(config, kind) and chosen:
            out.append((kind, path, m))
    return out


def _why_not(kind: str, m: nn.Module) -> str:
    """What vLLM's layer `m` has that module TP cannot shard ("" if nothing)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    names = mlp_names(m) if kind == "mlp_tp" else ()
    for layer in [getattr(m, n) for n in names] if names else [m]:
        qm = getattr(layer, "quant_method", None)
        plain = isinstance(qm, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod))
        if not plain and not (kind in ("oproj_tp", "mlp_tp") and _int8_scales(layer) is not None):
            what = type(getattr(layer, "scheme", None) or qm).__name__
            return f"weight is quantized ({what}): only int8 W8A8 shards are implemented"
    if names and (len(names) != 2 or not hasattr(m, "act_fn")):
        return f"MLP layers {names} are not vLLM's merged gate_up_proj + act_fn + down_proj"
    biased = any(getattr(getattr(m, n), "bias", None) is not None for n in names) or (
        kind == "lmhead_tp" and getattr(m, "bias", None) is not None
    )
    return FAMILIES[kind].refuses(biased)


def _int8_scales(layer: nn.Module) -> list[str] | None:
    """For a compressed-tensors int8 W8A8 layer (int8 weight, per-channel or per-tensor
    weight scales, any activation scheme), the scales sharded with the weight's output
    rows: the per-channel scale; a per-tensor scale per logical width stays whole. None
    for any other layer."""
    if type(getattr(layer, "scheme", None)).__name__ != "CompressedTensorsW8A8Int8":
        return None
    scale = layer.weight_scale
    return ["weight_scale"] if scale.dim() == 2 and scale.shape[0] == layer.weight.shape[0] else []


def plan(model: nn.Module, vllm_config: Any, config: TPConfig) -> DPPlan:
    """Shard the selected layers' weights in place. Collective over vLLM's world group
    (config and layout, group creation) and its DP group (the layers).

    Runs before vLLM's weight post-processing. Returns the plan; `install` activates it.
    """
    from vllm.distributed import get_dp_group

    from tp_passes.vllm.config import layout_of, lockstep_reason

    result = DPPlan()
    wanted = [k for k in FAMILIES if getattr(config, k)]
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
    groups = {
        k: module_tp_group(FAMILIES[k].group, getattr(config, k), layout) for k in wanted
    }
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
    # id(weight Parameter) -> (full shapes, full bytes): tied layers share one shard
    full: dict[int, tuple[list[torch.Size], int]] = {}
    dp_ranks = get_dp_group().ranks
    for kind, path, m, why in decided:
        if why:
            continue
        rewrite, group = FAMILIES[kind], groups[kind]
        layers = [getattr(m, n) for n in mlp_names(m)] if kind == "mlp_tp" else [m]
        ws = [layer.weight for layer in layers]
        if id(ws[0]) not in full:  # a tied weight is sharded once, for both layers
            full[id(ws[0])] = ([w.shape for w in ws], weight_bytes(ws))
            for layer, (how, dim) in zip(layers, rewrite.shard_specs(len(ws))):
                # the same Parameter objects (vLLM's loader attributes and any tied user
                # stay); the full storage is freed. Per-channel int8 scales follow the rows.
                spec = WeightSpec(how, dim, group.pg)
                scales = _int8_scales(layer)
                for name in ["weight", *(scales or [])]:
                    p = getattr(layer, name)
                    p.data = derive(p.data, spec)
                if scales is not None:  # vLLM's int8 kernels read the fused widths
                    parts = len(layer.logical_widths)
                    layer.logical_widths = [layer.weight.shape[0] // parts] * parts
        shapes, before = full[id(ws[0])]
        (_, cols), (width, inner) = shapes[0], shapes[-1]  # o_proj, lm_head, MLP: rows out
        width = cols if kind == "embedding_tp" else width  # the embedding: rows of width cols
        item = vllm_config.model_config.dtype.itemsize  # activations (an int8 weight's too)
        details = {
            "group_ranks": list(group.ranks),
            "weight_bytes_before": before,
            "weight_bytes_after": weight_bytes(ws),
            "wire_bytes_per_token": rewrite.wire_per_token(
                group.size, cols, width, item, inner if kind == "mlp_tp" else 0
            ),
        }
        members = [dp_ranks.index(r) for r in group.ranks]
        result.modules.append(
            DPModule(rewrite, path, m, group, width, ws[-1].dtype, members, details)
        )
    return result


def _refuse_or_warn(blocked: list[Entry], strict: bool) -> None:
    refuse_blocked(blocked, strict)
    if blocked:
        what = "; ".join(f"{e.rewrite} at {e.module or '-'}: {e.reason}" for e in blocked)
        logging.getLogger("tp_passes").warning("tp_passes: module TP skipped: %s", what)


def _decide(model: nn.Module, config: TPConfig) -> list[tuple[str, str, nn.Module, str]]:
    """(kind, path, module, why not) for every selected layer ("" when it can be sharded)."""
    cands = _candidates(model, config)
    tied = tie_reasons(model, [(k, p, m) for k, p, m in cands if k != "mlp_tp"], config)
    return [(k, p, m, _why_not(k, m) or tied.get(p, "")) for k, p, m in cands]


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
    """After a dummy forward (an idle DP rank's step, warmup): run the sharded lm_head's
    exchange on zero rows, so this rank takes part in the busy ranks' exchange (only the
    exchange: vLLM's TP gather of zero logits would crash its CPU shm all_gather). Every
    rank that runs a dummy forward does this, so profile and warmup runs stay symmetric."""
    p = plans().get(runner.get_model())
    heads = [m for m in p.modules if m.kind == "lmhead_tp"] if p else []
    if not heads:
        return
    hidden = out[0] if isinstance(out, tuple) else out
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:
        with torch.inference_mode():
            heads[0].forward(hidden[:0])
    else:  # a dummy run without hidden states (e.g. a non-last pipeline stage)
        raise RuntimeError(
            "tp_passes: lm_head module TP needs the hidden states of every dummy run; this "
            f"vLLM dummy run returned {type(hidden).__name__}"
        )
