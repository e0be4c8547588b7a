"""tp_passes configuration inside vLLM, and the compilation mode `backend="tp_passes"` runs in.

Precedence, lowest first: defaults, ``TP_PASSES_*`` env vars,
``additional_config={"finegrained_tp_config": {...}}`` (vllm-ascend's key, top level),
``additional_config={"tp_passes": {...}}``, then torch.compile `options` if any.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tp_passes.config import MODULE_NAME_KEYS, Host, TPConfig
from tp_passes.groups.layout import RankLayout
from tp_passes.owner import owner

BACKEND = "tp_passes"
# why the graph and eager rewrites leave the weight rewrites alone inside vLLM
PLANNED_AT_LOAD = (
    "inside vLLM, module TP across DP ranks, FlashComm2 and the shared-weight series are "
    "planned at model load (tp_passes.vllm.module_tp, .flashcomm2, .shared_weights; see "
    "that report), not by the graph or eager rewrites"
)


def tp_passes_dict(additional_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Our keys out of vLLM's `additional_config` (may be None)."""
    extra = dict(additional_config or {})
    ours = extra.get("tp_passes", {})
    if not isinstance(ours, Mapping):
        raise ValueError(
            f"tp_passes: additional_config['tp_passes'] must be a dict, got {type(ours).__name__}"
        )
    merged: dict[str, Any] = {}
    if "finegrained_tp_config" in extra:
        merged["finegrained_tp_config"] = extra["finegrained_tp_config"]
    merged.update(ours)
    return merged


def config_from_vllm(
    vllm_config: Any,
    options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TPConfig:
    base = TPConfig.from_env(environ)
    cfg = TPConfig.from_dict(
        tp_passes_dict(getattr(vllm_config, "additional_config", None)), base=base
    )
    cfg = TPConfig.from_dict(options or {}, base=cfg)
    return cfg


CPU_INDUCTOR_DEFAULTS = {
    "dce": True,
    "size_asserts": False,
    "nan_asserts": False,
    "epilogue_fusion": True,
    "cpp.dynamic_threads": True,
}

def remember(vllm_config: Any) -> None:
    """Called by the plugin when a vLLM worker has loaded its model.

    vLLM compiles later, inside its first forward, without its config set as current;
    the backend finds the worker's config here.
    """
    owner().integrations["vllm.config"] = vllm_config


def current_vllm_config() -> Any | None:
    """vLLM's config of this process when vLLM is running here, else None."""
    import sys

    if "vllm.config" not in sys.modules:
        return None
    from vllm.config import get_current_vllm_config_or_none

    current = get_current_vllm_config_or_none()
    return current if current is not None else owner().integrations.get("vllm.config")


def host(options: Mapping[str, Any] | None) -> Host | None:
    """The vLLM host of a compile (registered with `tp_passes.config.register_host` by the
    plugin): vLLM's config, and the rewrites planned at load refused (see PLANNED_AT_LOAD)."""
    vllm_config = current_vllm_config()
    if vllm_config is None:
        return None
    planned = list(MODULE_NAME_KEYS)
    if any(owner().integrations.get(f"vllm.{k}") for k in ("flashcomm2", "shared_weights")):
        # vLLM's loader ran here: its plan took them (layers built by hand, as in
        # tests/vllm/test_vllm_dialect.py, leave them to the graph rewrites)
        planned += ["flashcomm2", "shared_weights"]
    refused = {name: PLANNED_AT_LOAD for name in planned}
    inductor = dict(vllm_config.compilation_config.inductor_compile_config)
    return Host("vllm", config_from_vllm(vllm_config, options), refused, inductor)


def uses_tp_passes(vllm_config: Any) -> bool:
    """The user asked for tp_passes: as the backend, or (after `select_compilation_mode`
    moved it there on CUDA) as vLLM's post-grad pass."""
    cc = vllm_config.compilation_config
    if getattr(cc, "backend", "") == BACKEND:
        return True
    from tp_passes.vllm.passes import PASS_KEY

    return type(cc.inductor_compile_config.get(PASS_KEY)).__name__ == "VllmTPPass"


ASCEND = (
    "tp_passes: on Ascend, vllm-ascend compiles only in modes NONE and VLLM_COMPILE and runs "
    "graph passes only through its GraphFusionPassManager (compilation_config "
    "inductor_passes key 'graph_fusion_manager', npugraph_ex off); tp_passes does not "
    "install itself there yet. Use enforce_eager=True (the eager rewrites and module TP "
    "across DP run at model load), or leave the backend unset"
)


def platform_route(platform: Any) -> str:
    """ "cpu", "cuda" (CUDA and ROCm), "ascend", or "other"."""
    if platform.is_cpu():
        return "cpu"
    if platform.is_cuda_alike():
        return "cuda"
    if getattr(platform, "device_name", "") == "npu" or "npu" in type(platform).__name__.lower():
        return "ascend"
    return "other"


def select_compilation_mode(vllm_config: Any) -> None:
    """Make ``compilation_config={"backend": "tp_passes"}`` reach the rewrites, per platform.

    - CUDA / ROCm, mode unset or VLLM_COMPILE (3): vLLM's own compilation is kept
      (piecewise + CUDA graphs, its compile cache) and the rewrites run as its post-grad
      pass (`install_post_grad_pass`). Rewrites needing real weights (FlashComm2) are
      skipped there with that reason; set mode 2 to use them through our backend.
    - CPU, and CUDA with mode 1 or 2 set: our backend under DYNAMO_TRACE_ONCE
      (`use_backend`), vLLM's own choice on CPU.
    - Ascend: a clear error (`ASCEND`): vllm-ascend would force the mode to NONE silently.
    """
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    cc = vllm_config.compilation_config
    if not uses_tp_passes(vllm_config):
        return
    config_from_vllm(vllm_config)  # bad keys fail here, in the user's process
    route = platform_route(current_platform)
    eager = getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False)
    if route == "ascend" and not eager:
        raise ValueError(ASCEND)
    if route == "cuda" and cc.mode in (None, CompilationMode.VLLM_COMPILE):
        install_post_grad_pass(vllm_config)
        return
    use_backend(vllm_config, cpu=route == "cpu")


def install_post_grad_pass(vllm_config: Any) -> None:
    """VLLM_COMPILE with Inductor, our pass after vLLM's passes, Inductor graph partition
    on (the pass sees the whole model, attention included, and Inductor splits it for
    piecewise CUDA graphs afterwards), vLLM's all-reduce + RMSNorm fusion off (it would
    consume the all-reduces the rewrites take). CUDA graphs and the compile cache stay."""
    from vllm.config import CompilationMode

    from tp_passes.vllm.passes import PASS_KEY, VllmTPPass

    cc = vllm_config.compilation_config
    if cc.pass_config.fuse_allreduce_rms:
        raise ValueError(
            "tp_passes: compilation_config pass_config.fuse_allreduce_rms=True fuses the "
            "all-reduces tp_passes rewrites; set it to False (or leave it unset)"
        )
    if cc.use_inductor_graph_partition is False:
        raise ValueError(
            "tp_passes: compilation_config use_inductor_graph_partition=False splits the graph "
            "at attention before the pass runs, so a token-sharded residual cannot cross "
            "it; leave it unset (tp_passes turns it on)"
        )
    existing = cc.inductor_compile_config.get(PASS_KEY)
    if existing is not None and type(existing).__name__ != "VllmTPPass":
        raise ValueError(
            f"tp_passes: compilation_config already has a {PASS_KEY} ({existing!r}); "
            "tp_passes needs that slot for its pass"
        )
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.backend = "inductor"
    cc.use_inductor_graph_partition = True
    cc.pass_config.fuse_allreduce_rms = False
    cc.inductor_compile_config[PASS_KEY] = VllmTPPass(config_from_vllm(vllm_config))


def use_backend(vllm_config: Any, *, cpu: bool) -> None:
    """Our backend on one whole-model graph (DYNAMO_TRACE_ONCE).

    vLLM's default mode (VLLM_COMPILE, piecewise) accepts only "eager"/"inductor" as its
    backend, and on CPU the platform swaps any backend for Inductor. With the mode unset we
    choose DYNAMO_TRACE_ONCE: one Dynamo trace of the whole model, guards dropped, token
    dim dynamic, handed to the backend as one graph (the mode vLLM itself uses on CPU).
    Custom ops default to "none" (native torch ops), as vLLM does for Inductor. vLLM's
    AOT compile cache is turned off for it: the compiled function holds rank-specific
    derived weights and process groups, which it cannot serialize, and a graph loaded
    from disk would skip the cross-rank agreement.
    """
    from vllm.config import CompilationMode

    cc = vllm_config.compilation_config
    if cc.mode is None:
        cc.mode = CompilationMode.DYNAMO_TRACE_ONCE
        if cpu:
            # the Inductor settings vLLM's CPU platform gives its own DYNAMO_TRACE_ONCE
            # compile (vllm/platforms/cpu.py); it skips them once the mode is set, and our
            # inner Inductor compile must match the default backend's
            for key, value in CPU_INDUCTOR_DEFAULTS.items():
                cc.inductor_compile_config.setdefault(key, value)
    if cc.mode == CompilationMode.VLLM_COMPILE:
        raise ValueError(
            "tp_passes: compilation_config mode=VLLM_COMPILE (3) cannot run backend 'tp_passes' "
            "on this platform; leave mode unset (tp_passes then uses DYNAMO_TRACE_ONCE) or set "
            "it to 1 or 2"
        )
    if not any(base in cc.custom_ops for base in ("all", "none")):
        # native torch ops (as vLLM picks for Inductor): rms_norm & co. stay visible to
        # the rewrites (sequence parallelism runs them on T/n tokens) and to Inductor
        cc.custom_ops.append("none")
    if os.environ.get("VLLM_USE_AOT_COMPILE") == "1":
        raise ValueError(
            "tp_passes: VLLM_USE_AOT_COMPILE=1 cannot be used with backend 'tp_passes' "
            "(the rewritten graph holds rank-specific weights and groups); unset it"
        )
    os.environ["VLLM_USE_AOT_COMPILE"] = "0"  # inherited by the engine and worker processes


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
