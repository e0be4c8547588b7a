"""The `tp_passes` torch.compile backend: capture -> match -> plan -> rewrite -> lower -> compile.

    torch.compile(model, backend="tp_passes", options={"flashcomm2": 1, "inner": "eager"})

Dynamo's graph goes through aot_autograd (functionalized ATen inference graph). The
inference compiler finds every sum all-reduce, normalizes it (`fx.AllReduce` + `fx.Matmul`),
agrees on a plan with the other ranks (one all_gather_object, before any other collective),
inserts the producers (FlashComm2, fused mm + reduce-scatter, plain reduce-scatter), lets
`TokenSharding` push the token sharding through the residual stream (sequence
parallelism) and hands the result to the inner compiler. Derived weights are bound as
extra graph inputs by a small runtime wrapper.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._guards import detect_fake_mode

from tp_passes import comm, weights, wire
from tp_passes.config import TPConfig
from tp_passes.fx import (
    AllReduce, Matmul, as_all_reduce, describe_producer, find_all_reduces, match_matmul, module_of,
    path_from_source, placeholder_of, reduced_matmuls, val,
)
from tp_passes.groups.layout import RankLayout
from tp_passes.groups.registry import agree_across_ranks, flashcomm2_groups, module_tp_group
from tp_passes.lowering import KEEP_UNDECOMPOSED, decompose_kept, mm_reduce_scatter_impl
from tp_passes.patterns.module_tp import ModuleMatch, find_module_matches, module_tp_forward, selects, shard_specs
from tp_passes.patterns.flashcomm2 import FlashComm2Groups, flashcomm2_size_error
from tp_passes.patterns.sequence_parallel import Sharded, TokenSharding
from tp_passes.report import Dumper, Entry, GraphReport, count_matmuls, next_graph_id, rank, record
from tp_passes.vllm.config import VLLM_MODULE_TP, config_from_vllm, current_vllm_config



@dataclass
class Site:
    """One all-reduce and what feeds it, as the plan sees it."""

    ar: AllReduce
    matmul: Matmul | None
    module: str
    weight_index: int | None  # graph input index of the matmul weight
    n: int
    j: int
    ranks: tuple[int, ...]  # the group's global ranks
    reason: str = ""  # why no rewrite can take this all-reduce ("" if one may)

    def invariant(self) -> tuple:
        """What must be equal on every rank (bias placement may differ)."""
        w = val(self.matmul.weight).shape if self.matmul else None
        return (self.module, self.n, str(w), self.matmul is not None, self.reason)


@dataclass
class Plan:
    site: Site | None  # None for module TP plans (no all-reduce involved)
    producer: str  # "flashcomm2" | "reduce_scatter" | "keep" | "module_tp" | "skip"
    fuse: bool = False
    any_bias: bool = False
    entries: list[Entry] = field(default_factory=list)
    module: ModuleMatch | None = None
    groups: Any = None  # NamedGroup (module TP) or FlashComm2Groups, made by `prepare`
    derived: list[weights.Derived] = field(default_factory=list)  # its derived weights


@dataclass
class Agreed:
    """What every rank learned from the one cross-rank exchange of a compile."""

    site_bias: list[bool]  # per site: does any rank add a bias before the reduce
    module_bias: list[bool]  # per module match: does any rank's module have a bias
    layout: RankLayout | None  # the layout the model's TP groups imply (None: they do not)
    layout_reason: str  # why there is no layout


def _sources(gm: fx.GraphModule) -> list[str]:
    """Dynamo's source of every graph input (``L['self']._modules['layers']...``), or ''."""
    names = ["" for _ in gm.named_parameters(remove_duplicate=False)]
    names += ["" for _ in gm.named_buffers(remove_duplicate=False)]
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        src = getattr(arg, "source", None) if arg is not None else None
        name = getattr(src, "name", "") if src is not None else ""
        names.append(name() if callable(name) else name)
    return names


def _source_names(gm: fx.GraphModule) -> list[str]:
    """Module path of every ATen graph input, in aot_autograd's order."""
    params = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    params += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    phs = list(gm.graph.find_nodes(op="placeholder"))
    return params + [path_from_source(src) if src else node.name
                     for src, node in zip(_sources(gm)[len(params):], phs)]


def _owners(gm: fx.GraphModule, real_inputs: list[Any]) -> list[tuple[Any, str] | None]:
    """(module, attribute) holding each graph input, found through Dynamo's sources and the
    frame being compiled; None where it cannot be found (then the input is never released)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        frame_locals = InstructionTranslator.current_tx().f_locals
    except Exception:
        return [None] * len(real_inputs)
    out: list[tuple[Any, str] | None] = []
    for src, t in zip(_sources(gm), real_inputs):
        root = re.match(r"^L\['([^']*)'\]", src)
        owner, leaf = None, ""
        if root is not None and isinstance(frame_locals.get(root.group(1)), torch.nn.Module):
            path = path_from_source(src)
            try:
                owner = frame_locals[root.group(1)].get_submodule(module_of(path))
            except AttributeError:
                owner = None
            leaf = path.rpartition(".")[2]
        out.append((owner, leaf) if owner is not None and getattr(owner, leaf, None) is t else None)
    return out


def outside_compile(fn: Any, *args: Any) -> Any:
    """Run compile-time collectives on a fresh thread.

    Inside aot_autograd's compiler callback a gloo collective never completes (seen on
    torch 2.13 CPU; the same call from Dynamo's backend or from another thread does), so
    the thread-local state of the compile must not be inherited. Fake mode is thread
    local too, so `fn` sees real tensors.
    """
    import threading

    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=work, name="tp_passes-compile-collective")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box.get("out")


def _group(name: str) -> Any:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


class TPBackend:
    """One compile: holds config, the real inputs (for weights) and the report."""

    def __init__(self, config: TPConfig, real_inputs: list[Any], input_names: list[str],
                 decompositions: dict | None = None, in_vllm: bool = False) -> None:
        self.config = config
        self.in_vllm = in_vllm
        self.decompositions = decompositions
        self.real_inputs = real_inputs
        self.input_names = input_names
        self.module_groups: dict[str, Any] = {}  # module TP groups the graph uses
        self.derived: list[weights.Derived] = []  # extra graph inputs, in binding order
        self.owners: list[tuple[Any, str] | None] = []  # (module, attr) of each input, for release

    # -- analysis -------------------------------------------------------------------------
    def sites(self, gm: fx.GraphModule) -> list[Site]:
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        index = {p: i for i, p in enumerate(placeholders)}
        out = []
        for ar in find_all_reduces(gm.graph):
            mm = match_matmul(ar.partial)
            src = mm.weight if mm else placeholder_of(ar.partial)
            widx = index.get(src) if src is not None else None
            module = module_of(self.input_names[widx]) if widx is not None else ""
            pg = _group(ar.group_name)
            ranks = tuple(sorted(dist.get_process_group_ranks(pg)))
            site = Site(ar, mm, module, widx if mm else None, pg.size(), pg.rank(), ranks)
            if val(ar.partial).dim() < 2:  # a global statistic, not a [tokens, features] value
                site.reason = f"{val(ar.partial).dim()}-dim all-reduce has no token dimension"
            out.append(site)
        return out

    def agree(self, sites: list[Site], modules: list[ModuleMatch], released: list[str]) -> Agreed:
        """Check the plan's inputs are equal on all ranks; exchange the per-rank facts.

        Runs on every compile, also when this rank found nothing: a rank that skipped it
        would leave the others waiting (configs that differ raise here instead).
        """
        local = (
            [s.matmul is not None and s.matmul.bias is not None for s in sites],
            [m.has_bias for m in modules],
            sorted({s.ranks for s in sites if s.n > 1}),
        )
        invariant = {
            "config": self.config.to_dict(),
            "sites": [s.invariant() for s in sites],
            "modules": [m.invariant() for m in modules],
            "released": released,
        }
        everyone = agree_across_ranks(invariant, "the rewrite plan (config or matched graph)", local)
        layout, why = RankLayout.infer([groups for _, _, groups in everyone])
        return Agreed(
            [any(e[0][i] for e in everyone) for i in range(len(sites))],
            [any(e[1][i] for e in everyone) for i in range(len(modules))],
            layout, why,
        )

    def plan(self, sites: list[Site], agreed: Agreed, consumed: set[fx.Node]) -> list[Plan]:
        """`consumed`: matmuls a module TP rewrite replaces (their all-reduce stays plain)."""
        cfg = self.config
        plans = []
        for site, bias in zip(sites, agreed.site_bias):
            if site.matmul is not None and site.matmul.mm in consumed:
                site.matmul, site.weight_index = None, None
            p = Plan(site, "keep", any_bias=bias)

            def entry(rw: str, ok: bool, why: str = "", blocked: bool = False, **d: Any) -> None:
                details = {"dialect": site.ar.dialect, **d}
                p.entries.append(Entry(rw, site.module, ok, why, site.n, details, blocked))

            sp_on = cfg.sequence_parallel in (True, "auto")
            fuse_on = cfg.fuse_mm_reduce_scatter in (True, "auto")
            if site.n == 1 or site.reason:
                entry("sequence_parallel", False, site.reason or "all-reduce over a group of size 1")
                plans.append(p)
                continue
            if cfg.flashcomm2 and selects(cfg, "oproj_tp", site.module):
                why = self._flashcomm2_blocker(site) or agreed.layout_reason
                if why:
                    entry("flashcomm2", False, why, blocked=True)
                else:
                    p.producer = "flashcomm2"
                    entry("flashcomm2", True, m=cfg.flashcomm2)
            if p.producer == "keep" and (sp_on or (cfg.fuse_mm_reduce_scatter is True and site.matmul)):
                p.producer = "reduce_scatter"
                p.fuse = fuse_on and site.matmul is not None
                if sp_on:
                    entry("sequence_parallel", True)
                if site.matmul is not None:
                    if not fuse_on:
                        entry("mm_reduce_scatter", False, "fuse_mm_reduce_scatter=False")
                    else:
                        entry("mm_reduce_scatter", True)
            elif p.producer == "keep" and not p.entries:
                entry("sequence_parallel", False, "sequence_parallel=False")
            plans.append(p)
        return plans

    def _module_tp_plans(self, modules: list[ModuleMatch], agreed: Agreed) -> list[Plan]:
        plans = []
        for m, bias in zip(modules, agreed.module_bias):
            m.decide(bias, agreed.layout, agreed.layout_reason)
            p = Plan(None, "skip" if m.reason else "module_tp", module=m)
            ok = not m.reason
            p.entries.append(Entry(m.kind, m.module, ok, m.reason or
                                   "needs equal token counts across the group (checked per call with strict=True)",
                                   m.k, blocked=not ok))
            plans.append(p)
        return plans

    def _flashcomm2_blocker(self, site: Site) -> str:
        why = flashcomm2_size_error(self.config.flashcomm2, site.n)
        if why:
            return why
        if site.matmul is None:
            return f"o_proj's product comes from {describe_producer(site.ar.partial)}, not a plain matmul: its weight cannot be resharded"
        if site.weight_index is None:
            return "o_proj weight is not a graph input (cannot gather it)"
        if len(site.matmul.weight.users) != 1:
            return "o_proj weight is read elsewhere in the graph"
        if not isinstance(self.real_inputs[site.weight_index], torch.Tensor):
            return "o_proj weight has no real tensor at compile time"
        return ""

    # -- weights and groups (collectives, in plan order, the same on every rank) ----------
    def prepare(self, gm: fx.GraphModule, plans: list[Plan], layout: RankLayout | None) -> None:
        """Create the groups the plans use and make their derived weights."""
        for p in plans:
            if p.producer == "module_tp":
                m = p.module
                group = module_tp_group(m.k, layout)
                p.groups = group
                reals = [self.real_inputs[self._input_index(gm, w)] for w in m.weights]
                names = [self.input_names[self._input_index(gm, w)] for w in m.weights]
                specs = shard_specs(m.kind, len(reals))
                p.derived = [weights.Derived(n, weights.WeightSpec(kind, dim, group.pg), t, t)
                             for n, t, (kind, dim) in zip(names, reals, specs)]
            elif p.producer == "flashcomm2":
                site, mm = p.site, p.site.matmul
                m = self.config.flashcomm2
                otp, odp = flashcomm2_groups(layout, m)
                n = site.n
                p.groups = FlashComm2Groups(otp.group_name, odp.group_name, m, n // m)
                w_real = self.real_inputs[site.weight_index]
                w_name = self.input_names[site.weight_index]
                p.derived = [weights.Derived(w_name, weights.WeightSpec("gather", 1, odp.pg), w_real, w_real)]
                if p.any_bias:  # rank 0's bias, summed with zeros from the others: one bias everywhere
                    b_idx = self._input_index(gm, mm.bias) if mm.bias is not None else None
                    b_real = self.real_inputs[b_idx] if b_idx is not None else None
                    like = torch.zeros(w_real.shape[0], dtype=w_real.dtype)
                    spec = weights.WeightSpec("sum", 0, _group(site.ar.group_name))
                    p.derived.append(weights.Derived(f"{site.module}.bias", spec, b_real, w_real, like))
        requests = [d for p in plans for d in p.derived]
        if not requests:  # the plan is agreed: every rank returns here together
            return
        weights.materialize(requests)

    # -- rewriting ------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, example_inputs: list[Any], dumper: Dumper) -> list[Plan]:
        fake_mode = detect_fake_mode(example_inputs)
        sites = self.sites(gm)
        modules = find_module_matches(gm, self.input_names, self.config, reduced_matmuls(gm.graph))
        if self.in_vllm:
            for m in modules:
                m.reason = m.reason or VLLM_MODULE_TP
        released = [self.input_names[i] for i, t in enumerate(self.real_inputs) if weights.is_released(t)]
        agreed = outside_compile(self.agree, sites, modules, released)
        module_plans = self._module_tp_plans(modules, agreed)
        consumed = {p.module.out for p in module_plans if p.producer == "module_tp"}
        plans = self.plan(sites, agreed, consumed) + module_plans
        blocked = [e for p in plans for e in p.entries if e.blocked]
        if self.config.strict and blocked:  # same on every rank: decided from agreed inputs
            raise RuntimeError(
                "tp_passes (strict): rewrites that cannot be applied safely: "
                + "; ".join(f"{e.rewrite} at {e.module or '?'}: {e.reason}" for e in blocked)
            )
        outside_compile(self.prepare, gm, plans, agreed.layout)
        sharding = TokenSharding(gm, fake_mode, self.decompositions)
        for p in plans:
            if p.producer == "module_tp":
                self._apply_module_tp(gm, sharding, p, sites, fake_mode)
        if any(p.producer == "module_tp" for p in plans):
            dumper.graph("after_module_tp", gm)
        for p in plans:
            if p.producer == "flashcomm2":
                self._produce_flashcomm2(gm, sharding, p, fake_mode)
        dumper.graph("after_flashcomm2", gm)
        for p in plans:
            if p.producer == "reduce_scatter":
                self._produce_reduce_scatter(sharding, p)
        dumper.graph("after_reduce_scatter", gm)
        sp = self.config.sequence_parallel in (True, "auto")
        n_sharded = sharding.run(propagate=sp)
        for p in plans:
            for entry in p.entries:
                if entry.rewrite == "sequence_parallel" and entry.applied:
                    entry.details["ops_on_sharded_tokens_in_graph"] = n_sharded
        gm.graph.lint()
        gm.recompile()
        dumper.graph("after_sequence_parallel", gm)
        self._check_released_unread(gm)
        if self.config.release_weights:
            self._release(gm, plans)
        return plans

    def _reads(self, gm: fx.GraphModule) -> set[int]:
        """ids of the real inputs the graph still reads."""
        phs = list(gm.graph.find_nodes(op="placeholder"))
        return {id(self.real_inputs[i]) for i, p in enumerate(phs[: len(self.real_inputs)]) if p.users}

    def _check_released_unread(self, gm: fx.GraphModule) -> None:
        read = self._reads(gm)
        names = [self.input_names[i] for i, t in enumerate(self.real_inputs)
                 if weights.is_released(t) and id(t) in read]
        if names:  # the released set and the plan are agreed: this raises on every rank
            raise RuntimeError(
                f"tp_passes: the compiled graph reads {', '.join(names)}, whose storage was freed "
                "by release_weights=True in an earlier compile; compile with the same rewrites "
                "(config) as that compile, or reload the model"
            )

    def _release(self, gm: fx.GraphModule, plans: list[Plan]) -> None:
        """Free the full weights the rewritten graph no longer reads (tied ones stay)."""
        read = self._reads(gm) | weights.read_by_compiled_graphs()
        owner_of = {id(t): o for t, o in zip(self.real_inputs, self.owners) if o is not None}
        for p in plans:
            for d in p.derived:
                if d.source is None or d.spec.kind == "sum":
                    continue
                entry = p.entries[0]
                if id(d.source) in read:
                    entry.details.setdefault("kept_full_weights", []).append(d.name)
                elif id(d.source) not in owner_of:  # no module to guard: never a silent empty tensor
                    entry.details.setdefault("kept_full_weights", []).append(f"{d.name} (owner not found)")
                else:
                    weights.release(d.source, d.name, f"{entry.rewrite} at {entry.module}", *owner_of[id(d.source)])

    def _apply_module_tp(self, gm, sharding: TokenSharding, p: Plan, sites: list[Site], fake_mode) -> None:
        m, group = p.module, p.groups
        g, k, j = group.group_name, m.k, dist.get_rank(group.pg)
        nodes = [self._bind(gm, d, fake_mode) for d in p.derived]
        args = [m.x, *nodes] + ([m.bias] if m.bias is not None else [])
        fn = module_tp_forward(m, g, k, j, val(m.weights[0]).shape[0])
        out = sharding.splice(fn, args, m.out)
        m.out.replace_all_uses_with(out)
        for s in sites:  # an all-reduce of this output (TP x DP) now reduces the new value
            if s.ar.partial is m.out:
                s.ar.partial = out
        self.module_groups[group.group_name] = group.pg
        reals = [d.source for d in p.derived]
        p.entries[0].details.update(
            weights=[d.name for d in p.derived],
            weight_bytes_before=sum(t.numel() * t.element_size() for t in reals),
            weight_bytes_after=sum(d.value.numel() * d.value.element_size() for d in p.derived),
            wire_bytes_per_step=wire.total(wire.collective_bytes(out.meta["tp_passes_inserted"])),
        )

    def _shape(self, sharding: TokenSharding, site: Site, rows: Any) -> list[Any]:
        partial = site.ar.partial
        if site.matmul is not None and partial is not site.matmul.mm:
            return list(partial.args[1])  # the view back to [B, S, H]
        return [rows, val(partial).shape[-1]]

    def _produce_reduce_scatter(self, sharding: TokenSharding, p: Plan) -> None:
        site = p.site
        g, n = site.ar.group_name, site.n
        before = site.ar.result
        mm = site.matmul
        with sharding.graph.inserting_before(before):
            if mm is not None:
                rows = sharding.size(mm.x, 0)
                shape = self._shape(sharding, site, rows)
                if p.fuse and not p.any_bias:
                    fn, how = mm_reduce_scatter_impl(val(mm.x).device.type, n, g)
                    twin = sharding.splice(lambda x, w: fn(x, w, g, n), [mm.x, mm.weight], before)
                else:
                    how = "decomposed mm + reduce_scatter (bias before the reduce)" if p.any_bias else "unfused"
                    twin = sharding.splice(lambda x: comm.reduce_scatter_rows(x, g, n), [mm.mm], before)
                for e in p.entries:
                    if e.rewrite == "mm_reduce_scatter":
                        e.details["lowering"] = how
            else:
                partial = site.ar.partial
                rows = sharding.rows_of(partial)
                shape = sharding.shape_of(partial)
                twin = sharding.splice(
                    lambda t: comm.reduce_scatter_rows(t.reshape(-1, t.shape[-1]), g, n), [partial], before
                )
        sharding.add(before, Sharded(twin, g, n, site.j, rows, shape))

    def _produce_flashcomm2(self, gm, sharding: TokenSharding, p: Plan, fake_mode) -> None:
        site, mm, groups = p.site, p.site.matmul, p.groups
        w_node, *b_nodes = [self._bind(gm, d, fake_mode) for d in p.derived]
        g = site.ar.group_name
        before = site.ar.result

        def produce(x, w, b=None):
            y = comm.flashcomm2_rows(x, w, groups.odp, groups.G, groups.otp, groups.m)
            return y if b is None else y + b

        with gm.graph.inserting_before(before):
            rows = sharding.size(mm.x, 0)
            shape = self._shape(sharding, site, rows)
        twin = sharding.splice(produce, [mm.x, w_node, *b_nodes], before)
        sharding.add(before, Sharded(twin, g, site.n, site.j, rows, shape))
        w = p.derived[0]
        for e in p.entries:
            e.details.update(weight_bytes_before=w.source.numel() * w.source.element_size(),
                             weight_bytes_after=w.value.numel() * w.value.element_size(),
                             wire_bytes_per_step=wire.total(wire.collective_bytes(twin.meta["tp_passes_inserted"])),
                             wire_note="all_to_all (+ OTP reduce_scatter); the all_gather is counted where SP places it")

    def _input_index(self, gm: fx.GraphModule, node: fx.Node) -> int | None:
        for i, p in enumerate(gm.graph.find_nodes(op="placeholder")):
            if p is node:
                return i
        return None

    def _bind(self, gm: fx.GraphModule, d: weights.Derived, fake_mode) -> fx.Node:
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        with gm.graph.inserting_after(last):
            node = gm.graph.placeholder(f"tp_passes_w{len(self.derived)}")
        node.meta["val"] = fake_mode.from_tensor(d.value, static_shapes=True)
        self.derived.append(d)
        return node


def _inner(config: TPConfig, gm: fx.GraphModule, example_inputs: list[Any]):
    from torch._functorch.aot_autograd import make_boxed_func

    if config.inner == "eager":
        return make_boxed_func(gm.forward)
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx_inner

        return compile_fx_inner(gm, example_inputs)
    try:
        import torchair  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "tp_passes: inner='torchair' needs torchair (Ascend), which is not installed; "
            "use inner='inductor' or 'eager'"
        ) from None
    return make_boxed_func(torchair.get_npu_backend()(gm, example_inputs))


def _config(options: dict | None) -> tuple[TPConfig, bool]:
    """From `options` and env; inside vLLM also from its `additional_config`. Also: in vLLM?"""
    vllm_config = current_vllm_config()
    if vllm_config is None:
        return TPConfig.resolve(options), False
    return config_from_vllm(vllm_config, options), True


def tp_passes_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **_: Any):
    """The torch.compile backend (entry point `torch_dynamo_backends: tp_passes`)."""
    from torch._dynamo.backends.common import aot_autograd

    config, in_vllm = _config(options)
    input_names = _source_names(gm)
    decomps = aot_decomps = None
    if config.inner == "inductor":
        from torch._inductor.decomposition import select_decomp_table

        decomps = select_decomp_table()
        # activations stay whole until the rewrites have matched them (decomposed after)
        aot_decomps = {op: fn for op, fn in decomps.items() if op not in KEEP_UNDECOMPOSED}
    tp = TPBackend(config, list(example_inputs), input_names, decomps, in_vllm)
    if config.release_weights:
        tp.owners = _owners(gm, tp.real_inputs)

    def inference(aten_gm: fx.GraphModule, inputs: list[Any]):
        graph_id = next_graph_id()
        report = GraphReport(graph_id, rank(), config=config.to_dict())
        dumper = Dumper(config.dump, config.dump_dir, graph_id)
        dumper.graph("aten", aten_gm)
        report.wire_bytes_before = wire.total(wire.collective_bytes(aten_gm))
        report.nodes = len(aten_gm.graph.nodes)
        report.matmuls_before = count_matmuls(aten_gm)
        fake_mode = detect_fake_mode(inputs)
        if dist.is_available() and dist.is_initialized():
            t0 = time.perf_counter()
            plans = tp.rewrite(aten_gm, inputs, dumper)
            report.rewrite_ms = (time.perf_counter() - t0) * 1e3
            report.entries = [e for p in plans for e in p.entries]
        if decomps is not None:
            decompose_kept(aten_gm, decomps, fake_mode)
        bound = weights.BoundWeights(tp.derived)
        weights.note_read([t for i, t in enumerate(tp.real_inputs) if id(t) in tp._reads(aten_gm)])
        compile_inputs = list(inputs) + [fake_mode.from_tensor(t, static_shapes=True) for t in bound.values]
        report.collectives = _collective_counts(aten_gm)
        report.matmuls_after = count_matmuls(aten_gm)
        report.wire_rows = wire.collective_bytes(aten_gm)
        report.wire_bytes_after = wire.total(report.wire_rows)
        compiled = _inner(config, aten_gm, compile_inputs)
        dumper.graph("final", aten_gm)
        dumper.report(report)
        record(report)
        check_groups = list(tp.module_groups.values()) if config.strict else []
        if not bound.derived:
            return compiled

        def run(args: list[Any]) -> Any:
            for pg in check_groups:  # module TP exchanges tokens: equal counts or a hang
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                agree_across_ranks(shapes, "input shapes (token counts) across a module TP group", group=pg)
            return compiled(list(args) + bound.check())

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def training(aten_gm: fx.GraphModule, inputs: list[Any]):
        report = GraphReport(next_graph_id(), rank())
        report.entries.append(Entry("all", "", False, "training graph: tp_passes rewrites inference graphs only (use torch.no_grad())"))
        record(report)
        if decomps is not None:
            decompose_kept(aten_gm, decomps, detect_fake_mode(inputs))
        return _inner(config, aten_gm, inputs)

    return aot_autograd(fw_compiler=training, inference_compiler=inference, decompositions=aot_decomps)(gm, example_inputs)


def _collective_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Collectives of the final graph by op name; vLLM's all-reduce dialects count as all_reduce."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = None
        if node.op == "call_function" and str(node.target).startswith("_c10d_functional.") and "wait" not in str(node.target):
            name = str(node.target).split(".")[1]
        elif node.op == "call_function" and as_all_reduce(node) is not None:
            name = "all_reduce"
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts
