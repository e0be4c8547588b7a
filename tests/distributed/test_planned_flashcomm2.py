"""The body of FlashComm2 planned at load inside vLLM (`tp_passes.vllm.flashcomm2`) on real
gloo ranks, without vLLM: the o_proj TP shards are gathered over the ODP group as the load
plan gathers them, the layer's "own kernel" is a plain product on that block, and every
TP rank's output must equal the unsharded o_proj's (+ bias) on every token."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tp_passes import comm
from tp_passes.groups.layout import RankLayout
from tp_passes.groups.registry import flashcomm2_groups
from tp_passes.testing import run_ranks
from tp_passes.vllm.flashcomm2 import FlashComm2Layer
from tp_passes.weights import WeightSpec, derive

H, A = 24, 48  # A/n columns per TP rank


def _one(rank, world, m, dtype, tokens, bias):
    otp, odp = flashcomm2_groups(RankLayout(world_size=world, tp=world), m)
    gen = torch.Generator().manual_seed(0)  # the same full weights and tokens on every rank
    w = (torch.randn(H, A, generator=gen) / 4).to(dtype)
    b = torch.randn(H, generator=gen).to(dtype) if bias else None
    x_full = torch.randn(tokens, A, generator=gen).to(dtype)
    block = derive(w.chunk(world, dim=1)[rank].clone(), WeightSpec("gather", 1, odp.pg))
    kernel = SimpleNamespace(apply=lambda layer, v, _bias: v @ layer.weight.T)
    layer = SimpleNamespace(weight=block, bias=b, skip_bias_add=False, quant_method=kernel)
    f = FlashComm2Layer("o_proj", layer, m, H, (otp, odp, SimpleNamespace(world_size=world)))
    f.collectives = tuple(
        comm.Collectives(g) for g in (otp.group_name, odp.group_name, dist.group.WORLD.group_name)
    )
    x = x_full.chunk(world, dim=1)[rank]  # vLLM's o_proj input: split by heads
    with torch.no_grad():
        got = f.forward(x.reshape(1, tokens, -1))
        want = x_full @ w.T + (b if bias else 0)
    assert got.shape == (1, tokens, H) and f.fake(x).shape == (tokens, H), got.shape
    return (
        list(block.shape),
        (got[0].float() - want.float()).abs().max().item() / want.float().abs().max().item(),
    )


@pytest.mark.parametrize("world, m", [(2, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_tp_rank_equals_the_unsharded_o_proj(world, m, dtype):
    # bf16, m = 2: the two OTP partial sums are rounded before they are added
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for tokens, bias in [(1, True), (7, False), (9, True)]:  # 7, 9: not multiples of n
        for rank, (shape, rel) in enumerate(run_ranks(_one, world, m, dtype, tokens, bias)):
            assert shape == [H, A // m], (rank, shape)  # the ODP block, full width for m = 1
            assert rel <= tol, (world, m, tokens, rank, rel)
