"""The vLLM plugin without an engine: registration, mode selection, configuration."""

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm extra: pip install -e '.[vllm]'")

from vllm.config import CompilationConfig, CompilationMode, VllmConfig  # noqa: E402

from tp_passes.config import TPConfig  # noqa: E402
from tp_passes.vllm.config import config_from_vllm, select_compilation_mode  # noqa: E402
from tp_passes.vllm.plugin import register  # noqa: E402

pytestmark = pytest.mark.vllm


def _config(backend: str, monkeypatch, **cc) -> VllmConfig:
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "0")  # restored after the test: the hook sets it
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE")
    cfg = VllmConfig.__new__(VllmConfig)  # only the fields the hook reads; no model needed
    cfg.compilation_config = CompilationConfig(backend=backend, **cc)
    cfg.additional_config = {}
    return cfg


def test_register_is_idempotent_and_wraps_once():
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    register()
    hook, load = type(current_platform).apply_config_platform_defaults, GPUModelRunner.load_model
    register()
    register()
    assert type(current_platform).apply_config_platform_defaults.__func__ is hook.__func__
    assert GPUModelRunner.load_model is load


def test_bare_backend_selects_dynamo_trace_once(monkeypatch):
    import os

    cfg = _config("tp_passes", monkeypatch)
    select_compilation_mode(cfg)
    assert cfg.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE
    assert "none" in cfg.compilation_config.custom_ops
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"


def test_cpu_compiles_with_the_default_backends_inductor_settings(monkeypatch):
    """On CPU vLLM gives its own DYNAMO_TRACE_ONCE compile a few Inductor settings; our
    inner Inductor compile gets the same ones (through the host), so a graph we leave
    alone compiles as the default backend would compile it."""
    from unittest import mock

    import torch._inductor.config as inductor_config

    from tp_passes.lowering import inductor_options
    from tp_passes.vllm import config as vllm_config

    cfg = _config("tp_passes", monkeypatch)
    select_compilation_mode(cfg)
    ic = cfg.compilation_config.inductor_compile_config
    assert {
        k: ic[k] for k in vllm_config.CPU_INDUCTOR_DEFAULTS
    } == vllm_config.CPU_INDUCTOR_DEFAULTS
    with mock.patch.object(vllm_config, "current_vllm_config", return_value=cfg):
        host = vllm_config.host(None)
    assert host.inductor_options == ic
    with inductor_options({**host.inductor_options, "not_an_inductor_key": 1}):
        assert inductor_config.cpp.dynamic_threads is True
        assert inductor_config.size_asserts is False
    assert inductor_config.cpp.dynamic_threads is False  # restored


def test_explicit_choices_are_kept(monkeypatch):
    cfg = _config(
        "tp_passes", monkeypatch, mode=CompilationMode.STOCK_TORCH_COMPILE, custom_ops=["all"]
    )
    select_compilation_mode(cfg)
    assert cfg.compilation_config.mode == CompilationMode.STOCK_TORCH_COMPILE
    assert cfg.compilation_config.custom_ops == ["all"]


def test_other_backends_untouched(monkeypatch):
    cfg = _config("inductor", monkeypatch)
    select_compilation_mode(cfg)
    assert cfg.compilation_config.mode is None and cfg.compilation_config.custom_ops == []


def test_aot_compile_forced_on_is_an_error(monkeypatch):
    cfg = _config("tp_passes", monkeypatch)
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    with pytest.raises(ValueError, match="VLLM_USE_AOT_COMPILE=1"):
        select_compilation_mode(cfg)


def test_piecewise_mode_is_an_error(monkeypatch):
    with pytest.raises(Exception, match="Invalid backend for piecewise"):  # vLLM's own check
        _config("tp_passes", monkeypatch, mode=CompilationMode.VLLM_COMPILE)


def test_config_precedence(monkeypatch):
    cfg = _config("tp_passes", monkeypatch)
    cfg.additional_config = {
        "finegrained_tp_config": {"oproj_tensor_parallel_size": 2},
        "tp_passes": {"flashcomm2": 0, "inner": "eager", "strict": True},
    }
    got = config_from_vllm(cfg, environ={"TP_PASSES_INNER": "inductor", "TP_PASSES_DUMP": "1"})
    assert (got.oproj_tp, got.inner, got.strict, got.dump) == (2, "eager", True, True)
    assert config_from_vllm(cfg, {"inner": "torchair"}, environ={}).inner == "torchair"
    assert config_from_vllm(_config("tp_passes", monkeypatch), environ={}) == TPConfig()


def test_weight_rewrites_are_left_to_the_load_time_plan(monkeypatch):
    """Inside vLLM the graph and eager rewrites never take a weight rewrite: module TP,
    FlashComm2 and the series are planned at load (the host refuses them with that reason)."""
    from tp_passes.vllm import config as vllm_config_module

    cfg = _config("tp_passes", monkeypatch)
    cfg.additional_config = {"tp_passes": {"flashcomm2": 1, "shared_weights": ["o_proj"]}}
    monkeypatch.setattr(vllm_config_module, "current_vllm_config", lambda: cfg)
    host = vllm_config_module.host(None)
    assert host.config.shared_weights == ("o_proj",) and host.config.flashcomm2 == 1
    assert sorted(host.refused) == ["embedding_tp", "lmhead_tp", "mlp_tp", "oproj_tp"]
    from tp_passes.vllm import flashcomm2

    model = torch.nn.Linear(2, 2)  # vLLM's loader planned a model in this process
    flashcomm2.plans()[model] = ([], [])
    try:
        refused = vllm_config_module.host(None).refused
    finally:
        del flashcomm2.plans()[model]
    for name in ("oproj_tp", "embedding_tp", "lmhead_tp", "mlp_tp", "flashcomm2", "shared_weights"):
        assert "planned at model load" in refused[name], name


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"tp_passes": {"flashcom2": 1}}, "flashcom2"),
        ({"tp_passes": {"flashcomm2": "two"}}, "flashcomm2"),
        ({"tp_passes": [1]}, r"additional_config\['tp_passes'\]"),
    ],
)
def test_bad_config_names_the_key(monkeypatch, extra, match):
    cfg = _config("tp_passes", monkeypatch)
    cfg.additional_config = extra
    with pytest.raises(ValueError, match=match):
        select_compilation_mode(cfg)


def test_vllm_reduce_scatter_and_all_gather_are_counted_on_the_wire():
    import torch
    import vllm.distributed.parallel_state  # noqa: F401  (registers torch.ops.vllm.*)
    from torch.fx.experimental.proxy_tensor import make_fx

    from tp_passes import wire

    def f(x):
        rs = torch.ops.vllm.reduce_scatter(x, 0, 2, "tp:0")
        return torch.ops.vllm.all_gather(rs, 0, 2, "tp:0")

    gm = make_fx(f, tracing_mode="fake")(torch.empty(8, 4))
    rows = wire.collective_bytes(gm)  # f32 [8, 4] = 128 B in; [4, 4] = 64 B gathered
    assert rows == [
        {"op": "reduce_scatter", "n": 2, "bytes": 64},
        {"op": "all_gather", "n": 2, "bytes": 64},
    ]


def test_register_wraps_the_load_and_dummy_run_hooks_once():
    from vllm.model_executor.model_loader import base_loader
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    register()
    process, dummy = base_loader.process_weights_after_loading, GPUModelRunner._dummy_run
    register()
    assert base_loader.process_weights_after_loading is process
    assert GPUModelRunner._dummy_run is dummy
    assert getattr(process, "_tp_passes_hook", False) and getattr(dummy, "_tp_passes_hook", False)


def _dp_config(dp: int, backend: str | None, moe: bool = False):
    from types import SimpleNamespace

    return SimpleNamespace(
        parallel_config=SimpleNamespace(
            data_parallel_size=dp,
            distributed_executor_backend=backend,
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
        ),
        model_config=SimpleNamespace(is_moe=moe),
    )


def test_lockstep_is_required_for_module_tp_across_dp():
    from tp_passes.vllm.config import lockstep_reason

    assert lockstep_reason(_dp_config(2, "external_launcher")) == ""
    assert lockstep_reason(_dp_config(4, "mp", moe=True)) == ""  # MoE DP engines step together
    why = lockstep_reason(_dp_config(2, "mp"))
    assert "step independently" in why and "external_launcher" in why and "'mp'" in why
    assert "data_parallel_size >= 2 (got 1)" in lockstep_reason(_dp_config(1, "mp"))


@pytest.mark.parametrize(
    "vllm_cfg, config, reason",
    [
        (_dp_config(2, "mp"), TPConfig(lmhead_tp=2, oproj_tp=2), "step independently"),
        (
            _dp_config(3, "external_launcher"),
            TPConfig(embedding_tp=2),
            "embedding_tp=2 does not divide data_parallel_size=3",
        ),
    ],
)
def test_module_tp_refused_from_the_config_alone(vllm_cfg, config, reason):
    """Refused before any collective or weight change: skipped with the reason, and an
    error under strict=True."""
    import dataclasses

    import torch

    from tp_passes.vllm.module_tp import plan

    model = torch.nn.Linear(4, 4)
    before = model.weight.clone()
    p = plan(model, vllm_cfg, config)
    assert not p.modules and p.entries
    assert all(not e.applied and e.blocked and reason in e.reason for e in p.entries)
    assert torch.equal(model.weight, before)
    with pytest.raises(RuntimeError, match=reason):
        plan(model, vllm_cfg, dataclasses.replace(config, strict=True))


def _on_platform(monkeypatch, route: str) -> None:
    """Make vLLM's current platform answer as CUDA or Ascend (the translation only asks)."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: route == "cuda")
    monkeypatch.setattr(current_platform, "device_name", "npu" if route == "ascend" else "cuda")


def test_cuda_keeps_vllm_compile_and_installs_the_post_grad_pass(monkeypatch):
    """On CUDA the default mode stays (piecewise, CUDA graphs, compile cache); the rewrites
    run as vLLM's post-grad pass, with graph partition on and AR+RMSNorm fusion off."""
    import os

    from tp_passes.vllm.config import uses_tp_passes
    from tp_passes.vllm.passes import PASS_KEY, VllmTPPass

    _on_platform(monkeypatch, "cuda")
    cfg = _config("tp_passes", monkeypatch)
    cfg.additional_config = {"tp_passes": {"sequence_parallel": True}}
    graphs = cfg.compilation_config.cudagraph_mode
    select_compilation_mode(cfg)
    cc = cfg.compilation_config
    assert cc.mode == CompilationMode.VLLM_COMPILE and cc.backend == "inductor"
    assert cc.use_inductor_graph_partition is True and cc.pass_config.fuse_allreduce_rms is False
    assert cc.cudagraph_mode == graphs
    p = cc.inductor_compile_config[PASS_KEY]
    assert isinstance(p, VllmTPPass) and p.config == TPConfig(sequence_parallel=True)
    assert uses_tp_passes(cfg)  # the load-time hooks still see tp_passes
    assert "VLLM_USE_AOT_COMPILE" not in os.environ  # vLLM's compile cache stays on
    select_compilation_mode(cfg)  # idempotent: the pass is ours
    assert cc.inductor_compile_config[PASS_KEY].uuid() == p.uuid()


def test_cuda_refuses_settings_that_would_hide_the_all_reduces(monkeypatch):
    _on_platform(monkeypatch, "cuda")
    cfg = _config("tp_passes", monkeypatch)
    cfg.compilation_config.pass_config.fuse_allreduce_rms = True
    with pytest.raises(ValueError, match="fuse_allreduce_rms=True"):
        select_compilation_mode(cfg)
    cfg = _config("tp_passes", monkeypatch, use_inductor_graph_partition=False)
    with pytest.raises(ValueError, match="use_inductor_graph_partition=False"):
        select_compilation_mode(cfg)


def test_cuda_with_mode_2_uses_the_backend(monkeypatch):
    _on_platform(monkeypatch, "cuda")
    cfg = _config("tp_passes", monkeypatch, mode=CompilationMode.DYNAMO_TRACE_ONCE)
    select_compilation_mode(cfg)
    assert cfg.compilation_config.backend == "tp_passes"
    assert "post_grad_custom_post_pass" not in cfg.compilation_config.inductor_compile_config


def test_ascend_says_what_it_needs_instead_of_running_nothing(monkeypatch):
    _on_platform(monkeypatch, "ascend")
    with pytest.raises(ValueError, match="graph_fusion_manager"):
        select_compilation_mode(_config("tp_passes", monkeypatch))
