"""The eager path on vLLM's layers (``enforce_eager=True``: nothing is compiled).

vLLM's row-parallel layers own their all-reduce and expose `reduce_results`. We keep
the layer's own matmul or lookup (prepacked oneDNN handle, quantized kernel, ...) by
calling its forward with `reduce_results` off, and do the reduce ourselves through
`tp_passes.eager`'s forwards, the functions the graph rewrites trace:

    before:  y = o_proj(x)                    # matmul, all_reduce (in the layer)
    after:   y = all_gather(reduce_scatter(o_proj_without_reduce(x)))

Recognized: `RowParallelLinear` (o_proj, down_proj, ...) and `VocabParallelEmbedding`
(not `ParallelLMHead`, whose logits are gathered, not reduced). Module TP, FlashComm2 and
the shared-weight series are planned when the weights are loaded (`tp_passes.vllm.module_tp`,
`.flashcomm2`, `.shared_weights`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from tp_passes.eager import RowParallel, parallelize
from tp_passes.groups.registry import agree_across_ranks
from tp_passes.report import Dumper, Entry, GraphReport, next_graph_id, rank, record
from tp_passes.vllm.config import config_from_vllm
from tp_passes.vllm.dp_op import install
from tp_passes.vllm.passes import installed_pass


def _device_group(module: nn.Module) -> Any:
    from vllm.distributed import get_tp_group

    coordinator = getattr(module, "parallel_group", None) or get_tp_group()
    return coordinator.device_group


def _opaque_weight(module: nn.Module) -> str:
    """Why `module.weight` cannot be resharded as a plain [H, A/n] matrix ("" if it can)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if not isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod):
        return f"weight is quantized ({type(module.quant_method).__name__})"
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        return "weight is a prepacked handle (vLLM on CPU: oneDNN), not a tensor we can reshard"
    return ""


def as_vllm_row_parallel(module: nn.Module) -> RowParallel | None:
    """A vLLM layer ending in a TP all-reduce, with its forward minus the reduce."""
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    linear = isinstance(module, RowParallelLinear)
    if not (linear or isinstance(module, VocabParallelEmbedding)) or isinstance(
        module, ParallelLMHead
    ):
        return None
    if not module.reduce_results or module.tp_size == 1:
        return None
    original = module.forward
    returns_bias = linear and module.return_bias

    def partial(x: torch.Tensor) -> torch.Tensor:
        module.reduce_results = False  # the layer's own matmul/lookup, bias on rank 0 only
        try:
            out = original(x)
        finally:
            module.reduce_results = True
        return out[0] if returns_bias else out

    def wrap(y: torch.Tensor) -> Any:  # RowParallelLinear's (output, output_bias) form
        return (y, module.bias if module.skip_bias_add else None) if returns_bias else y

    why = _opaque_weight(module) if linear else "not a linear"
    weight = None if why else module.weight
    bias = getattr(module, "bias", None) if linear and not module.skip_bias_add else None
    return RowParallel(
        weight, bias, _device_group(module), partial=partial, wrap=wrap, why_opaque=why
    )


def parallelize_vllm(model: nn.Module, vllm_config: Any, *, compiled: bool) -> list[dict]:
    """Finish the rewrites of a loaded vLLM model in place (every rank).

    Module TP across DP ranks, FlashComm2 and the shared-weight series were planned when
    the weights were loaded (`tp_passes.vllm.module_tp`, `.flashcomm2`, `.shared_weights`);
    here their layers are routed through the op. `compiled`: the model's forward goes through the
    backend, which does the rest; else sequence parallelism is applied to vLLM's
    row-parallel layers here.
    """
    from tp_passes.vllm import flashcomm2, module_tp, shared_weights

    from vllm.distributed import get_pp_group, get_tp_group

    config = config_from_vllm(vllm_config)
    # the config is agreed at load, not only inside a compile: a graph from vLLM's compile
    # cache runs without the compiler's own agreement
    for coordinator in (get_tp_group(), get_pp_group()):
        agree_across_ranks(config.to_dict(), "the tp_passes config", group=coordinator.cpu_group)
    plan = module_tp.plans().get(model) or module_tp.DPPlan()
    entries = plan.entries + install(plan.modules, vllm_config.scheduler_config.max_num_seqs)
    fc2_layers, fc2_skipped = flashcomm2.plans().get(model, ([], []))
    series, series_entries = shared_weights.plans().get(model, ([], []))
    loaded = fc2_skipped + flashcomm2.install(fc2_layers) + series_entries
    shared_weights.install(series, {f.path: f.forward for f in fc2_layers})
    entries += loaded
    planned = {id(m) for p in plan.modules for m in p.layer.modules()}
    planned |= {id(f.layer) for f in fc2_layers} | {id(s.layer) for s in series}

    def recognize(m: nn.Module) -> RowParallel | None:
        # layers sharded across DP hold DP shards: they keep vLLM's own TP reduce
        return None if id(m) in planned else as_vllm_row_parallel(m)

    post_grad = installed_pass(vllm_config.compilation_config)
    if compiled and post_grad is not None:
        # vLLM's post-grad route (CUDA): FlashComm2's weights are derived here, at load,
        # and its collectives traced from the layers' forwards; the pass does the rest
        entries += [Entry(**e) for e in post_grad.inner.prepare(model, recognize)]
        post_grad.inner.prepared += [dataclasses.asdict(e) for e in loaded]
    if not compiled:
        # TP ranks must rewrite the same layers the same way, or their collectives hang
        found = [name for name, m in model.named_modules() if recognize(m) is not None]
        agree_across_ranks(
            (config.to_dict(), found),
            "the eager rewrite plan (config or vLLM layers)",
            group=get_tp_group().cpu_group,
        )
        # module TP, FlashComm2 and the series were planned at load
        eager_config = dataclasses.replace(
            config, flashcomm2=0, shared_weights=(), **{k: 0 for k in module_tp.FAMILIES}
        )
        entries += [Entry(**e) for e in parallelize(model, eager_config, recognize=recognize)]
    if entries:
        report = GraphReport(next_graph_id(), rank(), entries, config=config.to_dict())
        Dumper(config.dump, config.dump_dir, report.graph_id).report(report)
        record(report)
    return [dataclasses.asdict(e) for e in entries]
