"""Fine-grained module TP across data-parallel ranks: which modules, and their groups.

Selection is by module path, with the names users expect (overridable through
`TPConfig.module_names`); draft and vision modules are never selected unless asked.
The graph path is below; the eager path (`tp_passes.eager`) applies the same `comm`
functions to modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from tp_passes.fx import aten, is_call, through_views, untransposed, val

O_PROJ = ("o_proj", "out_proj", "wo", "attention.dense")
EMBEDDING = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings")
LM_HEAD = ("lm_head", "output", "embed_out")
MLP_PAIRS = (("gate_up_proj", "down_proj"), ("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
EXCLUDED = ("mtp", "vision", "visual")


def excluded(path: str, include_draft_and_vision: bool = False) -> bool:
    """Draft (MTP) and vision towers are not rewritten unless asked."""
    return not include_draft_and_vision and any(p in EXCLUDED for p in path.split("."))


def matches(path: str, names: tuple[str, ...], include_draft_and_vision: bool = False) -> bool:
    return not excluded(path, include_draft_and_vision) and any(
        path == n or path.endswith("." + n) for n in names
    )


def selects(config: Any, kind: str, path: str) -> bool:
    """Does `config` select module `path` for rewrite `kind`?"""
    defaults = {"oproj_tp": O_PROJ, "embedding_tp": EMBEDDING, "lmhead_tp": LM_HEAD, "mlp_tp": ()}
    return matches(path, config.names_for(kind, defaults[kind]), config.include_draft_and_vision)


def mlp_names(module: Any) -> tuple[str, ...] | None:
    """The child names of a gated MLP module, up projections first, down last."""
    for names in MLP_PAIRS:
        if all(hasattr(module, n) for n in names):
            return names
    return None


# -- graph path ------------------------------------------------------------------------------
#
# Before (pure DP, per rank; W replicated)::
#
#     y = mm(x, t(W_o))                 e = embedding(W_e, ids)        l = mm(h, t(W_lm))
#
# After (W_j = this rank's shard, bound as an extra graph input)::
#
#     y = reduce_scatter(mm(all_to_all(cols(x)), t(W_o_j)))            # comm.oproj_dp
#     e = reduce_scatter(masked_embedding(W_e_j, all_gather(ids)))     # comm.embedding_dp
#     l = all_to_all(mm(all_gather(h), t(W_lm_j)))[:, :V]              # comm.lmhead_dp
#     m = reduce_scatter(mm(act(mm(all_gather(x), gate_j)) * mm(.., up_j), down_j))  # comm.mlp_dp
#
# The graph path needs the same token count on every rank of a group (vLLM pads DP
# batches in graph mode); with strict=True the runtime wrapper checks it every call.


MLP_REGION_OPS = {
    aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.silu.default,
    aten.gelu.default, aten.mul.Tensor, aten.view.default, aten._unsafe_view.default,
    aten.reshape.default,
}
# activations the MLP rewrite re-applies by name (kept undecomposed until after the rewrites)
ACTIVATIONS = {aten.silu.default: "silu", aten.gelu.default: "gelu"}


@dataclass
class ModuleMatch:
    """One module the configured module TP rewrite found, as every rank must agree on it.

    `has_bias` is this rank's own fact: vLLM adds a row-parallel bias on TP rank 0 only,
    so it is exchanged across ranks and `decide` turns "any rank has one" into the same
    skip reason everywhere.
    """

    kind: str  # "oproj_tp" | "embedding_tp" | "lmhead_tp" | "mlp_tp"
    module: str
    k: int
    out: fx.Node  # node whose value the rewrite replaces
    x: fx.Node  # activation (2-D) or ids
    weights: list[fx.Node]  # placeholders, in the order the replacement takes them
    bias: fx.Node | None = None
    reason: str = ""  # non-empty: matched but skipped
    has_bias: bool = False
    act: str = "silu"  # mlp_tp: the activation between the projections

    def invariant(self) -> tuple:
        return (self.kind, self.module, self.k, [str(val(w).shape) for w in self.weights], self.reason, self.act)

    def decide(self, any_rank_has_bias: bool, layout: Any, no_layout: str) -> None:
        """The skip reasons that depend on every rank's facts (the same on every rank): a
        bias on any rank, and the layout the model's TP groups imply (None: `no_layout`)."""
        if self.reason:
            return
        if any_rank_has_bias and self.kind == "lmhead_tp":
            self.reason = "lm_head with bias is not supported"
        elif any_rank_has_bias and self.kind == "mlp_tp":
            self.reason = "MLP with biases is not supported"
        elif layout is None:
            self.reason = f"no rank layout for module TP: {no_layout}"
        elif layout.dp % self.k:
            self.reason = (f"{self.kind}={self.k} does not divide the data-parallel size dp={layout.dp} "
                           f"(world {layout.world_size} / tp {layout.tp})")


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


def find_module_matches(gm: fx.GraphModule, input_names: list[str], config: Any,
                        reduced: set[fx.Node]) -> list[ModuleMatch]:
    """Module TP matches; `reduced` holds the matmul nodes that feed a TP all-reduce.

    The one decision function for both paths: the eager path runs it on a module traced
    with make_fx (`tp_passes.eager`).
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    by_path = {input_names[i]: p for i, p in enumerate(placeholders) if i < len(input_names)}
    sizes = {k: getattr(config, k) for k in ("oproj_tp", "embedding_tp", "lmhead_tp", "mlp_tp")}
    matches_: list[ModuleMatch] = []
    for path, w in by_path.items():
        module, _, leaf = path.rpartition(".")
        if leaf != "weight":
            continue
        if sizes["oproj_tp"] and selects(config, "oproj_tp", module):
            for mm, x, b in _linear_users(w):
                m = ModuleMatch("oproj_tp", module, sizes["oproj_tp"], mm, x, [w], b, has_bias=b is not None)
                if mm in reduced:
                    m.reason = "o_proj is already tensor-parallel (an all-reduce follows it)"
                matches_.append(m)
        tied = selects(config, "embedding_tp", module)  # a tied lm_head reads the embedding's input
        if sizes["lmhead_tp"] and (selects(config, "lmhead_tp", module) or tied):
            for mm, x, b in _linear_users(w):
                name = f"{module} (tied lm_head)" if tied else module
                m = ModuleMatch("lmhead_tp", name, sizes["lmhead_tp"], mm, x, [w], b, has_bias=b is not None)
                if mm in reduced:
                    m.reason = "lm_head is already tensor-parallel (an all-reduce follows it)"
                matches_.append(m)
        if sizes["embedding_tp"] and selects(config, "embedding_tp", module):
            for e in w.users:
                if is_call(e, aten.embedding.default) and e.args[0] is w and len(e.args) == 2:
                    matches_.append(ModuleMatch("embedding_tp", module, sizes["embedding_tp"], e, e.args[1], [w]))
        parent, _, child = module.rpartition(".")
        names_ok = not config.names_for("mlp_tp", ()) or selects(config, "mlp_tp", parent)
        if sizes["mlp_tp"] and names_ok and not excluded(module, config.include_draft_and_vision):
            for names in MLP_PAIRS:
                if child != names[0]:
                    continue
                ws = [by_path.get(f"{parent}.{n}.weight") for n in names]
                if all(x is not None for x in ws):
                    m = _match_mlp(parent, ws[:-1], ws[-1], sizes["mlp_tp"])
                    if m is not None:
                        matches_.append(m)
    return matches_


def _match_mlp(parent: str, up_ws: list[fx.Node], down: fx.Node, k: int) -> ModuleMatch | None:
    """up_ws: [merged gate_up] or [gate, up] placeholders."""
    ups = [_linear_users(w) for w in up_ws]
    downs = _linear_users(down)
    if any(len(u) != 1 for u in ups) or len(downs) != 1:
        return None
    mm_ups = [u[0][0] for u in ups]
    x, b_up = ups[0][0][1], any(u[0][2] is not None for u in ups)
    (mm_down, h, b_down) = downs[0]
    m = ModuleMatch("mlp_tp", parent, k, mm_down, x, [*up_ws, down], has_bias=b_up or b_down is not None)
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
            if u.op != "call_function" or (u.target not in MLP_REGION_OPS and u.target.__name__ != "getitem"):
                m.reason = f"op {u.target} between the up and down projections is not a gated MLP"
                return m
            if u not in region:
                region.add(u)
                frontier.append(u)
    acts = {ACTIVATIONS[n.target] + _gelu_form(n) for n in region if n.target in ACTIVATIONS}
    if through_views(h) not in region or len(acts) != 1:
        m.reason = f"up and down projections are not one gated MLP (activations found: {sorted(acts)})"
    else:
        m.act = acts.pop()
    return m


def _gelu_form(node: fx.Node) -> str:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return "_tanh" if node.target is aten.gelu.default and approximate == "tanh" else ""


def shard_specs(kind: str, n_weights: int) -> list[tuple[str, int]]:
    """(WeightSpec kind, dim) of each weight of a match, in replacement order."""
    if kind == "oproj_tp":
        return [("shard", 1)]  # input columns
    if kind in ("embedding_tp", "lmhead_tp"):
        return [("shard", 0)]  # vocab rows
    if n_weights == 2:  # merged gate_up (each half sharded), down by columns
        return [("shard_halves", 0), ("shard", 1)]
    return [("shard", 0), ("shard", 0), ("shard", 1)]


def module_tp_forward(m: ModuleMatch, g: str, k: int, j: int, rows: int) -> Any:
    """The `comm` function that replaces match `m`: (x, *shards[, bias]) -> output.

    `rows` is the first dim of the full first weight (the vocab, for lm_head).
    """
    from tp_passes import comm

    if m.kind == "oproj_tp":
        def oproj(x, w, b=None):
            y = comm.oproj_dp(x, w, g, k)
            return y if b is None else y + b
        return oproj
    if m.kind == "embedding_tp":
        return lambda ids, w: comm.embedding_dp(ids.reshape(-1), w, j, g, k).reshape(*ids.shape, -1)
    if m.kind == "lmhead_tp":
        return lambda h, w: comm.lmhead_dp(h, w, g, k, rows)
    if len(m.weights) == 2:  # merged gate_up, sharded half by half
        return lambda x, gu, d: comm.mlp_dp(x, *gu.chunk(2), d, g, k, m.act)
    return lambda x, gate, up, d: comm.mlp_dp(x, gate, up, d, g, k, m.act)
