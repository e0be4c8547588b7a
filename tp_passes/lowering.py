"""Lowering: device-specific fused matmul + reduce-scatter, kept activations, the inner compiler.

`mm_reduce_scatter_impl` returns a function with the signature ``fn(x, w, group, n)``
computing ``reduce_scatter(pad(x) @ w.T)``; the rewrite traces whichever one the device
has, so the final graph holds the fused kernel where one exists and the decomposed
mm + reduce_scatter elsewhere. A bias added before the reduce (rank 0 only, as vLLM's
RowParallelLinear does) cannot enter the fused kernels, so the plan keeps such matches
decomposed on every rank: the choice must be the same on all ranks of the group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from tp_passes import comm
from tp_passes.config import TPConfig

NPU_MAX_GROUP = 8  # torch_npu.npu_mm_reduce_scatter_base supports at most 8 ranks


def _decomposed(x, w, group: str, n: int):
    return comm.mm_reduce_scatter(x, w, None, group, n)


def _cuda_fused(x, w, group: str, n: int):
    return torch.ops.symm_mem.fused_matmul_reduce_scatter(
        comm.pad_rows(x, n), w.t(), "sum", 0, group
    )


def _npu_fused(x, w, group: str, n: int):
    import torch_npu  # optional dependency, only on Ascend
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    hcom = pg._get_backend(torch.device("npu")).get_hccl_comm_name(pg.rank())
    return torch_npu.npu_mm_reduce_scatter_base(
        comm.pad_rows(x, n), w.t(), hcom, n, reduce_op="sum"
    )


def mm_reduce_scatter_impl(device_type: str, n: int, group: str) -> tuple[Callable, str]:
    """(fn, description) of the best reduce_scatter(x @ w.T) on this device."""
    if device_type == "cuda" and hasattr(torch.ops.symm_mem, "fused_matmul_reduce_scatter"):
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        enable_symm_mem_for_group(group)
        return _cuda_fused, "cuda: symm_mem.fused_matmul_reduce_scatter"
    if device_type == "npu" and n <= NPU_MAX_GROUP:
        return _npu_fused, "npu: torch_npu.npu_mm_reduce_scatter_base"
    return _decomposed, f"{device_type}: decomposed mm + reduce_scatter (no fused kernel)"


# Ops the rewrites match by name (the gated MLP's activation). The ATen graph is traced
# without their decompositions; `decompose_kept` applies them once the rewrites are done,
# so Inductor sees the graph it expects.
KEEP_UNDECOMPOSED = (torch.ops.aten.silu.default, torch.ops.aten.gelu.default)


def decompose_kept(gm: torch.fx.GraphModule, table: dict, fake_mode: Any) -> None:
    """Replace every remaining KEEP_UNDECOMPOSED node by its decomposition from `table`."""
    from tp_passes.fx import splice

    for node in list(gm.graph.nodes):
        if (
            node.op != "call_function"
            or node.target not in KEEP_UNDECOMPOSED
            or node.target not in table
        ):
            continue
        decomp, rest, kwargs = table[node.target], node.args[1:], dict(node.kwargs)
        new = splice(
            gm.graph, lambda t: decomp(t, *rest, **kwargs), [node.args[0]], node, fake_mode, table
        )
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()


def inductor_options(options: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """`torch._inductor.config.patch` with the host's Inductor settings (aot_autograd reads
    some of them too, e.g. which auto_functionalized form to emit). Keys this torch does
    not know are left out, as Inductor would reject them."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy().keys()
    return inductor_config.patch({k: v for k, v in options.items() if k in known})


def _concrete(a: Any) -> Any:
    """`a` as a Python int if it is one, or a SymInt a guard has fixed; else None."""
    import sympy

    v = a.meta.get("val") if isinstance(a, fx.Node) else a
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, torch.SymInt):
        expr = v.node.shape_env.replace(v.node.expr)
        return int(expr) if isinstance(expr, sympy.Integer) else None
    return None


def fold_specialized_sizes(gm: fx.GraphModule) -> int:
    """Replace size arithmetic (``operator.neg/mod/floordiv/...`` on sizes) whose inputs a
    guard has fixed by its value. A dynamic graph traced at T = n has its per-rank row
    count guarded to 1, which fixes T; Inductor's lowering of ``mod`` on two plain ints
    then fails (``'int' object has no attribute 'is_nonnegative'``). Returns the count."""
    import operator

    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__module__", "") not in (
            "_operator",
            operator.__name__,
        ):
            continue
        args = [_concrete(a) for a in node.args]
        if node.kwargs or not args or any(a is None for a in args):
            continue
        value = node.target(*args)
        if not isinstance(value, int):
            continue
        for user in list(node.users):
            user.args = fx.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.map_arg(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.recompile()
    return folded


def inner_compile(config: TPConfig, gm: fx.GraphModule, example_inputs: list[Any]):
    """Compile the rewritten graph with `config.inner`: Inductor, eager, or torchair."""
    from torch._functorch.aot_autograd import make_boxed_func

    if config.inner == "eager":
        return make_boxed_func(gm.forward)
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx_inner

        fold_specialized_sizes(gm)
        return compile_fx_inner(gm, example_inputs)
    try:
        import torchair
    except ImportError:
        raise RuntimeError(
            "tp_passes: inner='torchair' needs torchair (Ascend), which is not installed; "
            "use inner='inductor' or 'eager'"
        ) from None
    return make_boxed_func(torchair.get_npu_backend()(gm, example_inputs))
