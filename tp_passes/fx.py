"""FX helpers shared by the passes: dialect views, module paths, splicing traced code."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


SIZE_OPS = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default}


def data_users(node: fx.Node) -> list[fx.Node]:
    """Users that read `node`'s values (not only its sizes, as a symbolic trace does)."""
    return [u for u in node.users if not is_call(u, *SIZE_OPS)]


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
    rewrite. `partial` is the per-rank partial sum. `group_name` is torch's ProcessGroup
    name (vLLM's group names and shm handles are resolved to it). `dialect` says which
    form it was found in, for reports.
    """

    result: fx.Node
    partial: fx.Node
    group_name: str
    dialect: str = "c10d_functional"
    # the host's own reduce-scatter / all-gather for this group, emitted by the rewrites
    # instead of torch's functional collectives (vLLM: ops its CUDA graphs capture)
    native: NativeCollectives | None = None


@dataclass(frozen=True)
class NativeCollectives:
    """A host's collectives over dim 0, as ops called ``op(x, dim, world_size, group)``."""

    reduce_scatter: Any  # [n*T, F] -> [T, F], summed
    all_gather: Any  # [T, F] -> [n*T, F]
    group: str  # the host's name of the group (vLLM: "tp:0")


def custom_op(namespace: str, name: str) -> Any:
    """`torch.ops.<namespace>.<name>.default` if that op is registered (vLLM's are only
    when vLLM is imported), else None."""
    ns = getattr(torch.ops, namespace, None)
    return getattr(ns, name).default if ns is not None and hasattr(ns, name) else None


def functionalized_inplace(node: fx.Node, op: Any, arg: str) -> tuple[fx.Node, fx.Node] | None:
    """(input, result) of ``auto_functionalized[_v2](op, ..., arg=x)`` + ``getitem(., 1)``.

    Only the whole-tensor form: v2 with its base used as is (no view kwargs), v1 with the
    tensor passed directly. A single mutated argument is output 1 in both versions.
    """
    from torch._higher_order_ops.auto_functionalize import (
        auto_functionalized,
        auto_functionalized_v2,
    )

    if not (node.op == "call_function" and node.args and node.args[0] is op):
        return None
    if node.target is auto_functionalized_v2:
        bases, index = node.kwargs.get("_all_bases", []), node.kwargs.get(f"_{arg}_base_index")
        if (
            len(bases) != 1
            or index != 0
            or any(k.startswith(f"_{arg}_") and k != f"_{arg}_base_index" for k in node.kwargs)
        ):
            return None
        x = bases[0]
    elif node.target is auto_functionalized:
        x = node.kwargs.get(arg)
    else:
        return None
    outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
    if not isinstance(x, fx.Node) or len(outs) != 1 or len(node.users) != 1:
        return None
    return x, outs[0]


AllReduceRecognizer = Callable[[fx.Node], "AllReduce | None"]


@dataclass(frozen=True)
class Dialect:
    """What an integration teaches the core, so the core never imports it: how its graphs
    spell collectives (vLLM's custom ops) and how its process groups are made."""

    name: str
    all_reduces: tuple[AllReduceRecognizer, ...] = ()
    # its other collectives, for bytes on the wire: op -> (kind, index of the group-size
    # argument); a function, as the ops exist only once the framework is imported
    collectives: Callable[[], Mapping[Any, tuple[str, int]]] = dict
    producers: Mapping[str, str] = field(default_factory=dict)  # op name -> what it is
    # make_group(name, rank lists, this rank's members, backend): this rank's NamedGroup,
    # made by the framework (vLLM's coordinators), or None where it does not own groups
    make_group: Callable[..., Any] | None = None


_DIALECTS: list[Dialect] = []  # added by integrations (tp_passes.vllm.dialect)


def register_dialect(dialect: Dialect) -> None:
    """Teach the core another dialect (all-reduce forms, collectives, producers); a
    dialect of the same name is replaced."""
    _DIALECTS[:] = [d for d in _DIALECTS if d.name != dialect.name] + [dialect]


def dialects() -> tuple[Dialect, ...]:
    return tuple(_DIALECTS)


def as_all_reduce(node: fx.Node) -> AllReduce | None:
    """`node` as a sum all-reduce, else None.

    Core form (plain PyTorch): ``_c10d_functional.all_reduce(x, "sum", g)`` + ``wait_tensor``;
    the in-place ``dist.all_reduce(y)`` functionalizes to ``copy(y, wait(all_reduce(y)))``,
    whose result is the copy. Other forms come from the registered dialects.
    """
    if node.op != "call_function":
        return None
    if node.target is c10d.all_reduce.default:
        partial, op, group = node.args[:3]
        waits = [u for u in node.users if is_call(u, c10d.wait_tensor.default)]
        if op != "sum" or len(waits) != 1 or len(node.users) != 1:
            return None
        result = waits[0]
        copies = [u for u in result.users if is_call(u, aten.copy.default) and u.args[0] is partial]
        if len(copies) == 1 and len(result.users) == 1:
            result = copies[0]
        return AllReduce(result, partial, str(group))
    for dialect in _DIALECTS:
        for recognize in dialect.all_reduces:
            if (found := recognize(node)) is not None:
                return found
    return None


def find_all_reduces(graph: fx.Graph) -> list[AllReduce]:
    return [ar for node in graph.nodes if (ar := as_all_reduce(node)) is not None]


def functionalize_all_reduces(gm: fx.GraphModule) -> int:
    """Rewrite make_fx's in-place sum all-reduces into the functional form in place.

    A module traced with make_fx (no functionalization) keeps ``dist.all_reduce(y)`` as
    ``c10d.allreduce_([y], pg, op, ...)`` whose getitem is read afterwards, and no wait::

        a = c10d.allreduce_([p], pg, SUM, None, False); y = a[0][0]
    becomes
        y = wait_tensor(_c10d_functional.all_reduce(p, "sum", pg.group_name))

    which `as_all_reduce` recognizes and which runs in order. Returns how many it rewrote.
    """
    import torch.distributed as dist

    done = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, torch.ops.c10d.allreduce_.default):
            continue
        tensors, pg_node, op_node = node.args[:3]
        outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        pg, op = (getattr(gm, n.target, None) for n in (pg_node, op_node))
        if len(tensors) != 1 or len(outs) != 1 or op is None or op.op() != 0:  # 0: SUM
            continue
        group = dist.ProcessGroup.unbox(pg).group_name
        with gm.graph.inserting_before(node):
            ar = gm.graph.call_function(c10d.all_reduce.default, (tensors[0], "sum", group))
            ar.meta["val"] = val(tensors[0])
            wait = gm.graph.call_function(c10d.wait_tensor.default, (ar,))
            wait.meta["val"] = val(tensors[0])
        for g in list(outs[0].users):
            g.replace_all_uses_with(wait)
            gm.graph.erase_node(g)
        for u in list(node.users):
            if not u.users:
                gm.graph.erase_node(u)
        if not node.users:
            gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done


def reduced_matmuls(graph: fx.Graph) -> set[fx.Node]:
    """Matmuls whose product is all-reduced: any dialect, and the in-place
    ``c10d.allreduce_`` that a module traced with make_fx (no functionalization) shows."""
    partials = [ar.partial for ar in find_all_reduces(graph)]
    inplace = torch.ops.c10d.allreduce_.default
    partials += [t for n in graph.nodes if is_call(n, inplace) for t in n.args[0]]
    return {m.mm for p in partials if (m := match_matmul(p)) is not None}


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


def describe_producer(node: fx.Node) -> str:
    """What computes `node`, for skip reasons: the op, or the op inside auto_functionalized."""
    node = through_views(node)
    if node.target is operator.getitem:
        node = node.args[0]
    target = (
        node.args[0]
        if node.op == "call_function" and "auto_functionalized" in str(node.target)
        else node.target
    )
    name = str(target).replace(".default", "")
    what = next((d.producers[name] for d in _DIALECTS if name in d.producers), "")
    return f"{name} ({what})" if what else name


# -- module paths ---------------------------------------------------------------------

_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def path_from_source(source_name: str) -> str:
    """`L['self']._modules['layers']._modules['3']._parameters['weight']` -> `layers.3.weight`."""
    root = re.match(r"^(?:L|G)\['([^']*)'\]", source_name)
    rest = source_name[root.end() :] if root else source_name
    parts = []
    for m in _PART.finditer(rest):
        parts.append(next(g for g in m.groups() if g is not None))
        if m.group(2) is not None and len(parts) > 1:
            # a plain attribute below a module (vLLM CPU: `o_proj.cpu_linear.__closure__`):
            # the tensor belongs to the module above it
            break
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
    templates: dict | None = None,
    key: Hashable = None,
) -> fx.Node:
    """Trace ``fn(*tensors)`` on the args' fake values and insert it before `before`.

    `None` args are passed through as None. `decompositions` must be the table the rest
    of the graph was traced with (Inductor rejects ops it decomposes, e.g. `aten.t`).
    Returns the node of fn's result.

    `key`: what besides its arguments' shapes, strides, dtypes and devices `fn`'s trace
    depends on (its function and captured values). With a `templates` dict, the trace of
    an earlier call with the same key and argument metadata is copied instead of tracing
    again: every layer of a model traces the same replacement once.
    """
    node_args = [a for a in args if isinstance(a, fx.Node)]
    sig = (key, tuple(_meta_key(a) for a in args)) if key is not None else None
    traced = templates.get(sig) if templates is not None and sig is not None else None
    if traced is None:
        traced = _trace(fn, args, fake_mode, decompositions)
        if templates is not None and sig is not None:
            templates[sig] = traced
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


def _meta_key(a: Any) -> Hashable:
    if not isinstance(a, fx.Node):
        return a
    v = val(a)
    return (tuple(map(str, v.shape)), tuple(map(str, v.stride())), v.dtype, v.device)


def _trace(fn: Callable[..., torch.Tensor], args: Sequence[Any], fake_mode: Any,
           decompositions: dict | None) -> fx.GraphModule:
    def only_tensors(*ts: torch.Tensor) -> torch.Tensor:
        it = iter(ts)
        return fn(*[next(it) if isinstance(a, fx.Node) else a for a in args])

    from torch._dispatch.python import enable_python_dispatcher

    # symbolic sizes (dynamic token counts) need the python dispatcher, which aot_autograd
    # enables for its own tracing; eager callers (tp_passes.eager) do not have it on
    with fake_mode, enable_python_dispatcher():
        return make_fx(only_tensors, decompositions, tracing_mode="real")(
            *[val(a) for a in args if isinstance(a, fx.Node)]
        )
