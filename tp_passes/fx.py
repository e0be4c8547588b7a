"""FX helpers shared by the passes: dialect views, module paths, splicing traced code."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
TRANSPOSE_OPS = {aten.t.default, aten.permute.default, aten.transpose.int}


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def through_views(node: fx.Node) -> fx.Node:
    while is_call(node, *VIEW_OPS):
        node = node.args[0]
    return node


def untransposed(node: fx.Node) -> fx.Node | None:
    """X for a node computing X.T (t, permute [1, 0], transpose(0, 1)), else None."""
    if is_call(node, aten.t.default):
        return node.args[0]
    if is_call(node, aten.permute.default) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    if is_call(node, aten.transpose.int) and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
        return node.args[0]
    return None


# -- dialect: all-reduce sites ---------------------------------------------------------


@dataclass
class AllReduce:
    """One sum all-reduce, whatever dialect wrote it.

    `result` is the node whose value is the reduced tensor; its users are rewired by a
    rewrite. `partial` is the per-rank partial sum.
    """

    result: fx.Node
    partial: fx.Node
    group_name: str


def find_all_reduces(graph: fx.Graph) -> list[AllReduce]:
    """Plain-PyTorch dialect: `_c10d_functional.all_reduce(x, "sum", g)` + `wait_tensor`."""
    sites = []
    for node in graph.nodes:
        if not is_call(node, c10d.all_reduce.default):
            continue
        partial, op, group = node.args[:3]
        waits = [u for u in node.users if is_call(u, c10d.wait_tensor.default)]
        if op != "sum" or len(waits) != 1 or len(node.users) != 1:
            continue
        sites.append(AllReduce(waits[0], partial, str(group)))
    return sites


@dataclass
class Matmul:
    """`x @ w.T (+ bias)` feeding an all-reduce, normalized from mm/addmm/views."""

    mm: fx.Node
    x: fx.Node  # 2-D [T, A_local]
    weight: fx.Node  # [H, A_local]
    bias: fx.Node | None


def match_matmul(node: fx.Node) -> Matmul | None:
    core = through_views(node)
    if is_call(core, aten.mm.default):
        x, wt = core.args
        bias = None
    elif is_call(core, aten.addmm.default) and not core.kwargs:
        bias, x, wt = core.args
    else:
        return None
    w = untransposed(wt)
    if w is None or val(x) is None or val(x).dim() != 2:
        return None
    return Matmul(core, x, w, bias)


# -- module paths ---------------------------------------------------------------------

_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def path_from_source(source_name: str) -> str:
    """`L['self']._modules['layers']._modules['3']._parameters['weight']` -> `layers.3.weight`."""
    root = re.match(r"^(?:L|G)\['([^']*)'\]", source_name)
    rest = source_name[root.end():] if root else source_name
    parts = [next(g for g in m.groups() if g is not None) for m in _PART.finditer(rest)]
    if root and root.group(1) != "self" and not parts:
        return root.group(1)  # a plain input such as L['ids']
    return ".".join(parts)


def module_of(param_path: str) -> str:
    return param_path.rsplit(".", 1)[0] if "." in param_path else ""


def placeholder_of(node: fx.Node, max_depth: int = 6) -> fx.Node | None:
    """The nearest placeholder above `node` through single-input ops (weights, tables)."""
    frontier = [node]
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            if n.op == "placeholder":
                return n
            nxt.extend(a for a in n.all_input_nodes)
        frontier = nxt
    return None


# -- splicing ----------------------------------------------------------------------------


def splice(
    graph: fx.Graph,
    fn: Callable[..., torch.Tensor],
    args: Sequence[fx.Node | None],
    before: fx.Node,
    fake_mode: Any,
    decompositions: dict | None = None,
) -> fx.Node:
    """Trace ``fn(*tensors)`` on the args' fake values and insert it before `before`.

    `None` args are passed through as None. `decompositions` must be the table the rest
    of the graph was traced with (Inductor rejects ops it decomposes, e.g. `aten.t`).
    Returns the node of fn's result.
    """
    fake_args = [val(a) if isinstance(a, fx.Node) else a for a in args]
    node_args = [a for a in args if isinstance(a, fx.Node)]

    def only_tensors(*ts: torch.Tensor) -> torch.Tensor:
        it = iter(ts)
        return fn(*[next(it) if isinstance(a, fx.Node) else a for a in args])

    with fake_mode:
        traced = make_fx(only_tensors, decompositions, tracing_mode="real")(
            *[v for a, v in zip(args, fake_args) if isinstance(a, fx.Node)]
        )
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, node_args))
    out = None
    with graph.inserting_before(before):
        for n in traced.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                out = fx.map_arg(n.args[0], lambda a: env[a])
                break
            env[n] = graph.node_copy(n, lambda a: env[a])
    assert isinstance(out, fx.Node)
    out.meta["tp_passes_inserted"] = list(env.values())  # for per-rewrite byte counts
    return out


def sym_or_int(graph: fx.Graph, node: fx.Node, dim: int) -> Any:
    """Size `dim` of `node` as an int, or a `sym_size` node when it is symbolic."""
    size = val(node).shape[dim]
    if isinstance(size, int):
        return size
    return graph.call_function(aten.sym_size.int, (node, dim))


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Op name -> count, for structure assertions and reports."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if hasattr(node.target, "_schema"):
                name = str(node.target).replace(".default", "")
            if node.target is operator.getitem:
                continue
            counts[name] = counts.get(name, 0) + 1
    return counts
