"""Fine-grained module TP across data-parallel ranks: o_proj, embedding, lm_head, MLP.

Before (pure DP, per rank; W replicated)::

    y = mm(x, t(W_o))                 e = embedding(W_e, ids)        l = mm(h, t(W_lm))

After (W_j = this rank's shard, bound as an extra graph input)::

    y = all_to_all(mm(all_gather(x), t(W_o_j)))[:, :H]               # comm.rows_dp
    e = reduce_scatter(masked_embedding(W_e_j, all_gather(ids)))     # comm.embedding_dp
    l = all_to_all(mm(all_gather(h), t(W_lm_j)))[:, :V]              # comm.rows_dp
    u = act(mm(all_gather(x), t(gate_j))) * mm(.., t(up_j))          # comm.mlp_dp
    m = all_to_all(mm(all_gather(u), t(down_j)))[:, :H]

Every shard is a block of output rows, so each output element is one rank's whole dot
product: a bf16 model rounds exactly as unsharded (no partial sums cross ranks).

Selection is by module path, with the names users expect (overridable through
`TPConfig.module_names`); draft and vision modules are never selected unless asked. The
graph path needs the same token count on every rank of a group (vLLM pads DP batches in
graph mode); with strict=True the runtime wrapper checks it every call. The eager path
(`parallelize_modules`) traces each selected module, runs the same finder and splices
the same replacement, so both paths compute the same numbers.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch._guards import detect_fake_mode

from tp_passes import comm, weights, wire
from tp_passes.fx import aten, is_call, reduced_matmuls, splice, through_views, untransposed, val
from tp_passes.groups.registry import NamedGroup, module_tp_group
from tp_passes.patterns.base import GraphContext, Match, Rewrite, weight_bytes
from tp_passes.report import Entry

O_PROJ = ("o_proj", "out_proj", "wo", "attention.dense")
EMBEDDING = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings")
LM_HEAD = ("lm_head", "output", "embed_out")
MLP_PAIRS = (
    ("gate_up_proj", "down_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
)
EXCLUDED = ("mtp", "vision", "visual")
DEFAULT_NAMES = {"oproj_tp": O_PROJ, "embedding_tp": EMBEDDING, "lmhead_tp": LM_HEAD, "mlp_tp": ()}


def excluded(path: str, include_draft_and_vision: bool = False) -> bool:
    """Draft (MTP) and vision towers are not rewritten unless asked."""
    return not include_draft_and_vision and any(p in EXCLUDED for p in path.split("."))


def selects(config: Any, kind: str, path: str) -> bool:
    """Does `config` select module `path` for `kind` (a module TP config field)?"""
    names = config.names_for(kind, DEFAULT_NAMES[kind])
    return not excluded(path, config.include_draft_and_vision) and any(
        path == n or path.endswith("." + n) for n in names
    )


def mlp_names(module: Any) -> tuple[str, ...] | None:
    """The child names of a gated MLP module, up projections first, down last."""
    for names in MLP_PAIRS:
        if all(hasattr(module, n) for n in names):
            return names
    return None


def tie_reasons(
    model: nn.Module, selected: list[tuple[str, str, nn.Module]], config: Any
) -> dict[str, str]:
    """Path -> why a selected single-weight module (`selected`: (family, path, module))
    cannot be sharded because its weight Parameter is shared: by a module not selected
    with it, or by modules selected with different module TP sizes (a tied embedding and
    lm_head share one shard, so both must be selected with one size)."""
    users: dict[int, list[str]] = {}
    for path, m in model.named_modules():
        if isinstance(w := getattr(m, "weight", None), torch.Tensor):
            users.setdefault(id(w), []).append(path)
    sharing: dict[int, list[tuple[str, str]]] = {}
    for kind, path, m in selected:
        sharing.setdefault(id(m.weight), []).append((kind, path))
    out = {}
    for _, path, m in selected:
        mine = sharing[id(m.weight)]
        others = sorted(set(users[id(m.weight)]) - {p for _, p in mine})
        if len({getattr(config, k) for k, _ in mine}) > 1:
            sizes = ", ".join(f"{k}={getattr(config, k)} ({p})" for k, p in mine)
            out[path] = f"tied weight shared by layers with different module TP sizes: {sizes}"
        elif others:
            out[path] = f"weight is tied to {', '.join(others)}, which is not selected with it"
    return out


MLP_REGION_OPS = {
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.slice.Tensor,
    aten.silu.default,
    aten.gelu.default,
    aten.mul.Tensor,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
}
# activations the MLP rewrite re-applies by name (kept undecomposed until after the rewrites)
ACTIVATIONS = {aten.silu.default: "silu", aten.gelu.default: "gelu"}


@dataclass
class ModuleMatch(Match):
    """One module a module TP rewrite found.

    `has_bias` is this rank's own fact: vLLM adds a row-parallel bias on TP rank 0 only,
    so it is exchanged across ranks and `decide` turns "any rank has one" into the same
    skip reason everywhere.
    """

    out: fx.Node | None = None  # node whose value the rewrite replaces
    x: fx.Node | None = None  # activation (2-D) or ids
    weights: list[fx.Node] = field(default_factory=list)  # in the replacement's order
    bias: fx.Node | None = None
    has_bias: bool = False
    act: str = "silu"  # mlp_tp: the activation between the projections
    group: NamedGroup | None = None  # made by `plan_weights`

    def invariant(self) -> tuple:
        shapes = [str(val(w).shape) for w in self.weights]
        return (*super().invariant(), shapes, self.act)

    def local(self) -> bool:
        return self.has_bias


def _linear_users(w: fx.Node) -> list[tuple[fx.Node, fx.Node, fx.Node | None]]:
    """(mm node, x, bias) for every `x @ w.T (+ b)` reading placeholder w."""
    out = []
    for t in w.users:
        if untransposed(t) is not w:
            continue
        for mm in t.users:
            if is_call(mm, aten.mm.default) and mm.args[1] is t:
                out.append((mm, mm.args[0], None))
            elif is_call(mm, aten.addmm.default) and mm.args[2] is t:
                out.append((mm, mm.args[1], mm.args[0]))
    return out


def _weights_by_path(gm: fx.GraphModule, input_names: list[str]) -> dict[str, fx.Node]:
    phs = list(gm.graph.find_nodes(op="placeholder"))
    return {input_names[i]: p for i, p in enumerate(phs) if i < len(input_names)}


class ModuleTP(Rewrite):
    """Shared steps of the four module TP rewrites; subclasses find and replace."""

    group = ""  # registry group name
    bias_reason = ""  # non-empty: a bias on any rank skips the match with this reason
    stage = "module_tp"
    ops: tuple[str, ...] = ("all_gather", "all_to_all")  # the exchange's collectives

    def size(self, config: Any) -> int:
        return getattr(config, self.name)

    def wanted(self, config: Any) -> str:
        if not self.size(config):
            return ""
        names = list(config.names_for(self.name, DEFAULT_NAMES[self.name])) or ["a gated MLP"]
        return (
            f"a module named one of {names} (TPConfig.module_names['{self.name}'] selects "
            "others)"
        )

    def find(self, cx: GraphContext) -> list[Match]:
        if not self.size(cx.config):
            return []
        found = self.matches(
            _weights_by_path(cx.gm, cx.input_names), cx.config, reduced_matmuls(cx.graph)
        )
        for m in found:
            if not m.reason and any(cx.real(w) is None for w in m.weights):
                m.reason = "weight has no real tensor at compile time (cannot shard it)"
        return found

    def eager_target(self, config: Any, path: str, module: nn.Module) -> torch.Tensor | None:
        """Eager path: the weight that shapes the traced input when `config` selects
        `module` (at `path`) for this rewrite, else None."""
        w = getattr(module, "weight", None)
        ok = self.size(config) and isinstance(w, torch.Tensor) and selects(config, self.name, path)
        return w if ok else None

    def example_input(self, w: torch.Tensor) -> torch.Tensor:
        """Eager path: an input to trace the module with (3 tokens; the count is symbolic)."""
        return torch.zeros(3, w.shape[1], dtype=w.dtype)

    def matches(
        self, by_path: dict[str, fx.Node], config: Any, reduced: set[fx.Node]
    ) -> list[ModuleMatch]:
        """Matches among the weights `by_path`; `reduced`: matmuls feeding a TP all-reduce."""
        raise NotImplementedError

    def shard_specs(self, n_weights: int) -> list[tuple[str, int]]:
        """(WeightSpec kind, dim) of each of a module's `n_weights` weights, in
        replacement order. The graph path, the eager path and vLLM's load-time plan all
        shard through these specs (`weights.derive`)."""
        raise NotImplementedError

    def forward(self, m: ModuleMatch, g: str, k: int, j: int, rows: int) -> Any:
        """The `comm` function replacing `m`: (x, *shards[, bias]) -> output. `rows` is the
        first dim of the full first weight (the vocab, for lm_head)."""
        raise NotImplementedError

    def exchange(
        self,
        x: torch.Tensor,
        c: comm.Collectives,
        k: int,
        j: int,
        width: int,
        local: Any,
        w_j: Any,
    ) -> torch.Tensor:
        """The same exchange around a framework's own kernel `local` on this rank's shard
        (vLLM's quant method on its processed weight), through the host's collectives `c`:
        `x` [rows, in] (ids for the embedding), `width` the output features of the whole
        module, `w_j` the shard."""
        return comm.rows_dp(x, None, c, k, width, mm=local)

    def wire_per_token(self, k: int, cols: int, width: int, item: int, inner: int = 0) -> int:
        """Bytes a rank sends per token of its batch (the ring formulas of `tp_passes.wire`):
        `cols` input features (the embedding: its width), `width` output features, `inner`
        the MLP's intermediate features, `item` bytes per element."""
        # all_gather of x, all_to_all of the k*T output slices (o_proj, lm_head)
        return round((k - 1) * cols * item + (k - 1) / k * width * item)

    def read_saved(self, bytes_before: int, bytes_after: int) -> int:
        """Weight bytes a rank no longer reads per decode step: the whole weight's share
        (a matmul reads all of it every step)."""
        return bytes_before - bytes_after

    def refuses(self, has_bias: bool) -> str:
        """Why a module of this family cannot be sharded from what every rank agrees on
        ("" when it can)."""
        return self.bias_reason if has_bias else ""

    def _linear(
        self,
        by_path: dict[str, fx.Node],
        config: Any,
        reduced: set[fx.Node],
        what: str,
        tied: bool = False,
    ) -> list[ModuleMatch]:
        out = []
        for path, w in by_path.items():
            module, _, leaf = path.rpartition(".")
            is_tied = tied and selects(config, "embedding_tp", module)
            if leaf != "weight" or not (selects(config, self.name, module) or is_tied):
                continue
            for mm, x, b in _linear_users(w):
                name = f"{module} (tied lm_head)" if is_tied else module
                m = ModuleMatch(
                    name,
                    self.size(config),
                    out=mm,
                    x=x,
                    weights=[w],
                    bias=b,
                    has_bias=b is not None,
                )
                if mm in reduced:
                    m.reason = f"{what} is already tensor-parallel (an all-reduce follows it)"
                out.append(m)
        return out

    def decide(self, m: ModuleMatch, facts: list[bool], cx: GraphContext) -> None:
        layout, k = cx.layout, m.size
        if m.reason:
            pass
        elif self.refuses(any(facts)):
            m.reason = self.refuses(True)
        elif layout is None:
            m.reason = f"no rank layout for module TP: {cx.layout_reason}"
        elif layout.dp % k:
            m.reason = (
                f"{self.name}={k} does not divide the data-parallel size "
                f"dp={layout.dp} (world {layout.world_size} / tp {layout.tp})"
            )
        m.apply = not m.reason
        why = m.reason or (
            "needs equal token counts across the group (checked per call with strict=True)"
        )
        m.entries.append(Entry(self.name, m.module, m.apply, why, k, blocked=not m.apply))
        if m.apply:
            cx.taken.add(m.out)

    def plan_weights(self, m: ModuleMatch, cx: GraphContext) -> None:
        m.group = module_tp_group(self.group, m.size, cx.layout)
        m.derived = [
            cx.derive(cx.name(w), weights.WeightSpec(kind, dim, m.group.pg), w, w)
            for w, (kind, dim) in zip(m.weights, self.shard_specs(len(m.weights)))
        ]

    def replace(self, m: ModuleMatch, cx: GraphContext) -> None:
        g, k, j = m.group.group_name, m.size, dist.get_rank(m.group.pg)
        nodes = [cx.bind(d) for d in m.derived]
        args = [m.x, *nodes] + ([m.bias] if m.bias is not None else [])
        out = splice(
            cx.graph,
            self.forward(m, g, k, j, m.derived[0].source.shape[0]),
            args,
            m.out,
            cx.fake_mode,
            cx.decompositions,
        )
        m.out.replace_all_uses_with(out)
        for s in cx.sites:  # an all-reduce of this output (TP x DP) now reduces the new value
            if s.ar.partial is m.out:
                s.ar.partial = out
        cx.checked_groups[g] = m.group.pg
        m.entries[0].details.update(
            weights=[d.name for d in m.derived],
            weight_bytes_before=weight_bytes([d.source for d in m.derived]),
            weight_bytes_after=weight_bytes([d.value for d in m.derived]),
            wire_bytes_per_step=wire.total(wire.collective_bytes(out.meta["tp_passes_inserted"])),
        )


class OProjTP(ModuleTP):
    name, group = "oproj_tp", "otp"

    def matches(self, by_path, config, reduced):
        return self._linear(by_path, config, reduced, "o_proj")

    def shard_specs(self, n_weights):
        return [("shard", 0)]  # output rows

    def forward(self, m, g, k, j, rows):
        def oproj(x, w, b=None):
            if b is None:
                return comm.rows_dp(x, w, g, k, rows)
            b_j = comm.shard_padded(b, 0, k, j)  # my output columns' bias, fused as unsharded
            return comm.rows_dp(x, None, g, k, rows, mm=lambda v: comm.linear(v, w, b_j))

        return oproj


class EmbeddingTP(ModuleTP):
    name, group = "embedding_tp", "embedtp"
    ops = ("all_gather", "reduce_scatter")

    def example_input(self, w):
        return torch.zeros(3, dtype=torch.int64)  # token ids

    def matches(self, by_path, config, reduced):
        out = []
        for path, w in by_path.items():
            module, _, leaf = path.rpartition(".")
            if leaf != "weight" or not selects(config, self.name, module):
                continue
            for e in w.users:
                if is_call(e, aten.embedding.default) and e.args[0] is w and len(e.args) == 2:
                    out.append(
                        ModuleMatch(module, self.size(config), out=e, x=e.args[1], weights=[w])
                    )
        return out

    def shard_specs(self, n_weights):
        return [("shard", 0)]  # vocab rows

    def forward(self, m, g, k, j, rows):
        def embedding(ids, w):
            return comm.as_lookup(comm.embedding_dp(ids.reshape(-1), w, j, g, k), ids)

        return embedding

    def exchange(self, x, c, k, j, width, local, w_j):
        return comm.embedding_dp(x, w_j, j, c, k, lookup=local)

    def read_saved(self, bytes_before, bytes_after):
        return 0  # a lookup reads only its ids' rows, sharded or not

    def wire_per_token(self, k, cols, width, item, inner=0):
        # all_gather of int64 ids, reduce_scatter of the k*T looked-up rows
        return round((k - 1) * 8 + (k - 1) / k * k * width * item)


class LMHeadTP(ModuleTP):
    name, group = "lmhead_tp", "lmheadtp"
    bias_reason = "lm_head with bias is not supported"

    def matches(self, by_path, config, reduced):
        # a tied lm_head reads the embedding's weight: selected through the embedding's name
        return self._linear(by_path, config, reduced, "lm_head", tied=True)

    def shard_specs(self, n_weights):
        return [("shard", 0)]  # vocab rows

    def forward(self, m, g, k, j, rows):
        def lmhead(h, w):
            return comm.rows_dp(h, w, g, k, rows)

        return lmhead


class MLPTP(ModuleTP):
    name, group = "mlp_tp", "mlptp"
    bias_reason = "MLP with biases is not supported"
    ops = ("all_gather", "all_gather", "all_to_all")

    def eager_target(self, config, path, module):
        names = mlp_names(module) if self.size(config) else None
        if names is None or excluded(path, config.include_draft_and_vision):
            return None
        if config.names_for(self.name, ()) and not selects(config, self.name, path):
            return None
        return getattr(module, names[0]).weight  # the up projection: [I, H]

    def matches(self, by_path, config, reduced):
        out = []
        names_ok = not config.names_for(self.name, ())
        for path in by_path:
            module, _, leaf = path.rpartition(".")
            parent, _, child = module.rpartition(".")
            if leaf != "weight" or excluded(module, config.include_draft_and_vision):
                continue
            if not (names_ok or selects(config, self.name, parent)):
                continue
            for names in MLP_PAIRS:
                ws = [by_path.get(f"{parent}.{n}.weight") for n in names]
                if child == names[0] and all(w is not None for w in ws):
                    m = _match_mlp(parent, ws[:-1], ws[-1], self.size(config))
                    out += [m] if m is not None else []
        return out

    def shard_specs(self, n_weights):
        if n_weights == 2:  # merged gate_up (each half sharded), down by rows
            return [("shard_halves", 0), ("shard", 0)]
        return [("shard", 0), ("shard", 0), ("shard", 0)]

    def exchange(self, x, c, k, j, width, local, w_j):
        return comm.mlp_dp(x, None, None, None, c, k, width, local=local)

    def wire_per_token(self, k, cols, width, item, inner=0):
        # all_gather of x and of the intermediate slices, all_to_all of the output slices
        return round(((k - 1) * (cols + inner) + (k - 1) / k * width) * item)

    def forward(self, m, g, k, j, rows):
        width = val(m.weights[-1]).shape[0]  # down's output features

        if len(m.weights) == 2:  # merged gate_up, sharded half by half

            def merged(x, gu, d):
                return comm.mlp_dp(x, *gu.chunk(2), d, g, k, width, m.act)

            return merged

        def mlp(x, gate, up, d):
            return comm.mlp_dp(x, gate, up, d, g, k, width, m.act)

        return mlp


def _match_mlp(parent: str, up_ws: list[fx.Node], down: fx.Node, k: int) -> ModuleMatch | None:
    """up_ws: [merged gate_up] or [gate, up] placeholders."""
    ups = [_linear_users(w) for w in up_ws]
    downs = _linear_users(down)
    if any(len(u) != 1 for u in ups) or len(downs) != 1:
        return None
    mm_ups = [u[0][0] for u in ups]
    x, b_up = ups[0][0][1], any(u[0][2] is not None for u in ups)
    (mm_down, h, b_down) = downs[0]
    m = ModuleMatch(
        parent, k, out=mm_down, x=x, weights=[*up_ws, down], has_bias=b_up or b_down is not None
    )
    if any(through_views(u[0][1]) is not through_views(x) for u in ups):
        m.reason = "gate and up projections read different inputs"
        return m
    # every node between the matmuls must be an activation-gated split/mul, used only inside
    region, frontier = set(), list(mm_ups)
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u is mm_down:
                continue
            if u.op != "call_function" or (
                u.target not in MLP_REGION_OPS and u.target.__name__ != "getitem"
            ):
                m.reason = f"op {u.target} between the up and down projections is not a gated MLP"
                return m
            if u not in region:
                region.add(u)
                frontier.append(u)
    acts = {ACTIVATIONS[n.target] + _gelu_form(n) for n in region if n.target in ACTIVATIONS}
    if through_views(h) not in region or len(acts) != 1:
        m.reason = (
            f"up and down projections are not one gated MLP (activations found: {sorted(acts)})"
        )
    else:
        m.act = acts.pop()
    return m


def _gelu_form(node: fx.Node) -> str:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return "_tanh" if node.target is aten.gelu.default and approximate == "tanh" else ""


# -- eager twin -------------------------------------------------------------------------------
#
# The graph path's own code, run on each selected module: the module is traced with make_fx
# (symbolic token count), the same finder decides, and the same replacement is spliced into
# the module's graph, which becomes the module's forward. So the module's own work around
# the match (a vocab-parallel embedding's masking, a TP all-reduce after down_proj) stays.
# After the rewrite the module's parameters *are* the shards (as torch's parallelize_module
# or vLLM's layers hold them); the forward reads them from the module on every call, so
# `state_dict()`, `.to()` and weight loading see the truth.


@dataclass
class ModuleCandidate:
    """A module the config selects for module TP, traced, and what the finder made of it."""

    path: str
    module: nn.Module
    rewrite: ModuleTP
    cx: GraphContext  # module(x) traced: inputs (*parameters, x)
    all_leaves: list[str]  # the module's parameters, in input order
    match: ModuleMatch
    leaves: list[str] = field(default_factory=list)  # the match's weights, replacement order

    def invariant(self) -> tuple:
        return (self.path, self.rewrite.name, self.match.invariant())


def _trace(module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list[str]]:
    """make_fx of module(x), token count symbolic, inputs (*parameters, x) positional."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    named = list(module.named_parameters(remove_duplicate=False))
    leaves = [n for n, _ in named]

    def call(*flat: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, dict(zip(leaves, flat[:-1])), (flat[-1],))
        return out[0] if isinstance(out, tuple) else out

    gm = make_fx(call, tracing_mode="symbolic")(*[p.detach() for _, p in named], x)
    gm.graph._codegen = fx.graph.CodeGen()  # positional inputs: shard inputs get appended
    gm.recompile()
    return gm, leaves


def find_module_candidates(
    model: nn.Module, config: Any, rewrites: list[ModuleTP]
) -> list[ModuleCandidate]:
    """Every module a module TP rewrite selects and its finder accepts (no collective)."""
    out = []
    for path, module in model.named_modules():
        targets = [
            (r, w) for r in rewrites if (w := r.eager_target(config, path, module)) is not None
        ]
        if not targets:
            continue
        rewrite, w = targets[0]  # registry order is the priority, as on the graph path
        x = rewrite.example_input(w)
        gm, leaves = _trace(module, x)
        names_in = [f"{path}.{n}" for n in leaves] + ["x"]
        found = rewrite.matches(_weights_by_path(gm, names_in), config, reduced_matmuls(gm.graph))
        if len(found) != 1:  # as the graph path: a module without the pattern is no match
            continue
        fake_mode = detect_fake_mode([p.meta["val"] for p in gm.graph.find_nodes(op="placeholder")])
        cx = GraphContext(gm, config, [], names_in, fake_mode)
        c = ModuleCandidate(path, module, rewrite, cx, leaves, found[0])
        if any(
            str(n.target).startswith("c10d.") for n in gm.graph.nodes if n.op == "call_function"
        ):
            # make_fx keeps dist.all_reduce as c10d.allreduce_ without its wait: the traced
            # graph would read the result before the collective completes
            c.match.reason = c.match.reason or (
                "eager: the module issues an in-place collective (dist.all_reduce), which its "
                "traced graph cannot run in order; the graph path (torch.compile) rewrites it"
            )
        leaf_of = dict(zip(gm.graph.find_nodes(op="placeholder"), leaves))
        c.leaves = [leaf_of[w] for w in c.match.weights]
        out.append(c)
    return out


def parallelize_modules(cands: list[ModuleCandidate]) -> list[Entry]:
    """Shard the decided candidates' modules: parameters become the shards (tied ones once),
    forwards run the spliced graphs. Collective: groups and shards, in candidate order."""
    todo = [c for c in cands if c.match.apply]
    for c in todo:  # groups first, in agreed order, then one `materialize` for all shards
        c.cx.inputs = [c.module.get_parameter(leaf) for leaf in c.all_leaves]
        c.rewrite.plan_weights(c.match, c.cx)
    weights.materialize([d for c in todo for d in c.match.derived])
    shards: dict[tuple, nn.Parameter] = {}  # (id(full), spec key) -> shard: tied share one
    entries = []
    for c in todo:
        before = after = 0
        for leaf, d in zip(c.leaves, c.match.derived):
            key = (id(d.source), d.spec.key())
            if key not in shards:
                shards[key] = nn.Parameter(d.value, requires_grad=False)
                after += weight_bytes([d.value])
            before += weight_bytes([d.source])
            owner, _, name = leaf.rpartition(".")
            setattr(c.module.get_submodule(owner) if owner else c.module, name, shards[key])
        _splice_into_module(c)
        entries.append(
            Entry(
                c.rewrite.name,
                c.path,
                True,
                "",
                c.match.size,
                {"weight_bytes_before": before, "weight_bytes_after": after},
            )
        )
    return entries


def _splice_into_module(c: ModuleCandidate) -> None:
    """Splice the match's replacement into the module's graph; it becomes the forward."""
    m, gm, g, k = c.match, c.cx.gm, c.match.group.group_name, c.match.size
    c.cx.derived = []
    c.rewrite.replace(m, c.cx)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    module, embedding = c.module, isinstance(c.rewrite, EmbeddingTP)

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        params = [module.get_parameter(n) for n in c.all_leaves]
        shards = [module.get_parameter(n) for n in c.leaves]
        flat = x.reshape(-1, 1) if embedding else x.reshape(-1, x.shape[-1])
        padded, t_max = comm.pad_to_group_max(flat, g, k, c.path)  # ranks' T may differ
        if t_max < 2:  # the graph was traced for a symbolic T >= 2 (torch specializes 0, 1)
            padded = torch.nn.functional.pad(padded, (0, 0, 0, 2 - padded.shape[0]))
        y = gm(*params, padded.reshape(-1) if embedding else padded, *shards)
        y = y[0] if isinstance(y, (list, tuple)) else y
        return y[: flat.shape[0]].reshape(*(x.shape if embedding else x.shape[:-1]), y.shape[-1])

    module.forward = types.MethodType(forward, module)
