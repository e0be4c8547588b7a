"""The body of ``tp_passes.planned_layer`` (module TP across DP inside vLLM) on real gloo ranks,
without vLLM: each rank brings its own token count (zero included), the layer's "own
kernel" is a plain product on its shard, and every rank's output must equal the
unsharded layer's. Ranks that enter different layers raise instead of exchanging."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_passes import comm
from tp_passes.groups.registry import NamedGroup
from tp_passes.testing import run_ranks
from tp_passes.testing.ranks import RankFailure
from tp_passes.vllm.dp_op import DPModule
from tp_passes.vllm.module_tp import FAMILIES

H, A, V, INTER = 24, 40, 37, 18  # V and INTER not divisible by 4, A by 3


def _layer(kind: str, rank: int, world: int, dtype: torch.dtype):
    """(DPModule, reference fn, input maker) for one kind; full weights equal on all ranks."""
    g = NamedGroup("dp", tuple(range(world)), dist.group.WORLD)
    k, j, members = world, rank, list(range(world))
    w = torch.Generator().manual_seed(0)
    if kind == "mlp_tp":
        gate_up = torch.randn(2 * INTER, H, generator=w).to(dtype) / 4
        down = torch.randn(H, INTER, generator=w).to(dtype) / 4
        gu_j, d_j = comm.shard_halves(gate_up, k, j), comm.shard_padded(down, 0, k, j)
        m = DPModule(FAMILIES[kind], "mlp", SimpleNamespace(), g, H, dtype, members)

        def up(x, gu):
            a, b = (x @ gu.T).chunk(2, dim=-1)
            return F.silu(a) * b

        m.local = (lambda x: up(x, gu_j), lambda h: h[:, :INTER] @ d_j.T)
        m.collectives = comm.Collectives(g.group_name)
        return m, lambda x: up(x, gate_up) @ down.T, "hidden"
    rows, cols = {"oproj_tp": (H, A), "embedding_tp": (V, H), "lmhead_tp": (V, H)}[kind]
    full = torch.randn(rows, cols, generator=w).to(dtype) / 4
    shard = comm.shard_padded(full, 0, k, j)
    width = cols if kind == "embedding_tp" else rows
    m = DPModule(FAMILIES[kind], kind, SimpleNamespace(weight=shard), g, width, dtype, members)
    m.collectives = comm.Collectives(g.group_name)
    if kind == "embedding_tp":
        m.local = lambda ids: F.embedding(ids, shard)
        return m, lambda ids: F.embedding(ids, full), "ids"
    m.local = lambda x: x @ shard.T
    return m, lambda x: x @ full.T, "cols" if kind == "oproj_tp" else "hidden"


def _all_kinds(rank, world, dtype, tokens):
    gen = torch.Generator().manual_seed(100 + rank)
    t = tokens[rank]
    out = {}
    for kind in ("oproj_tp", "embedding_tp", "lmhead_tp", "mlp_tp"):
        m, ref, what = _layer(kind, rank, world, dtype)
        if what == "ids":
            x = torch.randint(0, V, (t,), generator=gen)
        else:
            x = torch.randn(t, A if what == "cols" else H, generator=gen).to(dtype)
        with torch.no_grad():
            got, want = m.forward(x), ref(x)
        assert got.shape == want.shape and got.dtype == want.dtype, (kind, got.shape, want.shape)
        err = (got.float() - want.float()).abs().max().item() if t else 0.0
        out[kind] = (err, want.float().abs().max().item() if t else 1.0, dict(m.calls))
    return out


@pytest.mark.parametrize(
    "world, tokens", [(2, [3, 0]), (2, [5, 2]), (2, [0, 0]), (4, [1, 7, 0, 3])], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_rank_equals_the_unsharded_layer(world, tokens, dtype):
    # bf16: every output element is one rank's whole dot product, rounded once, as unsharded
    tol = 1e-5 if dtype == torch.float32 else 0.0
    for rank, kinds in enumerate(run_ranks(_all_kinds, world, dtype, tokens)):
        for kind, (err, scale, calls) in kinds.items():
            assert err <= tol * max(scale, 1.0), (rank, kind, err)
            # a rank with fewer rows than the largest was padded; one with none, empty
            assert calls["padded"] == int(tokens[rank] < max(tokens)), (rank, kind, calls)
            assert calls["empty"] == int(tokens[rank] == 0), (rank, kind, calls)


def _different_layers(rank, world):
    m, _, _ = _layer("oproj_tp" if rank == 0 else "lmhead_tp", rank, world, torch.float32)
    m.forward(torch.zeros(2, A if rank == 0 else H))


def test_ranks_in_different_layers_raise_instead_of_exchanging():
    with pytest.raises(RankFailure, match="entered different modules"):
        run_ranks(_different_layers, 2, timeout=60)


def _steps(rank, world, with_metadata, rows_of_third):
    """Two vLLM steps of three o_proj layers under vLLM's own forward context."""
    from vllm.forward_context import DPMetadata, ForwardContext, override_forward_context

    tokens = [3, 5]
    layers = []
    for i in range(3):
        m, ref, _ = _layer("oproj_tp", rank, world, torch.float32)
        m.path = f"layers.{i}.o_proj"
        layers.append((m, ref))
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        meta = DPMetadata(torch.tensor(tokens, dtype=torch.int32)) if with_metadata else None
        ctx = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={})
        ctx.dp_metadata = meta
        with override_forward_context(ctx), torch.no_grad():
            for i, (m, ref) in enumerate(layers):
                t = rows_of_third if i == 2 and rank == 1 else tokens[rank]
                x = torch.randn(t, A, generator=gen)
                assert torch.allclose(m.forward(x), ref(x), atol=1e-5)
    return [m.calls["agreed"] for m, _ in layers]


@pytest.mark.parametrize("with_metadata", [False, True], ids=["agreed", "dp_metadata"])
def test_row_counts_once_per_step_or_from_vllm_dp_metadata(with_metadata):
    """Inside a vLLM forward the step's first op agrees the counts for every layer after
    it (one collective per step, not per layer); with vLLM's DP metadata, none at all."""
    for agreed in run_ranks(_steps, 2, with_metadata, 5):
        assert agreed == ([0, 0, 0] if with_metadata else [2, 0, 0]), agreed


def test_a_layer_that_sees_other_rows_than_its_step_raises():
    with pytest.raises(RankFailure, match="got 4 rows but this step's row count"):
        run_ranks(_steps, 2, True, 4, timeout=60)
