"""What every rewrite family implements, and the facts about one graph they share.

A rewrite is an object with five steps, called by the driver (`tp_passes.backend`) in
registry order (`tp_passes.patterns.REWRITES`); the order is the priority:

1. ``find(cx)``: the matches in the graph, from this rank's graph alone (no collective).
2. ``decide(match, facts, cx)``: after the one cross-rank exchange; `facts` holds every
   rank's ``match.local()``. Sets ``match.apply`` or ``match.reason``, adds report
   entries, claims the nodes it will replace (`cx.taken`), so later rewrites leave them.
3. ``plan_weights(match, cx)``: groups and derived weights of an applied match (runs
   collectives: every rank calls it for the same matches in the same order).
4. ``replace(match, cx)``: the graph replacement, traced from `tp_passes.comm`.
5. ``finish(cx, matches)``: once, after every replacement (sequence parallelism propagates the
   token sharding there); returns a dump stage name if it changed the graph.

Each family also owns its eager twin (see the family's module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from tp_passes import cost, weights
from tp_passes.config import TPConfig
from tp_passes.fx import (
    AllReduce,
    Matmul,
    find_all_reduces,
    match_matmul,
    module_of,
    placeholder_of,
    val,
)
from tp_passes.groups.layout import RankLayout
from tp_passes.report import Entry


@dataclass
class Site:
    """One sum all-reduce and what feeds it, normalized from any dialect."""

    ar: AllReduce
    matmul: Matmul | None
    module: str
    weight_index: int | None  # graph input index of the matmul weight
    n: int
    j: int
    ranks: tuple[int, ...]  # the group's global ranks
    reason: str = ""  # why no rewrite can take this all-reduce ("" if one may)

    def invariant(self) -> tuple:
        """What must be equal on every rank (bias placement may differ); it includes the
        cost model's inputs (token range, dtype), so every rank makes the same choice."""
        w = val(self.matmul.weight).shape if self.matmul else None
        partial = val(self.ar.partial)
        return (
            self.module,
            self.n,
            str(w),
            self.matmul is not None,
            self.reason,
            self.token_range(),
            str(partial.dtype),
        )

    def token_range(self) -> tuple[int, int]:
        """(lo, hi) of the token count: equal for a static graph; a dynamic one's range from
        the shape environment (hi = cost.MAX_TOKENS when unbounded)."""
        from torch.utils._sympy.numbers import int_oo

        rows = math.prod(val(self.ar.partial).shape[:-1])
        if isinstance(rows, int):
            return rows, rows
        r = rows.node.shape_env.bound_sympy(rows.node.expr)
        lo = 1 if r.lower in (-int_oo, int_oo) else int(r.lower)
        hi = cost.MAX_TOKENS if r.upper in (-int_oo, int_oo) else int(r.upper)
        return max(lo, 1), min(hi, cost.MAX_TOKENS)

    @property
    def has_bias(self) -> bool:
        return self.matmul is not None and self.matmul.bias is not None


def resolve_group(name: str) -> Any:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def find_sites(gm: fx.GraphModule, input_names: list[str]) -> list[Site]:
    """Every sum all-reduce of `gm`, with its matmul and module."""
    index = {p: i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))}
    out = []
    for ar in find_all_reduces(gm.graph):
        mm = match_matmul(ar.partial)
        src = mm.weight if mm else placeholder_of(ar.partial)
        widx = index.get(src) if src is not None else None
        module = module_of(input_names[widx]) if widx is not None else ""
        pg = resolve_group(ar.group_name)
        ranks = tuple(sorted(dist.get_process_group_ranks(pg)))
        site = Site(ar, mm, module, widx if mm else None, pg.size(), pg.rank(), ranks)
        if val(ar.partial).dim() < 2:  # a global statistic, not a [tokens, features] value
            site.reason = f"{val(ar.partial).dim()}-dim all-reduce has no token dimension"
        out.append(site)
    return out


@dataclass
class GraphContext:
    """One graph as the rewrites see it, and what they leave for the driver."""

    gm: fx.GraphModule
    config: TPConfig
    inputs: list[Any]  # real tensors of the graph inputs where known (weights are)
    input_names: list[str]  # module path of each graph input ("layers.0.o_proj.weight")
    fake_mode: Any
    decompositions: dict | None = None
    sites: list[Site] = field(default_factory=list)
    layout: RankLayout | None = None  # the rank layout the plan runs on (None: `layout_reason`)
    layout_reason: str = ""
    taken: set[fx.Node] = field(default_factory=set)  # nodes a rewrite replaces (first wins)
    derived: list[weights.Derived] = field(default_factory=list)  # extra inputs, bound in order
    checked_groups: dict[str, Any] = field(default_factory=dict)  # equal token counts per call
    shared: dict[str, Any] = field(default_factory=dict)  # state families share (token sharding)
    rings: list[Any] = field(
        default_factory=list
    )  # shared-weight rings: windows bound after `derived`

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def input_index(self, node: fx.Node | None) -> int | None:
        for i, p in enumerate(self.graph.find_nodes(op="placeholder")):
            if p is node:
                return i
        return None

    def real(self, node: fx.Node | None) -> torch.Tensor | None:
        """The real tensor behind placeholder `node` (None if it is not an input or only a
        fake value is known, as for a bare GraphModule)."""
        from torch._subclasses.fake_tensor import FakeTensor

        i = self.input_index(node)
        t = self.inputs[i] if i is not None and i < len(self.inputs) else None
        return t if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) else None

    def name(self, node: fx.Node) -> str:
        i = self.input_index(node)
        return self.input_names[i] if i is not None and i < len(self.input_names) else node.name

    def matmul(self, site: Site) -> Matmul | None:
        """The site's matmul, unless an earlier rewrite replaces it."""
        return None if site.matmul is None or site.matmul.mm in self.taken else site.matmul

    def read_inputs(self) -> set[int]:
        """ids of the real inputs the graph still reads."""
        phs = list(self.graph.find_nodes(op="placeholder"))
        return {id(self.inputs[i]) for i, p in enumerate(phs[: len(self.inputs)]) if p.users}

    def derive(
        self,
        name: str,
        spec: weights.WeightSpec,
        source: fx.Node | None,
        anchor: fx.Node,
        like: torch.Tensor | None = None,
    ) -> weights.Derived:
        """A derived weight of graph input `source` (None: this rank has none), cached on
        graph input `anchor`; a compiled graph finds both in each call's inputs."""
        return weights.Derived(
            name,
            spec,
            self.real(source),
            self.real(anchor),
            like,
            source_index=self.input_index(source) if source is not None else None,
            anchor_index=self.input_index(anchor),
        )

    def bind(self, d: weights.Derived) -> fx.Node:
        """A new graph input for derived weight `d` (bound at run time by the driver)."""
        last = list(self.graph.find_nodes(op="placeholder"))[-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(f"tp_passes_w{len(self.derived)}")
        node.meta["val"] = d.template(self.fake_mode)
        self.derived.append(d)
        return node


@dataclass
class Match:
    """One place a rewrite may apply, as every rank must agree on it."""

    module: str
    size: int  # the group size the report shows
    apply: bool = False  # set by `decide`
    reason: str = ""  # why it is skipped (found before or at `decide`)
    entries: list[Entry] = field(default_factory=list)
    derived: list[weights.Derived] = field(default_factory=list)  # made by `plan_weights`

    def invariant(self) -> tuple:
        """Equal on every rank, or the ranks would plan different collectives."""
        return (self.module, self.size, self.reason)

    def local(self) -> Any:
        """This rank's own fact, exchanged with the others before `decide` (a bias that
        vLLM adds on TP rank 0 only)."""
        return None

    def replaced_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the full weights the applied match no longer reads: freed with
        release_weights=True unless a graph still reads them."""
        return [
            (d.name, d.source)
            for d in self.derived
            if d.source is not None and d.spec.kind != "sum"
        ]


@dataclass
class SiteMatch(Match):
    """An all-reduce site a site rewrite (FlashComm2, sequence parallelism) may take."""

    site: Site | None = None
    any_bias: bool = False  # set by `decide`: does any rank add a bias before the reduce
    groups: tuple[Any, Any] | None = None  # FlashComm2's (OTP, ODP) NamedGroups
    fuse: bool = False  # sequence parallelism: fused mm + reduce_scatter

    def invariant(self) -> tuple:
        return (*super().invariant(), self.site.invariant())

    def local(self) -> tuple[bool, bool]:
        """(adds a bias before the reduce, that bias is a graph input)."""
        b = self.site.matmul.bias if self.site.has_bias else None
        return b is not None, b is not None and b.op == "placeholder"


class Rewrite:
    """Base of every rewrite family; see the module docstring for the protocol."""

    name = ""  # report name, and the key a host uses to refuse it
    stage = ""  # dump stage after its replacements ("after_<stage>")

    def wanted(self, config: TPConfig) -> str:
        """What this rewrite looks for when `config` asks for it explicitly ("" when it does
        not): a configured rewrite that matches nothing is reported with this."""
        return ""

    def find(self, cx: GraphContext) -> list[Match]:
        raise NotImplementedError

    def decide(self, match: Any, facts: list[Any], cx: GraphContext) -> None:
        raise NotImplementedError

    def plan_weights(self, match: Any, cx: GraphContext) -> None:
        """Groups and derived weights (`match.derived`) of an applied match."""

    def replace(self, match: Any, cx: GraphContext) -> None:
        raise NotImplementedError

    def finish(self, cx: GraphContext, matches: list[Any]) -> str | None:
        return None


def nothing_matched(
    rewrites: Any, config: TPConfig, found: set[str], where: str, blocked: bool = True
) -> list[Entry]:
    """One entry per rewrite `config` asks for that found nothing (`found`: the rewrite
    names with a match or entry); `blocked` ones are an error under strict."""
    out = []
    for rw in rewrites:
        what = rw.wanted(config)
        if what and rw.name not in found:
            why = f"configured, but nothing in {where} matches: {what}"
            out.append(Entry(rw.name, "", False, why, 0, blocked=blocked))
    return out


def weight_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
