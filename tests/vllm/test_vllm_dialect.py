"""The vLLM dialects, on vLLM's own layers in spawned gloo ranks (no engine).

A small decoder block made of vLLM's `VocabParallelEmbedding`, `RMSNorm`,
`MergedColumnParallelLinear` and `RowParallelLinear` runs under vLLM's parallel state
(`init_distributed_environment` + `initialize_model_parallel` on the gloo world).
Two dialects of its all-reduces:

- "vllm.all_reduce": the custom-op collective vLLM uses on CUDA/ROCm/XPU/NPU (switched on
  with the coordinator's `use_custom_op_call`), with weights applied by `F.linear`
  (vLLM's unpacked CPU fallback), so the matmuls are plain `aten.mm`;
- "shm": vLLM on CPU, `_C.shm_allreduce` after functionalization, with prepacked
  `_C.onednn_mm` weights.

Each is compiled with backend "tp_passes" and compared with the uncompiled block on
every rank, then the graph is checked for which collectives remain.
"""

import uuid

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm extra: pip install -e '.[vllm]'")

from tp_passes.config import TPConfig  # noqa: E402
from tp_passes.eager import parallelize  # noqa: E402
from tp_passes.report import all_reports  # noqa: E402
from tp_passes.vllm.eager import as_vllm_row_parallel  # noqa: E402
from conftest import vllm_cpu_has_shm_all_reduce  # noqa: E402
from tp_passes.testing import run_ranks  # noqa: E402

pytestmark = pytest.mark.vllm
VOCAB, HIDDEN, INTER, LAYERS = 50, 64, 96, 2


def _block(dialect: str, dtype: torch.dtype):
    """Build the block on every rank with rank-sharded weights of one seeded full model."""
    import torch.nn as nn
    import torch.nn.functional as F
    from vllm.distributed import get_tp_group
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    class Layer(nn.Module):
        """norm, column-parallel, row-parallel (o_proj), norm, gate_up, row-parallel (down_proj)."""

        def __init__(self, i: int) -> None:
            super().__init__()
            self.input_layernorm = RMSNorm(HIDDEN)
            self.post_attention_layernorm = RMSNorm(HIDDEN)
            self.qkv_proj = ColumnParallelLinear(
                HIDDEN, INTER, bias=False, prefix=f"layers.{i}.qkv_proj"
            )
            self.o_proj = RowParallelLinear(INTER, HIDDEN, bias=True, prefix=f"layers.{i}.o_proj")
            self.gate_up_proj = MergedColumnParallelLinear(
                HIDDEN, [INTER] * 2, bias=False, prefix=f"layers.{i}.gate_up_proj"
            )
            self.down_proj = RowParallelLinear(
                INTER, HIDDEN, bias=False, prefix=f"layers.{i}.down_proj"
            )

        def forward(self, h: torch.Tensor, residual: torch.Tensor | None):
            h, residual = (
                (self.input_layernorm(h), h)
                if residual is None
                else self.input_layernorm(h, residual)
            )
            h, _ = self.o_proj(torch.tanh(self.qkv_proj(h)[0]))  # attention stand-in
            h, residual = self.post_attention_layernorm(h, residual)
            gate, up = self.gate_up_proj(h)[0].chunk(2, dim=-1)
            h, _ = self.down_proj(F.silu(gate) * up)
            return h, residual

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = VocabParallelEmbedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList(Layer(i) for i in range(LAYERS))
            self.norm = RMSNorm(HIDDEN)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h, residual = self.embed_tokens(ids), None
            for layer in self.layers:
                h, residual = layer(h, residual)
            return self.norm(h, residual)[0]

    block = Block().to(dtype)
    gen = torch.Generator().manual_seed(0)
    for name, p in block.named_parameters():  # full weights are seeded: every rank agrees
        full_shape = list(p.shape)
        loader = getattr(p, "weight_loader", None)
        if loader is None:
            p.data.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen).to(dtype))
            continue
        if "embed_tokens" in name:
            full_shape[0] = VOCAB
        elif p.dim() == 2 and ("o_proj" in name or "down_proj" in name):
            full_shape[1] *= get_tp_group().world_size
        elif "_proj" in name and not ("o_proj" in name or "down_proj" in name):  # column parallel
            full_shape[0] *= get_tp_group().world_size
        full = torch.randn(full_shape, generator=gen).to(dtype) * 0.2
        if "gate_up" in name:
            for shard, half in enumerate(full.chunk(2)):
                loader(p, half, shard)
        else:
            loader(p, full)
    for module in block.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            module._cpu_skip_gemm_dispatch = dialect == "vllm.all_reduce"  # F.linear: plain aten.mm
            method.process_weights_after_loading(module)
    get_tp_group().use_custom_op_call = dialect == "vllm.all_reduce"
    return block


DIALECT = {"vllm.all_reduce": "vllm.all_reduce", "shm": "_C.shm_allreduce"}


def _expected_dialect(dialect):
    """vLLM's CPU builds without the shm all-reduce (no AVX-512) fall back to
    torch.distributed's in-place all_reduce: the plain PyTorch form after functionalization."""
    if dialect == "shm" and not vllm_cpu_has_shm_all_reduce():
        return "c10d_functional"
    return DIALECT[dialect]


def _emitted(dialect):
    """The collectives sequence parallelism emits for an all-reduce of `dialect`."""
    if dialect == "vllm.all_reduce":
        return "reduce_scatter", "all_gather"
    return "reduce_scatter_tensor", "all_gather_into_tensor"


def _ranks(fn, world, *args):
    # the CPU shm communicator names its segment after VLLM_DIST_IDENT (vLLM's worker sets it)
    env = {"VLLM_DIST_IDENT": f"tp_passes_test_{uuid.uuid4().hex[:12]}"}
    return run_ranks(fn, world, *args, timeout=300, env=env)


def _vllm_parallel_state(rank, world):
    """vLLM's world and TP coordinators on the gloo world `run_ranks` made."""
    import vllm._custom_ops  # noqa: F401  (loads vllm._C: onednn_mm, shm_allreduce)
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # as vLLM's engine and workers do: registers tp_passes' dialects

    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():  # an earlier case of this spawn set it up
        return
    init_distributed_environment(world, rank, local_rank=rank, backend="gloo")
    initialize_model_parallel(tensor_model_parallel_size=world)


def _rank(rank, world, dialect, dtype, tokens, options):
    from vllm.config import VllmConfig, set_current_vllm_config

    torch._dynamo.reset()
    with set_current_vllm_config(VllmConfig()):
        _vllm_parallel_state(rank, world)
        block = _block(dialect, dtype)
        ids = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = block(ids)
            got = torch.compile(
                block, backend="tp_passes", dynamic=True, options={"inner": "eager", **options}
            )(ids)
            # the eager path on the same layers (what enforce_eager=True runs)
            eager_entries = parallelize(
                block, TPConfig.from_dict(options), recognize=as_vllm_row_parallel
            )
            eager = block(ids)
    report = all_reports()[-1]
    odp = ""
    if any(e.rewrite == "flashcomm2" and e.applied for e in report.entries):
        # FlashComm2's groups, made through vLLM's init_model_parallel_group
        from tp_passes.groups.registry import get_group_info

        odp = getattr(get_group_info("fc2_odp").coordinator, "unique_name", "")
    return {
        "diff": ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item(),
        "eager_diff": ((eager.float() - ref.float()).abs().max() / ref.float().abs().max()).item(),
        "eager": [(e["rewrite"], e["module"], e["applied"], e["reason"]) for e in eager_entries],
        "entries": [(e.rewrite, e.module, e.applied, e.reason) for e in report.entries],
        "dialects": sorted({e.details.get("dialect") for e in report.entries}),
        "collectives": report.collectives,
        "wire_before": report.wire_bytes_before,
        "odp": odp,
    }


def _rank_pass_manager(rank, world, dialect, dtype, tokens, options):
    """The block compiled by plain Inductor with vLLM's PostGradPassManager as the post-grad
    pass and our pass added to it, as vLLM's VLLM_COMPILE backend sets it up on CUDA."""
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.utils import Range

    from tp_passes.vllm.passes import VllmTPPass

    torch._dynamo.reset()
    cfg = VllmConfig()
    with set_current_vllm_config(cfg):
        _vllm_parallel_state(rank, world)
        block = _block(dialect, dtype)
        ids = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(1))
        manager = PostGradPassManager()
        manager.configure(cfg)
        pass_ = VllmTPPass(TPConfig.from_dict(options))
        with torch.no_grad():
            ref = block(ids)
            # what the plugin does at vLLM's model load on this route: FlashComm2's weights
            pass_.inner.prepare(block, as_vllm_row_parallel)
        manager.add(pass_)
        with torch.no_grad(), pass_context(Range(start=1, end=1024)):
            # fx_graph_cache off: a cache hit from an earlier run would skip the passes
            options = {"post_grad_custom_post_pass": manager, "fx_graph_cache": False}
            got = torch.compile(block, dynamic=True, options=options)(ids)
            uuid_ = manager.uuid()  # covers our pass's uuid
    report = all_reports()[-1]
    return {
        "diff": ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item(),
        "entries": [(e.rewrite, e.module, e.applied, e.reason) for e in report.entries],
        "collectives": report.collectives,
        "uuid": uuid_,
    }


N_AR = 2 * LAYERS + 1  # embedding + o_proj + down_proj per layer
SP = {"sequence_parallel": True}  # the cost model keeps vLLM's all-reduce on CPU
FC2_SP = {"flashcomm2": 1, "sequence_parallel": True}
F32, BF16 = torch.float32, torch.bfloat16

# (dialect, dtype, tokens, options) per world size; every case of a world runs in one
# spawn of ranks (vLLM's parallel state is set up once per process)
SP_CASES = {
    2: [
        ("vllm.all_reduce", F32, 5, SP),
        ("vllm.all_reduce", BF16, 8, SP),
        ("shm", F32, 5, SP),
        ("shm", F32, 8, SP),
    ],
    4: [("vllm.all_reduce", F32, 5, SP), ("vllm.all_reduce", BF16, 6, SP), ("shm", F32, 7, SP)],
}
FC2_CASES = [("vllm.all_reduce", F32, 7, FC2_SP), ("shm", F32, 7, FC2_SP)]  # world 2


PASS_MANAGER_CASE = ("vllm.all_reduce", F32, 5, FC2_SP)  # world 2, vLLM's CUDA dialect


def _cases(rank, world, cases):
    out = [_rank(rank, world, *case) for case in cases]
    if world == 2:
        out.append(_rank_pass_manager(rank, world, *PASS_MANAGER_CASE))
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    """{(world, case): [result of rank 0, rank 1, ...]} for every case above."""
    out = {}
    for world, cases in SP_CASES.items():
        cases = cases + (FC2_CASES if world == 2 else [])
        per_rank = _ranks(_cases, world, cases)
        for i, case in enumerate(cases):
            out[(world, repr(case))] = [r[i] for r in per_rank]
        if world == 2:
            out["pass_manager"] = [r[-1] for r in per_rank]
    return out


@pytest.mark.parametrize(
    "world, case", [(w, c) for w, cases in SP_CASES.items() for c in cases], ids=str
)
def test_sequence_parallel_on_vllm_layers(results, world, case):
    dialect, dtype = case[0], case[1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for r in results[(world, repr(case))]:
        assert r["diff"] <= tol, r["diff"]
        assert r["dialects"] == [_expected_dialect(dialect)], r["dialects"]
        applied = sorted(m for rw, m, ok, _ in r["entries"] if ok and rw == "sequence_parallel")
        assert len(applied) == N_AR and applied[0] == "embed_tokens", r["entries"]
        # vLLM's all-reduce op becomes vLLM's own reduce_scatter / all_gather ops (what
        # its CUDA graphs capture); the CPU forms become torch's functional collectives
        rs, ag = _emitted(dialect)
        assert r["collectives"] == {rs: N_AR, ag: N_AR}, r["collectives"]
        assert r["wire_before"] > 0  # vLLM's all-reduces are counted in the original graph
        assert r["eager_diff"] <= tol, r["eager_diff"]
        assert sorted(m for rw, m, ok, _ in r["eager"] if ok) == sorted(
            ["embed_tokens"]
            + [f"layers.{i}.{p}" for i in range(LAYERS) for p in ("o_proj", "down_proj")]
        )


def test_flashcomm2_on_vllm_all_reduce_dialect(results):
    for r in results[(2, repr(FC2_CASES[0]))]:
        assert r["diff"] <= 1e-5, r["diff"]
        fc2 = sorted(m for rw, m, ok, _ in r["entries"] if ok and rw == "flashcomm2")
        assert fc2 == [f"layers.{i}.o_proj" for i in range(LAYERS)], r["entries"]
        assert r["odp"].startswith("tp_passes_fc2_odp"), r["odp"]  # a vLLM GroupCoordinator
        assert r["eager_diff"] <= 1e-5, r["eager_diff"]
        assert sorted(m for rw, m, ok, _ in r["eager"] if ok and rw == "flashcomm2") == fc2, r[
            "eager"
        ]
        assert (
            r["collectives"].get("all_to_all_single") == LAYERS
            and "all_reduce" not in r["collectives"]
        ), r["collectives"]


def test_flashcomm2_skipped_on_prepacked_cpu_weights(results):
    for r in results[(2, repr(FC2_CASES[1]))]:
        assert r["diff"] <= 1e-5, r["diff"]
        fc2 = [(m, ok, why) for rw, m, ok, why in r["entries"] if rw == "flashcomm2"]
        assert len(fc2) == LAYERS and all(not ok and "onednn" in why for _, ok, why in fc2), fc2
        assert r["eager_diff"] <= 1e-5, r["eager_diff"]
        eager_fc2 = [(ok, why) for rw, m, ok, why in r["eager"] if rw == "flashcomm2"]
        assert len(eager_fc2) == LAYERS and all(
            not ok and "prepacked" in why for ok, why in eager_fc2
        ), eager_fc2
        # sequence parallelism still takes every all-reduce
        assert r["collectives"] == {
            "reduce_scatter_tensor": N_AR,
            "all_gather_into_tensor": N_AR,
        }, r["collectives"]


def _divergent_eager(rank, world):
    from vllm.config import VllmConfig, set_current_vllm_config

    from tp_passes.vllm.eager import parallelize_vllm

    cfg = VllmConfig(additional_config={"tp_passes": {"sequence_parallel": rank == 0}})
    with set_current_vllm_config(cfg):
        _vllm_parallel_state(rank, world)
        block = _block("shm", torch.float32)
        try:
            parallelize_vllm(block, cfg, compiled=False)
        except RuntimeError as e:
            return str(e)
    return None


def test_eager_plan_that_differs_across_ranks_raises_instead_of_hanging():
    msgs = _ranks(_divergent_eager, 2)
    assert all(m and "differs across ranks" in m for m in msgs), msgs


def test_vllm_post_grad_pass_manager_runs_the_rewrites(results):
    """vLLM's PostGradPassManager (its passes, then ours, then fix_functionalization) on
    vLLM's layers, FlashComm2 prepared on the layers first (as at vLLM's model load):
    equal outputs on every rank; FlashComm2 at both o_proj, sequence parallelism at the
    other all-reduces (embedding, down_proj)."""
    for r in results["pass_manager"]:
        assert r["diff"] <= 1e-5, r["diff"]
        fc2 = sorted(m for rw, m, ok, _ in r["entries"] if rw == "flashcomm2" and ok)
        assert fc2 == [f"layers.{i}.o_proj" for i in range(LAYERS)], r["entries"]
        sp = [m for rw, m, ok, _ in r["entries"] if rw == "sequence_parallel" and ok]
        assert len(sp) == LAYERS + 1, r["entries"]
        assert r["collectives"] == {
            "reduce_scatter": LAYERS + 1,  # vLLM's ops
            "all_gather": LAYERS + 1,
            "all_gather_into_tensor": LAYERS,  # FlashComm2's, on its own groups
            "all_to_all_single": LAYERS,
        }, r["collectives"]
    assert len({r["uuid"] for r in results["pass_manager"]}) == 1
