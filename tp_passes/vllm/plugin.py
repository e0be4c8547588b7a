"""`vllm.general_plugins` entry point: makes ``compilation_config={"backend": "tp_passes"}`` work.

vLLM calls `register()` in every process it starts (engine, workers), possibly more than
once. It registers vLLM's all-reduce dialects and its config source with the core
(`tp_passes.fx.register_dialect`, `tp_passes.config.register_host`,
`tp_passes.groups.registry.fx.Dialect.make_group`) and installs
two hooks, each at most once per process:

1. Config: wraps the current platform's `apply_config_platform_defaults` (vLLM's hook for
   platform defaults, called right before the compilation mode is chosen) to pick
   DYNAMO_TRACE_ONCE for our backend (`tp_passes.vllm.config.select_compilation_mode`).
2. Weight loading: right before vLLM post-processes loaded weights (CPU prepacking, NZ
   on Ascend, quantized layouts), module TP across DP ranks shards the selected weights
   (`tp_passes.vllm.module_tp.plan`), FlashComm2 gathers each o_proj's block
   (`tp_passes.vllm.flashcomm2.plan`) and a shared-weight series keeps the layers this
   rank owns (`tp_passes.vllm.shared_weights.plan`), so those layouts are made from what
   a rank holds.
3. Model load: after the model runner loads the model, the planned layers are routed
   through the DP exchange, and with ``enforce_eager=True`` (nothing compiled) the graph
   rewrites are applied to vLLM's layers (`tp_passes.vllm.eager.parallelize_vllm`).
4. Dummy batches: an idle DP rank runs a dummy forward that computes no logits; with a
   sharded lm_head it then computes logits on zero rows, so it joins the exchange the
   busy ranks run in `compute_logits` (`tp_passes.vllm.module_tp.after_dummy_run`).

Nothing happens unless the compilation backend is "tp_passes".
"""

from __future__ import annotations

from typing import Any

_MARK = "_tp_passes_hook"


def register() -> None:
    """Zero-argument, idempotent; safe in every vLLM process."""
    from vllm.platforms import current_platform

    from tp_passes.config import register_host
    from tp_passes.vllm import config, dialect

    dialect.register()  # vLLM's all-reduce ops, seen by the rewrites
    register_host(config.host)  # vLLM's config and what it refuses, seen by the backend
    _wrap_classmethod(
        type(current_platform), "apply_config_platform_defaults", _before_platform_defaults
    )
    for runner in _model_runner_classes():
        _wrap_method(runner, "load_model", _after_load_model)
        _wrap_method(runner, "_dummy_run", _after_dummy_run)
    _wrap_function(
        "vllm.model_executor.model_loader.base_loader",
        "process_weights_after_loading",
        _before_weight_processing,
    )


def _before_platform_defaults(vllm_config: Any) -> None:
    from tp_passes.vllm.config import select_compilation_mode

    select_compilation_mode(vllm_config)


def _after_load_model(runner: Any) -> None:
    from vllm.config import CompilationMode

    from tp_passes.vllm.config import remember, uses_tp_passes

    cfg = runner.vllm_config
    if uses_tp_passes(cfg):
        remember(cfg)
        from tp_passes.vllm.eager import parallelize_vllm

        parallelize_vllm(
            runner.model, cfg, compiled=cfg.compilation_config.mode != CompilationMode.NONE
        )


def _before_weight_processing(model: Any, *_: Any) -> None:
    from tp_passes.vllm.config import current_vllm_config, uses_tp_passes

    cfg = current_vllm_config()
    if cfg is not None and uses_tp_passes(cfg):
        from tp_passes.vllm import flashcomm2, module_tp, shared_weights

        module_tp.plan_loaded_model(model, cfg)
        flashcomm2.plan_loaded_model(model, cfg)
        shared_weights.plan_loaded_model(model, cfg)  # a series over FlashComm2's blocks


def _after_dummy_run(runner: Any, out: Any) -> None:
    from tp_passes.vllm.module_tp import after_dummy_run

    after_dummy_run(runner, out)


def _model_runner_classes() -> list[type]:
    out = []
    for mod, name in (
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
        ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
    ):
        try:
            out.append(getattr(__import__(mod, fromlist=[name]), name))
        except Exception:  # a platform without this runner (or its deps)
            continue
    return out


def _wrap_classmethod(cls: type, name: str, before: Any) -> None:
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return

    def wrapped(klass: type, vllm_config: Any) -> None:
        before(vllm_config)
        original.__func__(klass, vllm_config)

    setattr(wrapped, _MARK, True)
    setattr(cls, name, classmethod(wrapped))


def _wrap_method(cls: type, name: str, after: Any) -> None:
    """`after(self)` (or `after(self, out)` when it takes two) once `cls.name` returns."""
    original = cls.__dict__.get(name)
    if original is None or getattr(original, _MARK, False):
        return
    with_out = after.__code__.co_argcount == 2

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        after(self, out) if with_out else after(self)
        return out

    setattr(wrapped, _MARK, True)
    setattr(cls, name, wrapped)


def _wrap_function(module: str, name: str, before: Any) -> None:
    """`before(*args)` ahead of every call of `module.name` (a module global: call sites in
    that module look it up when they call)."""
    import importlib

    mod = importlib.import_module(module)
    original = getattr(mod, name)
    if getattr(original, _MARK, False):
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(wrapped, _MARK, True)
    setattr(mod, name, wrapped)
