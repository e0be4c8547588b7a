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

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._guards import detect_fake_mode

from tp_passes import comm, weights, wire
from tp_passes.config import TPConfig
from tp_passes.fx import AllReduce, Matmul, as_all_reduce, describe_producer, find_all_reduces, match_matmul, module_of, path_from_source, placeholder_of, val
from tp_passes.groups.registry import agree_across_ranks, flashcomm2_groups, module_tp_group
from tp_passes.lowering import mm_reduce_scatter_impl
from tp_passes.patterns.module_tp import ModuleMatch, find_module_matches, selects
from tp_passes.patterns.flashcomm2 import FlashComm2Groups, flashcomm2_size_error
from tp_passes.patterns.sequence_parallel import Sharded, TokenSharding
from tp_passes.report import Dumper, Entry, GraphReport, next_graph_id, rank, record
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

    def invariant(self) -> tuple:
        """What must be equal on every rank (bias placement may differ)."""
        w = val(self.matmul.weight).shape if self.matmul else None
        return (self.module, self.n, str(w), self.matmul is not None)


@dataclass
class Plan:
    site: Site | None  # None for module TP plans (no all-reduce involved)
    producer: str  # "flashcomm2" | "reduce_scatter" | "keep" | "module_tp" | "skip"
    fuse: bool = False
    any_bias: bool = False
    entries: list[Entry] = field(default_factory=list)
    module: ModuleMatch | None = None


def _source_names(gm: fx.GraphModule) -> list[str]:
    """Module path of every ATen graph input, in aot_autograd's order."""
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        src = getattr(arg, "source", None) if arg is not None else None
        name = getattr(src, "name", "") if src is not None else ""
        names.append(path_from_source(name() if callable(name) else name) if name else node.name)
    return names


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
        # full weights the rewritten graph no longer reads; freed only once every derived
        # weight exists (tied weights are read by two rewrites)
        self.release_after_rewrite: list[torch.Tensor] = []

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
            out.append(Site(ar, mm, module, widx if mm else None, pg.size(), pg.rank()))
        return out

    def agree(self, sites: list[Site], modules: list[ModuleMatch]) -> list[bool]:
        """Check the plan's inputs are equal on all ranks; return any-rank-has-bias per site."""
        local = [s.matmul is not None and s.matmul.bias is not None for s in sites]
        invariant = {
            "config": self.config.to_dict(),
            "sites": [s.invariant() for s in sites],
            "modules": [m.invariant() for m in modules],
        }
        biases = agree_across_ranks(invariant, "the rewrite plan (config or matched graph)", local)
        return [any(b[i] for b in biases) for i in range(len(sites))]

    def plan(self, sites: list[Site], any_bias: list[bool]) -> list[Plan]:
        cfg = self.config
        plans = []
        for site, bias in zip(sites, any_bias):
            p = Plan(site, "keep", any_bias=bias)
            e = lambda rw, ok, why="", blocked=False, **d: p.entries.append(  # noqa: E731
                Entry(rw, site.module, ok, why, site.n, {"dialect": site.ar.dialect, **d}, blocked)
            )
            sp_on = cfg.sequence_parallel in (True, "auto")
            fuse_on = cfg.fuse_mm_reduce_scatter in (True, "auto")
            if site.n == 1:
                e("sequence_parallel", False, "all-reduce over a group of size 1")
                plans.append(p)
                continue
            if cfg.flashcomm2 and selects(cfg, "oproj_tp", site.module):
                why = self._flashcomm2_blocker(site)
                if why:
                    e("flashcomm2", False, why, blocked=True)
                else:
                    p.producer = "flashcomm2"
                    e("flashcomm2", True, m=cfg.flashcomm2)
            if p.producer == "keep" and (sp_on or (cfg.fuse_mm_reduce_scatter is True and site.matmul)):
                p.producer = "reduce_scatter"
                p.fuse = fuse_on and site.matmul is not None
                if sp_on:
                    e("sequence_parallel", True)
                if site.matmul is not None:
                    if not fuse_on:
                        e("mm_reduce_scatter", False, "fuse_mm_reduce_scatter=False")
                    else:
                        e("mm_reduce_scatter", True)
            elif p.producer == "keep" and not p.entries:
                e("sequence_parallel", False, "sequence_parallel=False")
            plans.append(p)
        return plans

    def _module_tp_plans(self, modules: list[ModuleMatch]) -> list[Plan]:
        plans = []
        for m in modules:
            p = Plan(None, "skip" if m.reason else "module_tp", module=m)
            ok = not m.reason
            p.entries.append(Entry(m.kind, m.module, ok, m.reason or
                                   "needs equal token counts across the group (checked per call with strict=True)",
                                   m.k, blocked=not ok))
            plans.append(p)
        return plans

    def _apply_module_tp(self, gm, sharding: TokenSharding, p: Plan, extra, fake_mode, tp: int) -> None:
        m = p.module
        names = [self.input_names[self._input_index(gm, w)] for w in m.weights]
        reals = [self.real_inputs[self._input_index(gm, w)] for w in m.weights]
        group, shards = outside_compile(self._module_shards, m, reals, tp)
        g, k, j = group.group_name, m.k, dist.get_rank(group.pg)
        nodes = [self._bind(gm, t, extra, fake_mode, f"{m.kind}_w{len(extra)}") for t in shards]
        args = [m.x, *nodes] + ([m.bias] if m.bias is not None else [])
        if m.kind == "oproj_tp":
            fn = lambda x, w, b=None: comm.oproj_dp(x, w, g, k) + (0 if b is None else b)  # noqa: E731
        elif m.kind == "embedding_tp":
            fn = lambda ids, w: comm.embedding_dp(ids.reshape(-1), w, j, g, k).reshape(*ids.shape, -1)  # noqa: E731
        elif m.kind == "lmhead_tp":
            vocab = val(m.weights[0]).shape[0]
            fn = lambda h, w: comm.lmhead_dp(h, w, g, k, vocab)  # noqa: E731
        elif len(shards) == 2:  # merged gate_up, sharded half by half
            fn = lambda x, gu, d: comm.mlp_dp(x, *gu.chunk(2), d, g, k)  # noqa: E731
        else:
            fn = lambda x, gate, up, d: comm.mlp_dp(x, gate, up, d, g, k)  # noqa: E731
        out = sharding.splice(fn, args, m.out)
        m.out.replace_all_uses_with(out)
        self.module_groups[group.group_name] = group.pg
        before = sum(t.numel() * t.element_size() for t in reals)
        p.entries[0].details.update(
            weights=names, weight_bytes_before=before,
            weight_bytes_after=sum(t.numel() * t.element_size() for t in shards),
            wire_bytes_per_step=wire.total(wire.collective_bytes(out.meta["tp_passes_inserted"])),
        )
        self.release_after_rewrite.extend(reals)

    def _module_shards(self, m: ModuleMatch, reals: list[torch.Tensor], tp: int) -> tuple:
        group = module_tp_group(m.k, tp)
        specs = {"oproj_tp": [("shard", 1)], "embedding_tp": [("shard", 0)], "lmhead_tp": [("shard", 0)],
                 "mlp_tp": [("shard_halves", 0), ("shard", 1)] if len(reals) == 2
                 else [("shard", 0), ("shard", 0), ("shard", 1)]}[m.kind]
        shards = [weights.materialize(t, weights.WeightSpec(kind, dim, group.pg)) for t, (kind, dim) in zip(reals, specs)]
        return group, shards

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

    # -- rewriting ------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, example_inputs: list[Any], dumper: Dumper) -> tuple[list[Plan], list[Any]]:
        fake_mode = detect_fake_mode(example_inputs)
        sites = self.sites(gm)
        reduced = {s.module for s in sites if s.module}
        modules = find_module_matches(gm, self.input_names, self.config, reduced)
        if self.in_vllm:
            for m in modules:
                m.reason = m.reason or VLLM_MODULE_TP
        if not sites and not modules:
            return [], []
        any_bias = outside_compile(self.agree, sites, modules)
        plans = self.plan(sites, any_bias)
        plans += self._module_tp_plans(modules)
        blocked = [e for p in plans for e in p.entries if e.blocked]
        if self.config.strict and blocked:  # same on every rank: decided from agreed inputs
            raise RuntimeError(
                "tp_passes (strict): rewrites that cannot be applied safely: "
                + "; ".join(f"{e.rewrite} at {e.module or '?'}: {e.reason}" for e in blocked)
            )
        sharding = TokenSharding(gm, fake_mode, self.decompositions)
        extra: list[torch.Tensor] = []
        tp = max((s.n for s in sites), default=1)
        for p in plans:
            if p.producer == "module_tp":
                self._apply_module_tp(gm, sharding, p, extra, fake_mode, tp)
        if any(p.producer == "module_tp" for p in plans):
            dumper.graph("after_module_tp", gm)
        for p in plans:
            if p.producer == "flashcomm2":
                self._produce_flashcomm2(gm, sharding, p, extra, fake_mode)
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
        if self.config.release_weights:
            weights.release(self.release_after_rewrite)
        return plans, extra

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

    def _produce_flashcomm2(self, gm, sharding: TokenSharding, p: Plan, extra, fake_mode) -> None:
        site, mm = p.site, p.site.matmul
        groups, w_block, bias, weight_bytes_before = outside_compile(self._flashcomm2_weights, gm, p)
        w_node = self._bind(gm, w_block, extra, fake_mode, f"fc2_w_{len(extra)}")
        b_node = self._bind(gm, bias, extra, fake_mode, f"fc2_b_{len(extra)}") if bias is not None else None
        g = site.ar.group_name
        before = site.ar.result

        def produce(x, w, b=None):
            y = comm.flashcomm2_rows(x, w, groups.odp, groups.G, groups.otp, groups.m)
            return y if b is None else y + b

        with gm.graph.inserting_before(before):
            rows = sharding.size(mm.x, 0)
            shape = self._shape(sharding, site, rows)
        twin = sharding.splice(produce, [mm.x, w_node] + ([b_node] if b_node is not None else []), before)
        sharding.add(before, Sharded(twin, g, site.n, site.j, rows, shape))
        for e in p.entries:
            e.details.update(weight_bytes_before=weight_bytes_before,
                             weight_bytes_after=w_block.numel() * w_block.element_size(),
                             wire_bytes_per_step=wire.total(wire.collective_bytes(twin.meta["tp_passes_inserted"])),
                             wire_note="all_to_all (+ OTP reduce_scatter); the all_gather is counted where SP places it")

    def _flashcomm2_weights(self, gm: fx.GraphModule, p: Plan) -> tuple:
        """Groups and derived weights for one FlashComm2 match (collective, real tensors)."""
        site, mm = p.site, p.site.matmul
        w_real = self.real_inputs[site.weight_index]
        groups = self._flashcomm2_groups(site)
        w_block = weights.materialize(w_real, weights.WeightSpec("gather", 1, _group(groups.odp)))
        bias = None
        if p.any_bias:  # rank 0's bias, summed with zeros from the others: one bias everywhere
            b_idx = self._input_index(gm, mm.bias) if mm.bias is not None else None
            b_real = self.real_inputs[b_idx] if b_idx is not None else None
            like = torch.zeros(w_real.shape[0], dtype=w_real.dtype)
            bias = weights.materialize(b_real, weights.WeightSpec("sum", 0, _group(site.ar.group_name)), like)
        weight_bytes_before = w_real.numel() * w_real.element_size()
        self.release_after_rewrite.append(w_real)
        return groups, w_block, bias, weight_bytes_before

    def _flashcomm2_groups(self, site: Site) -> FlashComm2Groups:
        m, n = self.config.flashcomm2, site.n
        otp, odp = flashcomm2_groups(_group(site.ar.group_name), m)
        return FlashComm2Groups(otp.group_name, odp.group_name, m, n // m, site.j // (n // m))

    def _input_index(self, gm: fx.GraphModule, node: fx.Node) -> int | None:
        for i, p in enumerate(gm.graph.find_nodes(op="placeholder")):
            if p is node:
                return i
        return None

    def _bind(self, gm: fx.GraphModule, tensor: torch.Tensor, extra: list, fake_mode, name: str) -> fx.Node:
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        with gm.graph.inserting_after(last):
            node = gm.graph.placeholder(name)
        node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        extra.append(tensor)
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
    decomps = None
    if config.inner == "inductor":
        from torch._inductor.decomposition import select_decomp_table

        decomps = select_decomp_table()
    tp = TPBackend(config, list(example_inputs), input_names, decomps, in_vllm)

    def inference(aten_gm: fx.GraphModule, inputs: list[Any]):
        graph_id = next_graph_id()
        report = GraphReport(graph_id, rank(), config=config.to_dict())
        dumper = Dumper(config.dump, config.dump_dir, graph_id)
        dumper.graph("aten", aten_gm)
        extra: list[torch.Tensor] = []
        report.wire_bytes_before = wire.total(wire.collective_bytes(aten_gm))
        report.nodes = len(aten_gm.graph.nodes)
        if dist.is_available() and dist.is_initialized():
            t0 = time.perf_counter()
            plans, extra = tp.rewrite(aten_gm, inputs, dumper)
            report.rewrite_ms = (time.perf_counter() - t0) * 1e3
            report.entries = [e for p in plans for e in p.entries]
        fake_mode = detect_fake_mode(inputs)
        compile_inputs = list(inputs) + [fake_mode.from_tensor(t, static_shapes=True) for t in extra]
        report.collectives = _collective_counts(aten_gm)
        report.wire_rows = wire.collective_bytes(aten_gm)
        report.wire_bytes_after = wire.total(report.wire_rows)
        compiled = _inner(config, aten_gm, compile_inputs)
        dumper.graph("final", aten_gm)
        dumper.report(report)
        record(report)
        check_groups = list(tp.module_groups.values()) if config.strict else []
        if not extra:
            return compiled

        def run(args: list[Any]) -> Any:
            for pg in check_groups:  # module TP exchanges tokens: equal counts or a hang
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                agree_across_ranks(shapes, "input shapes (token counts) across a module TP group", group=pg)
            return compiled(list(args) + extra)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def training(aten_gm: fx.GraphModule, inputs: list[Any]):
        report = GraphReport(next_graph_id(), rank())
        report.entries.append(Entry("all", "", False, "training graph: tp_passes rewrites inference graphs only (use torch.no_grad())"))
        record(report)
        return _inner(config, aten_gm, inputs)

    return aot_autograd(fw_compiler=training, inference_compiler=inference, decompositions=decomps)(gm, example_inputs)


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
