"""Bad input: a clear error that names the field (and the numbers) on every rank, never a hang.

Config-level cases run in this process; the distributed ones run on gloo ranks, where
each rank catches its own error and returns the message, so the test sees that *every*
rank raised (not just the first). `run_ranks`' deadline turns a hang into a failure.
"""

import pytest
import torch
import torch.distributed as dist

import tp_passes
from tp_passes import RankLayout, TPConfig
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.testing import run_ranks

CONFIG_CASES = [
    ({"oproj_tp": "two"}, "oproj_tp"),
    ({"lmhead_tp": -1}, "lmhead_tp"),
    ({"embedding_tp": 1.5}, "embedding_tp"),
    ({"mlp_tp": True}, "mlp_tp"),
    ({"flashcomm2": "x"}, "flashcomm2"),
    ({"sequence_parallel": "sometimes"}, "sequence_parallel"),
    ({"fuse_mm_reduce_scatter": 3}, "fuse_mm_reduce_scatter"),
    ({"inner": "tvm"}, "inner"),
    ({"release_weights": "maybe"}, "release_weights"),
    ({"strict": 2}, "strict"),
    ({"opro_tp": 2}, "opro_tp"),
    ({"module_names": {"bogus": ["x"]}}, "module_names"),
    ({"module_names": {"oproj_tp": "o_proj"}}, "module_names"),
    ({"flashcomm2": 1, "oproj_tp": 2}, "flashcomm2=1 and oproj_tp=2"),
    ({"finegrained_tp_config": [1, 2]}, "finegrained_tp_config"),
    ({"oproj_tensor_parallel_size": "x"}, "oproj_tensor_parallel_size"),
]


@pytest.mark.parametrize("options, field", CONFIG_CASES)
def test_config_errors_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        TPConfig.from_dict(options)


def test_env_error_names_the_variable():
    with pytest.raises(ValueError, match="TP_PASSES_OPROJ_TP"):
        TPConfig.from_env({"TP_PASSES_OPROJ_TP": "abc"})


def test_not_a_mapping():
    with pytest.raises(ValueError, match="expected a mapping"):
        TPConfig.from_dict([("oproj_tp", 2)])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"world_size": 6, "tp": 4}, "world_size=6 is not divisible"),
        ({"world_size": 4, "tp": 0}, "tp must be a positive int"),
        ({"world_size": 4, "tp": 2, "islands": [[0, 1], [2, 2]]}, "islands must list every rank"),
    ],
)
def test_layout_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RankLayout(**kwargs)


def test_no_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        tp_passes.init_groups(TPConfig(), RankLayout(2, tp=2))


# -- distributed cases: every rank must raise, with the field in the message ---------------


def _compile(model, ids, **opts):
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="tp_passes", options={"inner": "eager", **opts})(ids)


def _cases(rank, world):
    ids = torch.arange(5)
    tp_model = lambda **kw: RefLlama(ModelConfig(layers=1, **kw), dist.group.WORLD)  # noqa: E731
    dp_model = lambda **kw: RefLlama(ModelConfig(layers=1, **kw), None)  # noqa: E731
    cases = {
        "init_groups world size": lambda: tp_passes.init_groups(TPConfig(), RankLayout(8, tp=8)),
        "init_groups k does not divide dp": lambda: tp_passes.init_groups(
            TPConfig(lmhead_tp=3), RankLayout(world, dp=world)
        ),
        "init_groups flashcomm2 m": lambda: tp_passes.init_groups(
            TPConfig(flashcomm2=3), RankLayout(world, tp=world)
        ),
        "init_groups differs across ranks": lambda: tp_passes.init_groups(
            TPConfig(lmhead_tp=2 if rank == 0 else 0), RankLayout(world, dp=world)
        ),
        "strict flashcomm2 size": lambda: _compile(tp_model(), ids, flashcomm2=3, strict=True),
        "strict lm_head bias": lambda: _compile(
            dp_model(lm_head_bias=True), ids, lmhead_tp=2, strict=True
        ),
        "strict mlp bias": lambda: _compile(dp_model(mlp_bias=True), ids, mlp_tp=2, strict=True),
        "strict k does not divide dp": lambda: _compile(dp_model(), ids, mlp_tp=4, strict=True),
        "strict uneven tokens": lambda: _compile(
            dp_model(), torch.arange(5 + rank), lmhead_tp=2, strict=True
        ),
        # TP ranks must bring the same tokens; the cost model's choice depends on T
        "graph TP token counts differ across ranks": lambda: _compile(
            tp_model(), torch.arange(5 + rank)
        ),
        "graph config differs across ranks": lambda: _compile(
            dp_model(), ids, **({"mlp_tp": 2} if rank else {})
        ),
        "eager config differs across ranks": lambda: tp_passes.parallelize(
            dp_model(), TPConfig(**({"mlp_tp": 2} if rank else {"oproj_tp": 2}))
        ),
        "eager strict o_proj already TP": lambda: tp_passes.parallelize(
            tp_model(), TPConfig(oproj_tp=2, strict=True)
        ),
        "bad option through torch.compile": lambda: _compile(tp_model(), ids, flashcomm2="one"),
        "init_groups then another layout": lambda: (
            tp_passes.init_groups(TPConfig(), RankLayout(world, tp=world)),
            tp_passes.init_groups(TPConfig(), RankLayout(world, dp=world)),
        ),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = "no error"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
        tp_passes.destroy_groups()
        dist.barrier()  # the next case starts together
    return out


EXPECTED = {
    "init_groups world size": "layout.world_size=8",
    "init_groups k does not divide dp": "lmhead_tp=3",
    "init_groups flashcomm2 m": "flashcomm2=3",
    "init_groups differs across ranks": "differs across ranks",
    "strict flashcomm2 size": "flashcomm2=3 must divide the TP size n=2",
    "strict lm_head bias": "lm_head with bias",
    "strict mlp bias": "MLP with biases",
    "strict k does not divide dp": "mlp_tp=4 does not divide",
    "strict uneven tokens": "token counts",
    "graph TP token counts differ across ranks": "differs across ranks",
    "graph config differs across ranks": "differs across ranks",
    "eager config differs across ranks": "differs across ranks",
    "eager strict o_proj already TP": "already tensor-parallel",
    "bad option through torch.compile": "flashcomm2",
    "init_groups then another layout": "destroy_groups",
}


def test_distributed_bad_input_raises_on_every_rank():
    results = run_ranks(_cases, 2, timeout=240)
    for rank, out in enumerate(results):
        for name, expected in EXPECTED.items():
            assert expected in out[name], (rank, name, out[name])
