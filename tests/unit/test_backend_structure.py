"""Graph structure at world sizes 16 and 32, in one process, with the fake process group."""

import pytest
import torch
import torch.distributed as dist

from tp_passes.backend import tp_passes_backend
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.report import all_reports, reset_reports

SP = {"sequence_parallel": True}  # the fake group has no cost figures: "auto" keeps


@pytest.mark.parametrize("fake_world", [16, 32], indirect=True)
@pytest.mark.parametrize(
    "opts, expect",
    [
        (SP, {"all_reduce": 0, "reduce_scatter_tensor": 5, "all_gather_into_tensor": 5}),
        (
            {"flashcomm2": 1, **SP},
            {"all_reduce": 0, "all_to_all_single": 2, "reduce_scatter_tensor": 3},
        ),
        (
            {"flashcomm2": 4, **SP},
            {"all_reduce": 0, "all_to_all_single": 2, "reduce_scatter_tensor": 5},
        ),
    ],
)
def test_structure_at_scale(fake_world, opts, expect):
    n = fake_world
    torch._dynamo.reset()
    reset_reports()
    cfg = ModelConfig(
        vocab=4 * n, hidden=64, heads=n, kv_heads=n, head_dim=4, intermediate=2 * n, layers=2
    )
    model = RefLlama(cfg, dist.group.WORLD)
    with torch.no_grad():
        torch.compile(
            model, backend=tp_passes_backend, options=dict(opts, inner="eager", strict=True)
        )(torch.arange(37))
    rep = all_reports()[-1]
    for op, count in expect.items():
        assert rep.collectives.get(op, 0) == count, (op, rep.collectives)
    assert all(e.applied for e in rep.entries)
    assert all(e.group_size == n for e in rep.entries)
