"""Bytes on the wire per rank, counted from a graph's collectives.

Ring algorithms' per-rank traffic for a group of n and a tensor of S bytes:
all-reduce 2(n-1)/n*S, reduce-scatter (n-1)/n*S_in, all-gather (n-1)/n*S_out,
all-to-all (n-1)/n*S. These are also the analytic minimums the benchmarks compare to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx

from tp_passes.fx import as_all_reduce, c10d, dialects, val


def _hint(s: Any) -> int:
    """A size as an int: symbolic sizes by the value they were traced with."""
    if isinstance(s, int):
        return s
    return (
        int(s.node.hint)
        if s.node.hint is not None
        else int(s.node.shape_env.size_hint(s.node.expr))
    )


def _nbytes(t: Any) -> int:
    numel = 1
    for s in t.shape:
        numel *= _hint(s)
    return numel * t.element_size()


def _classify(node: fx.Node) -> tuple[str, dict[str, Any] | None] | None:
    """(name, row) of a collective node, else None. `name` is the op (every all-reduce
    dialect is ``all_reduce``); `row` is its ring algorithm, group size and bytes sent per
    rank, None for a functional collective this table does not model."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    if node.op != "call_function":
        return None
    t, name = node.target, str(node.target)
    if t == c10d.all_reduce.default or (ar := as_all_reduce(node)) is not None:
        # any all-reduce op (functional, vLLM custom op, CPU shm): (tensor, group)
        tensor, group = (
            (node.args[0], node.args[2])
            if t == c10d.all_reduce.default
            else (ar.partial, ar.group_name)
        )
        n, s = _resolve_process_group(group).size(), _nbytes(val(tensor))
        return "all_reduce", {"op": "all_reduce", "n": n, "bytes": 2 * (n - 1) * s // n}
    native = {
        c10d.reduce_scatter_tensor.default: ("reduce_scatter", 2),
        c10d.all_gather_into_tensor.default: ("all_gather", 1),
    }
    for dialect in dialects():  # a host's own, e.g. vllm.reduce_scatter(x, dim, n, group)
        native.update(dialect.collectives())
    if t in native:
        kind, n_at = native[t]
        n, s = node.args[n_at], _nbytes(val(node.args[0]))
        row = {"op": kind, "n": n, "bytes": (n - 1) * s // n if kind == "reduce_scatter" else (n - 1) * s}
        return name.split(".")[1], row
    if t == c10d.all_to_all_single.default:
        n = _resolve_process_group(node.args[3]).size()
        row = {"op": "all_to_all", "n": n, "bytes": (n - 1) * _nbytes(val(node.args[0])) // n}
        return "all_to_all_single", row
    if t in (c10d.broadcast_.default, c10d.broadcast.default):
        # pipelined ring broadcast: every rank but the last forwards the S bytes
        n = _resolve_process_group(node.args[2]).size()
        row = {"op": "broadcast", "n": n, "bytes": (n - 1) * _nbytes(val(node.args[0])) // n}
        return name.split(".")[1], row
    if name.startswith("_c10d_functional.") and "wait" not in name:
        return name.split(".")[1], None
    return None


def _nodes(nodes: fx.GraphModule | Iterable[fx.Node]) -> Iterable[fx.Node]:
    return nodes.graph.nodes if isinstance(nodes, fx.GraphModule) else nodes


def collective_bytes(nodes: fx.GraphModule | Iterable[fx.Node]) -> list[dict[str, Any]]:
    """One row per collective node (of a graph, or of some nodes): op, group size n, bytes
    sent per rank."""
    return [c[1] for node in _nodes(nodes) if (c := _classify(node)) is not None and c[1]]


def collective_counts(nodes: fx.GraphModule | Iterable[fx.Node]) -> dict[str, int]:
    """Collectives by op name (``reduce_scatter_tensor``, ``all_reduce``, ...)."""
    counts: dict[str, int] = {}
    for node in _nodes(nodes):
        if (c := _classify(node)) is not None:
            counts[c[0]] = counts.get(c[0], 0) + 1
    return counts


def total(rows: list[dict[str, Any]]) -> int:
    return sum(r["bytes"] for r in rows)
