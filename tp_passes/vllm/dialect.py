"""vLLM's names for its groups, resolved to torch ProcessGroup names.

vLLM's graphs name a group in two ways that torch cannot resolve:

- ``torch.ops.vllm.all_reduce(x, group_name="tp:0")``: the GroupCoordinator's
  `unique_name`;
- ``torch.ops._C.shm_allreduce(handle, x)`` (vLLM on CPU): the integer handle of the
  coordinator's shared-memory communicator.

Both map to the coordinator's `device_group`, on which our functional collectives run.
The groups tp_passes needs are made through vLLM's coordinators (`coordinator_group`).
"""

from __future__ import annotations

from typing import Any

from tp_passes.groups.layout import Groups
from tp_passes.groups.registry import NamedGroup


def _coordinators() -> list[Any]:
    from vllm.distributed import parallel_state as ps

    return [c for c in (ref() for ref in ps._groups.values()) if c is not None]


def coordinator_by_name(unique_name: str) -> Any:
    for c in _coordinators():
        if c.unique_name == unique_name:
            return c
    raise KeyError(f"tp_passes: vLLM has no group named {unique_name!r}")


def torch_group_name(unique_name: str) -> str:
    """`"tp:0"` -> the torch name of that coordinator's device group."""
    return coordinator_by_name(unique_name).device_group.group_name


def shm_group_name(handle: int) -> str:
    """The torch name of the device group whose CPU shm communicator has `handle`."""
    for c in _coordinators():
        module = getattr(getattr(c, "device_communicator", None), "dist_module", None)
        if getattr(module, "handle", None) == handle:
            return c.device_group.group_name
    raise KeyError(f"tp_passes: no vLLM group owns shm handle {handle}")


# -- the all-reduce forms of vLLM's graphs, registered with `tp_passes.fx` ----------------


def vllm_all_reduce(node: Any) -> Any:
    """``vllm.all_reduce(x, group_name="tp:0")`` (CUDA, ROCm, XPU, NPU custom op)."""
    from tp_passes.fx import AllReduce, NativeCollectives, custom_op

    op = custom_op("vllm", "all_reduce")
    if op is None or node.target is not op:
        return None
    name = node.kwargs.get("group_name", node.args[1] if len(node.args) > 1 else None)
    rs, ag = custom_op("vllm", "reduce_scatter"), custom_op("vllm", "all_gather")
    native = NativeCollectives(rs, ag, name) if rs is not None and ag is not None else None
    return AllReduce(node, node.args[0], torch_group_name(name), "vllm.all_reduce", native)


def shm_all_reduce(node: Any) -> Any:
    """vLLM on CPU: the in-place ``_C.shm_allreduce(handle, x)``, functionalized by AOT into
    ``auto_functionalized[_v2](_C.shm_allreduce, handle=h, ...)`` + ``getitem(., 1)``."""
    from tp_passes.fx import AllReduce, custom_op, functionalized_inplace

    op = custom_op("_C", "shm_allreduce")
    found = functionalized_inplace(node, op, "data") if op is not None else None
    if found is None:
        return None
    return AllReduce(found[1], found[0], shm_group_name(node.kwargs["handle"]), "_C.shm_allreduce")


def coordinator_group(
    name: str, rank_lists: Groups, mine: tuple[int, ...], backend: str
) -> NamedGroup | None:
    """Inside vLLM (its model-parallel groups exist): reuse its TP/DP/PP/world coordinators,
    create the rest through it, so vLLM's communicators serve them too."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    existing = {
        "world": ps.get_world_group,
        "tp": ps.get_tp_group,
        "dp": ps.get_dp_group,
        "pp": ps.get_pp_group,
    }
    if name in existing:
        coord = existing[name]()
        if tuple(coord.ranks) != mine:
            raise ValueError(
                f"tp_passes: vLLM's {name} group is {coord.ranks} but the layout gives {list(mine)}"
            )
    else:
        coord = ps.init_model_parallel_group(
            rank_lists, ps.get_world_group().local_rank, backend, group_name=f"tp_passes_{name}"
        )
    return NamedGroup(name, mine, coord.device_group, coordinator=coord)


def register() -> None:
    """Make the rewrites see vLLM's all-reduces, and make groups through vLLM's coordinators
    (idempotent)."""
    from tp_passes.fx import Dialect, register_dialect

    register_dialect(
        Dialect(
            "vllm",
            all_reduces=(vllm_all_reduce, shm_all_reduce),
            collectives=_collectives,
            producers={"_C.onednn_mm": "vLLM on CPU: a prepacked oneDNN weight handle"},
            make_group=coordinator_group,
        )
    )


def _collectives() -> dict[Any, tuple[str, int]]:
    """vLLM's own reduce-scatter / all-gather: ``op(x, dim, world_size, group_name)``."""
    from tp_passes.fx import custom_op

    ops = {custom_op("vllm", "reduce_scatter"): ("reduce_scatter", 2),
           custom_op("vllm", "all_gather"): ("all_gather", 2)}
    return {op: how for op, how in ops.items() if op is not None}
