"""Sequence parallelism: keep the residual stream token-sharded between TP matmuls.

Before (per rank, one decoder layer boundary)::

    p   = mm(x, t(w_o))                       # partial sum, [T, H]
    y   = wait_tensor(all_reduce(p, "sum", tp))
    h   = add(y, residual)                    # residual stream
    n   = mul(mul(h, rsqrt(mean(pow(h, 2), [-1]) + eps)), w_norm)
    q   = mm(n, t(w_q))

After::

    ps  = wait_tensor(reduce_scatter(pad(p), "sum", tp))   # [T/n, H]
    hs  = add(ps, shard_rows(residual))                    # add + norm on T/n tokens
    ns  = mul(mul(hs, rsqrt(mean(pow(hs, 2), [-1]) + eps)), w_norm)
    n   = view(slice(wait_tensor(all_gather(ns, tp)), 0, 0, T), [T, H])
    q   = mm(n, t(w_q))

How: every rewritten all-reduce becomes a *token-sharded value* (a producer: plain
reduce-scatter, fused mm + reduce-scatter (`SequenceParallel.replace`), or FlashComm2).
`TokenSharding` then walks the graph in order and pushes the sharding through row-wise
ops (elementwise ops, reductions over the last dim, views that keep the last dim); a
replicated operand with the same tokens is sliced to the local rows, one broadcast over
tokens is used as is. The first op that is not row-wise (a matmul, the graph output)
gets the all_gather. The first, middle and last layer forms fall out of this: the
embedding's all-reduce starts the sharded stream, each o_proj/down_proj reduce-scatter
continues it, the final norm ends it.
Padding rows (T not divisible by n) stay confined to their rows and are sliced off.
"""

from __future__ import annotations

import math
import types
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from tp_passes import comm, cost
from tp_passes.fx import VIEW_OPS, Matmul, NativeCollectives, c10d, is_call, splice, val
from tp_passes.lowering import mm_reduce_scatter_impl
from tp_passes.patterns.base import (
    GraphContext,
    Match,
    Rewrite,
    Site,
    SiteMatch,
    resolve_group,
)
from tp_passes.report import Entry

aten = torch.ops.aten
prims = torch.ops.prims

UNARY = {
    aten.neg.default,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.exp.default,
    aten.log.default,
    aten.abs.default,
    aten.reciprocal.default,
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.clone.default,
    aten.alias.default,
    aten._to_copy.default,
    prims.convert_element_type.default,
    aten.pow.Tensor_Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.mul.Scalar,
    aten.div.Scalar,
}
BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
LAST_DIM_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}


@dataclass
class Sharded:
    """A value held token-sharded: `twin` is [Tl, F], the original is `shape` ([..., F])."""

    twin: fx.Node
    group: str
    n: int
    j: int
    rows: Any  # T: int or SymInt node
    shape: list[Any]  # full shape: ints / SymInt nodes (view args)
    native: NativeCollectives | None = None  # the host's all-gather, if it has its own


def _same(a: Any, b: Any) -> bool:
    """Sizes known equal without adding a guard (symbolic sizes compare by expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


class TokenSharding:
    """The token-sharded values of one graph: producers add them, `run` propagates."""

    def __init__(self, cx: GraphContext) -> None:
        self.gm, self.graph, self.fake_mode = cx.gm, cx.graph, cx.fake_mode
        self.decompositions = cx.decompositions
        self.sharded: dict[fx.Node, Sharded] = {}
        self._full: dict[fx.Node, fx.Node] = {}
        self._gathered: dict[fx.Node, fx.Node] = {}
        self.templates: dict = {}  # traced replacements by key and argument metadata

    @classmethod
    def of(cls, cx: GraphContext) -> TokenSharding:
        """The graph's one TokenSharding, shared by every producer."""
        if "token_sharding" not in cx.shared:
            cx.shared["token_sharding"] = cls(cx)
        return cx.shared["token_sharding"]

    # -- emission ---------------------------------------------------------------------
    def emit(
        self, target: Any, args: tuple, kwargs: dict | None = None, like: Any = None
    ) -> fx.Node:
        """A call of `target`; its fake value computed, or (`like`: (shape, dtype, device)
        of a contiguous result the caller knows) made directly, which is much cheaper. Only
        for static shapes: a symbolic size made so misses the guards dispatch would add
        (Inductor then lowers size arithmetic a guard had fixed, e.g. at T = n)."""
        node = self.graph.call_function(target, args, kwargs or {})
        with self.fake_mode:
            if like is not None and all(isinstance(d, int) for d in like[0]):
                shape, dtype, device = like
                node.meta["val"] = torch.empty(shape, dtype=dtype, device=device)
            else:
                node.meta["val"] = target(*fx.map_arg(args, val), **fx.map_arg(kwargs or {}, val))
        return node

    def rows_of(self, node: fx.Node) -> Any:
        """prod(shape[:-1]) of `node`, as an int or a SymInt node."""
        sizes = [self.size(node, d) for d in range(val(node).dim() - 1)]
        if all(isinstance(s, int) for s in sizes):
            return math.prod(sizes)
        out = sizes[0]
        for s in sizes[1:]:
            out = self.emit(operator.mul, (out, s))
        return out

    def size(self, node: fx.Node, dim: int) -> Any:
        s = val(node).shape[dim]
        return s if isinstance(s, int) else self.emit(aten.sym_size.int, (node, dim))

    def shape_of(self, node: fx.Node) -> list[Any]:
        return [self.size(node, d) for d in range(val(node).dim())]

    def splice(self, fn: Any, args: list, before: fx.Node, key: Any = None) -> fx.Node:
        """`fx.splice`, reusing this graph's traces by `key` (see there)."""
        return splice(
            self.graph, fn, args, before, self.fake_mode, self.decompositions, self.templates, key
        )

    def output_shape(self, site: Site, mm: Matmul, rows: Any) -> list[Any]:
        """The full shape of the site's reduced value, given the matmul's rows."""
        partial = site.ar.partial
        if partial is not mm.mm:
            return list(partial.args[1])  # the view back to [B, S, H]
        return [rows, val(partial).shape[-1]]

    # -- producers register here ------------------------------------------------------
    def add(self, original: fx.Node, value: Sharded) -> None:
        self.sharded[original] = value

    def full(self, node: fx.Node) -> fx.Node:
        """The replicated value of a sharded node: all_gather, unpad, reshape (once)."""
        if node not in self._full:
            s = self.sharded[node]
            if s.twin not in self._gathered:  # views of one value share one all_gather
                t = val(s.twin)
                like = ((s.n * t.shape[0], *t.shape[1:]), t.dtype, t.device)  # a new tensor
                with self.graph.inserting_after(s.twin):
                    if s.native is not None:  # the host's op, no separate wait
                        g = w = self.emit(
                            s.native.all_gather, (s.twin, 0, s.n, s.native.group), like=like
                        )
                    else:
                        g = self.emit(
                            c10d.all_gather_into_tensor.default, (s.twin, s.n, s.group), like=like
                        )
                if s.native is None:
                    with self.graph.inserting_after(g):
                        w = self.emit(c10d.wait_tensor.default, (g,), like=like)
                gathered = like[0][0]
                # no padding to cut (static sizes only: comparing a SymInt adds a guard)
                if isinstance(s.rows, int) and isinstance(gathered, int) and gathered == s.rows:
                    self._gathered[s.twin] = w
                else:
                    with self.graph.inserting_after(w):
                        self._gathered[s.twin] = self.emit(aten.slice.Tensor, (w, 0, 0, s.rows))
            with self.graph.inserting_before(node):
                self._full[node] = self.emit(aten.view.default, (self._gathered[s.twin], s.shape))
        return self._full[node]

    # -- propagation ----------------------------------------------------------------------
    def run(self, propagate: bool) -> int:
        """Push sharding through row-wise ops (if `propagate`), gather where it must stop.

        Returns the number of ops that now run on T/n tokens.
        """
        sharded_ops = 0
        for node in list(self.graph.nodes):
            ins = [a for a in node.all_input_nodes if a in self.sharded]
            if not ins:
                continue
            new = self._row_wise(node) if propagate and node.op == "call_function" else None
            if new is not None:
                self.sharded[node] = new
                sharded_ops += 1
                continue
            for a in ins:
                node.replace_input_with(a, self.full(a))
        self._remove_dead()
        return sharded_ops

    def _remove_dead(self) -> None:
        # functional collectives and their waits are pure: drop the replaced ones
        changed = True
        while changed:
            changed = False
            for node in reversed(list(self.graph.nodes)):
                if (
                    node.op == "call_function"
                    and not node.users
                    and (not node.is_impure() or is_call(node, c10d.wait_tensor.default))
                ):
                    self.graph.erase_node(node)
                    changed = True

    def _operand(self, arg: Any, ref: Sharded, ref_node: fx.Node, before: fx.Node) -> Any:
        """Local form of an operand next to the sharded `ref`, or raise _NotRowWise."""
        if not isinstance(arg, fx.Node):
            return arg
        if arg in self.sharded:
            s = self.sharded[arg]
            if s.group != ref.group:
                raise _NotRowWise
            return s.twin
        v = val(arg)
        if not isinstance(v, torch.Tensor):
            raise _NotRowWise
        if v.dim() <= 1 or all(_same(d, 1) for d in v.shape[:-1]):
            if v.dim() <= 1:
                return arg  # broadcast over tokens
            with self.graph.inserting_before(before):
                return self.emit(aten.view.default, (arg, [v.shape[-1]]))
        tokens = val(ref_node).shape[:-1]
        if v.dim() == len(tokens) + 1 and all(_same(a, b) for a, b in zip(v.shape[:-1], tokens)):
            return self.splice(
                lambda t: comm.shard_rows(t, ref.n, ref.j), [arg], before, ("shard", ref.n, ref.j)
            )
        raise _NotRowWise

    def _row_wise(self, node: fx.Node) -> Sharded | None:
        ref_node = next(a for a in node.all_input_nodes if a in self.sharded)
        ref = self.sharded[ref_node]
        out = val(node)
        if not isinstance(out, torch.Tensor) or out.dim() < 1:
            return None
        feat = out.shape[-1]
        if not isinstance(feat, int):
            return None
        t = node.target
        try:
            if t in VIEW_OPS:
                src = node.args[0]
                if src not in self.sharded or val(src).shape[-1] != feat or out.dim() < 2:
                    return None
                shape = list(node.args[1])
                if any(isinstance(s, int) and s == -1 for s in shape[:-1]):
                    if out.dim() != 2:
                        return None
                    shape = [ref.rows, feat]  # [-1, F]: all the tokens, a size known before here
                return Sharded(
                    self.sharded[src].twin, ref.group, ref.n, ref.j, ref.rows, shape, ref.native
                )
            if t in UNARY or t in BINARY:
                if not all(_same(a, b) for a, b in zip(out.shape[:-1], val(ref_node).shape[:-1])):
                    return None
                args = tuple(self._operand(a, ref, ref_node, node) for a in node.args)
            elif t in LAST_DIM_REDUCE:
                x, dims = node.args[0], node.args[1]
                keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
                nd = val(x).dim()
                if x not in self.sharded or not keep or [d % nd for d in dims] != [nd - 1]:
                    return None
                args = (self.sharded[x].twin, [-1], True, *node.args[3:])
            else:
                return None
        except _NotRowWise:
            return None
        rows = val(ref.twin).shape[0] if val(ref.twin).dim() == 2 else None
        # a row-wise op on [r, F_in] twins gives a contiguous [r, feat] of the original's dtype
        like = None if rows is None else ((rows, feat), out.dtype, out.device)
        with self.graph.inserting_before(node):
            twin = self.emit(t, args, dict(node.kwargs), like)
        shape = list(ref.shape[:-1]) + [feat]
        return Sharded(twin, ref.group, ref.n, ref.j, ref.rows, shape, ref.native)


class _NotRowWise(Exception):
    pass


# -- what the cost model needs to know about a site -----------------------------------------


def _rows_equal(node: fx.Node, rows: Any) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and _same(math.prod(v.shape[:-1]), rows)


def _bytes_per_row(node: fx.Node) -> int:
    v = val(node)
    return int(v.shape[-1]) * v.element_size() if isinstance(v.shape[-1], int) else 0


def rowwise_bytes_per_token(site: Site, other_results: set[fx.Node]) -> int:
    """Memory traffic per token of the row-wise ops after the reduce (what sequence
    parallelism runs on T/n tokens), as a fusing compiler moves it: token-sized values read
    from outside the region plus values written to users outside it. The region stops
    where another site's reduced value comes in (that site's region)."""
    start = site.ar.result
    rows = math.prod(val(start).shape[:-1])
    region, order = {start}, [start]
    for node in order:
        for user in node.users:
            if user in region or any(a in other_results for a in user.all_input_nodes):
                continue
            t = user.target
            if t in UNARY or t in BINARY or t in LAST_DIM_REDUCE or t in VIEW_OPS:
                if _rows_equal(user, rows):
                    region.add(user)
                    order.append(user)
    traffic = _bytes_per_row(start)  # the reduced value, read once
    for node in order[1:]:
        if node.target in VIEW_OPS:
            continue
        for a in node.all_input_nodes:
            if a not in region and _rows_equal(a, rows):
                traffic += _bytes_per_row(a)
        if any(u not in region for u in node.users):
            traffic += _bytes_per_row(node)
    return traffic


def backend_of(group_name: str, device_type: str) -> str:
    """torch's backend of a group on a device: "gloo", "nccl", "hccl", "fake", ..."""
    import torch.distributed as dist

    name = str(dist.get_backend(resolve_group(group_name)))
    for part in name.split(","):  # "cpu:gloo,cuda:nccl"
        dev, _, backend = part.rpartition(":")
        if not dev or dev == device_type:
            return backend
    return name


def site_shape(site: Site, cx: GraphContext) -> cost.SiteShape:
    v = val(site.ar.partial)
    mm = site.matmul
    flops = 2 * int(val(mm.x).shape[-1]) * int(v.shape[-1]) if mm is not None else 0
    others = {s.ar.result for s in cx.sites if s is not site}
    return cost.SiteShape(
        site.n, int(v.shape[-1]), v.element_size(), rowwise_bytes_per_token(site, others), flops
    )


def site_links(site: Site) -> tuple[cost.Link, cost.Link] | str:
    """(link of the original all-reduce, link of the rewritten collectives), or why the
    cost model has no figures for them."""
    device = val(site.ar.partial).device.type
    backend = backend_of(site.ar.group_name, device)
    keep = cost.transport(site.ar.dialect, backend)
    for name in (keep, backend):
        if name not in cost.LINKS:
            return f"no cost figures for transport {name!r}"
    return cost.LINKS[keep], cost.LINKS[backend]


def choose(site: Site, cx: GraphContext, setting: Any) -> cost.Choice:
    """The cost model's choice at `site` (see `tp_passes.cost`)."""
    links = site_links(site)
    if isinstance(links, str):
        chosen = "sequence_parallel" if setting is True else "all_reduce"
        why = f"sequence_parallel={setting}" if setting != "auto" else links + "; auto keeps it"
        return cost.Choice(chosen, {}, "", {}, why=why)
    return cost.choose_sequence_parallel(site_shape(site, cx), site.token_range(), *links, setting)


class SequenceParallel(Rewrite):
    """Every all-reduce no earlier rewrite took becomes reduce_scatter (fused with its
    matmul where the device has a kernel), and `finish` keeps the residual stream
    token-sharded (with sequence_parallel on) or gathers right away."""

    name = "sequence_parallel"
    stage = "reduce_scatter"

    def wanted(self, config: Any) -> str:
        forced = config.sequence_parallel is True or config.fuse_mm_reduce_scatter is True
        return "a sum all-reduce over a tensor-parallel group" if forced else ""

    def find(self, cx: GraphContext) -> list[Match]:
        return [SiteMatch(s.module, s.n, site=s) for s in cx.sites]

    def decide(self, m: SiteMatch, facts: list[tuple[bool, bool]], cx: GraphContext) -> None:
        cfg, site = cx.config, m.site
        m.any_bias = any(has for has, _ in facts)
        if site.ar.result in cx.taken:  # an earlier rewrite (FlashComm2) produces it
            return
        mm = cx.matmul(site)

        def entry(rewrite: str, ok: bool, why: str = "", **details: Any) -> None:
            details["dialect"] = site.ar.dialect
            m.entries.append(Entry(rewrite, m.module, ok, why, m.size, details))

        if site.n == 1 or site.reason:
            entry(self.name, False, site.reason or "all-reduce over a group of size 1")
            return
        choice = self.choices(cx)[site.ar.result]
        sp_on = choice.chosen == "sequence_parallel"
        fuse_on = cfg.fuse_mm_reduce_scatter is True or (
            cfg.fuse_mm_reduce_scatter == "auto" and sp_on
        )
        if sp_on or (fuse_on and mm is not None):
            m.apply, m.fuse = True, fuse_on and mm is not None
            cx.taken.add(site.ar.result)
        entry(self.name, sp_on, "" if sp_on else choice.why, cost=choice.to_json())
        if m.apply and mm is not None:
            entry("mm_reduce_scatter", fuse_on, "" if fuse_on else "fuse_mm_reduce_scatter=False")

    def choices(self, cx: GraphContext) -> dict[fx.Node, cost.Choice]:
        """The cost model's choice at every site this rewrite may take, made once per graph.

        The residual stream connects the sites: a token-sharded stream reaching a site that
        kept its all-reduce must be gathered there (an extra collective). So "auto" makes
        one choice for the graph: where the per-site predictions disagree, the alternative
        with the smaller predicted total is taken everywhere."""
        if "sp_choices" in cx.shared:
            return cx.shared["sp_choices"]
        setting = cx.config.sequence_parallel
        sites = [s for s in cx.sites if s.n > 1 and not s.reason and s.ar.result not in cx.taken]
        out = {s.ar.result: choose(s, cx, setting) for s in sites}
        picked = {c.chosen for c in out.values()}
        if setting == "auto" and len(picked) > 1:
            totals = {
                alt: sum(c.predicted_us.get(alt, math.inf) for c in out.values())
                for alt in ("all_reduce", "sequence_parallel")
            }
            best = min(totals, key=totals.get)
            for c in out.values():
                if c.chosen != best:
                    c.chosen = best
                    c.why = (
                        f"auto: one choice for the graph's residual stream, {best} "
                        f"(predicted totals: {cost._fmt(totals)}); this site alone: {c.why}"
                    )
        cx.shared["sp_choices"] = out
        return out

    def replace(self, m: SiteMatch, cx: GraphContext) -> None:
        site, mm = m.site, cx.matmul(m.site)
        g, n, native = site.ar.group_name, site.n, site.ar.native
        sharding = TokenSharding.of(cx)
        before = site.ar.result
        with cx.graph.inserting_before(before):
            if mm is not None:
                rows = sharding.size(mm.x, 0)
                shape = sharding.output_shape(site, mm, rows)
                if m.fuse and not m.any_bias and native is None:
                    fn, how = mm_reduce_scatter_impl(val(mm.x).device.type, n, g)
                    twin = sharding.splice(
                        lambda x, w: fn(x, w, g, n), [mm.x, mm.weight], before, (fn, g, n)
                    )
                else:
                    how = (
                        "decomposed mm + reduce_scatter (bias before the reduce)"
                        if m.any_bias
                        else f"unfused: the host's own reduce_scatter ({site.ar.dialect})"
                        if native is not None
                        else "unfused"
                    )
                    twin = sharding.splice(
                        lambda x: comm.reduce_scatter_rows(x, g, n, native), [mm.mm], before,
                        ("reduce_scatter", g, n, native),
                    )
                for e in m.entries:
                    if e.rewrite == "mm_reduce_scatter":
                        e.details["lowering"] = how
            else:
                partial = site.ar.partial
                rows = sharding.rows_of(partial)
                shape = sharding.shape_of(partial)
                twin = sharding.splice(
                    lambda t: comm.reduce_scatter_rows(t.reshape(-1, t.shape[-1]), g, n, native),
                    [partial],
                    before,
                    ("reduce_scatter_rows", g, n, native),
                )
        sharding.add(before, Sharded(twin, g, n, site.j, rows, shape, native))

    def finish(self, cx: GraphContext, matches: list[SiteMatch]) -> str | None:
        chosen = [c.chosen for c in self.choices(cx).values()]
        sp = "sequence_parallel" in chosen or (
            not chosen and cx.config.sequence_parallel is not False
        )
        n_sharded = TokenSharding.of(cx).run(propagate=sp)
        for e in (e for m in matches for e in m.entries):
            if e.rewrite == self.name and e.applied:
                e.details["ops_on_sharded_tokens_in_graph"] = n_sharded
        return "sequence_parallel"

    # -- eager twin ---------------------------------------------------------------------
    def parallelize(
        self, name: str, module: Any, rp: Any, cx: GraphContext, device_type: str
    ) -> Entry | None:
        """reduce_scatter + all_gather inside a layer that owns its all-reduce. Without a
        compiler the residual stream cannot stay token-sharded, so this moves the same
        bytes as the all-reduce: it exists so the eager path matches the graph path."""
        cfg = cx.config
        fuse = cfg.fuse_mm_reduce_scatter is not False
        if not (cfg.sequence_parallel is True or cfg.fuse_mm_reduce_scatter is True):
            if cfg.sequence_parallel is False:
                return None
            return Entry(
                self.name,
                name,
                False,
                "auto: eagerly, reduce_scatter + all_gather moves the all-reduce's bytes in two "
                "collectives and no token-sharded compute follows; kept the all-reduce",
                dist.get_world_size(rp.group),
                {"cost": {"chosen": "all_reduce"}},
            )
        g, n = rp.group.group_name, dist.get_world_size(rp.group)
        bias = rp.bias if dist.get_rank(rp.group) == 0 else None
        fused, _ = mm_reduce_scatter_impl(device_type, n, g)

        def forward(self: Any, x: torch.Tensor) -> Any:
            if rp.partial is not None:  # the layer's own matmul (or lookup): [..., F]
                p = rp.partial(x)
                p2 = p.reshape(-1, p.shape[-1])
                ys = comm.reduce_scatter_rows(p2, g, n)
                return rp.wrap(comm.gather_rows(ys, g, n, p2.shape[0]).view(p.shape))
            x2 = x.reshape(-1, x.shape[-1])
            ys = (
                comm.mm_reduce_scatter(x2, rp.weight, bias, g, n)
                if bias is not None
                else fused(x2, rp.weight, g, n)
            )
            return rp.wrap(comm.gather_rows(ys, g, n, x2.shape[0]).view(*x.shape[:-1], -1))

        module.forward = types.MethodType(forward, module)
        rewrite = "mm_reduce_scatter" if fuse and rp.weight is not None else self.name
        return Entry(
            rewrite,
            name,
            True,
            "eager: reduce_scatter + all_gather inside the layer (same bytes as the all-reduce)",
            n,
        )
