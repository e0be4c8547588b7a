"""Bytes on the wire per rank, counted from a graph's collectives.

Ring algorithms' per-rank traffic for a group of n and a tensor of S bytes:
all-reduce 2(n-1)/n*S, reduce-scatter (n-1)/n*S_in, all-gather (n-1)/n*S_out,
all-to-all (n-1)/n*S. These are also the analytic minimums the benchmarks compare to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx

from tp_passes.fx import as_all_reduce, c10d, custom_op, val


def _hint(s: Any) -> int:
    """A size as an int: symbolic sizes by the value they were traced with."""
    if isinstance(s, int):
        return s
    return int(s.node.hint) if s.node.hint is not None else int(s.node.shape_env.size_hint(s.node.expr))


def _nbytes(t: Any) -> int:
    numel = 1
    for s in t.shape:
        numel *= _hint(s)
    return numel * t.element_size()


def collective_bytes(nodes: fx.GraphModule | Iterable[fx.Node]) -> list[dict[str, Any]]:
    """One row per collective node (of a graph, or of some nodes): op, group size n, bytes
    sent per rank."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    rows = []
    for node in nodes.graph.nodes if isinstance(nodes, fx.GraphModule) else nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if t == c10d.all_reduce.default or (ar := as_all_reduce(node)) is not None:
            # any all-reduce op (functional, vLLM custom op, CPU shm): (tensor, group)
            tensor, group = (node.args[0], node.args[2]) if t == c10d.all_reduce.default else (ar.partial, ar.group_name)
            n, s = _resolve_process_group(group).size(), _nbytes(val(tensor))
            rows.append({"op": "all_reduce", "n": n, "bytes": 2 * (n - 1) * s // n})
        elif t == c10d.reduce_scatter_tensor.default:
            n = node.args[2]
            rows.append({"op": "reduce_scatter", "n": n, "bytes": (n - 1) * _nbytes(val(node.args[0])) // n})
        elif t == c10d.all_gather_into_tensor.default:
            n = node.args[1]
            rows.append({"op": "all_gather", "n": n, "bytes": (n - 1) * _nbytes(val(node.args[0]))})
        elif t == c10d.all_to_all_single.default:
            n = _resolve_process_group(node.args[3]).size()
            rows.append({"op": "all_to_all", "n": n, "bytes": (n - 1) * _nbytes(val(node.args[0])) // n})
        elif t is not None and t is custom_op("vllm", "reduce_scatter"):  # (x, dim, world_size, group_name)
            n = node.args[2]
            rows.append({"op": "reduce_scatter", "n": n, "bytes": (n - 1) * _nbytes(val(node.args[0])) // n})
        elif t is not None and t is custom_op("vllm", "all_gather"):
            n = node.args[2]
            rows.append({"op": "all_gather", "n": n, "bytes": (n - 1) * _nbytes(val(node.args[0]))})
    return rows


def total(rows: list[dict[str, Any]]) -> int:
    return sum(r["bytes"] for r in rows)
