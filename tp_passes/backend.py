"""The driver: find -> agree -> decide -> rewrite -> lower -> inner compile.

    torch.compile(model, backend="tp_passes", options={"flashcomm2": 1, "inner": "eager"})

`rewrite_graph` runs the registered rewrites (`tp_passes.patterns.REWRITES`) on any ATen
`fx.GraphModule`; it knows no rewrite by name. `tp_passes_backend` wires it into
torch.compile: Dynamo's graph goes through aot_autograd (functionalized ATen inference
graph), the rewritten graph goes to the inner compiler, and a small runtime wrapper binds
the derived weights (extra graph inputs) on every call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
import torch.fx as fx
from torch._guards import detect_fake_mode

from tp_passes import inputs as graph_inputs
from tp_passes import weights
from tp_passes.config import TPConfig, resolve_host
from tp_passes.groups.layout import RankLayout
from tp_passes.groups.registry import agree_across_ranks, describe_layout, outside_compile
from tp_passes.lowering import (
    KEEP_UNDECOMPOSED,
    decompose_kept,
    inductor_options,
    inner_compile,
)
from tp_passes.patterns import REWRITES, GraphContext, Match, Rewrite, find_sites
from tp_passes.patterns.base import nothing_matched
from tp_passes.report import (
    Dumper,
    Entry,
    GraphReport,
    count_matmuls,
    next_graph_id,
    rank,
    record,
    refuse_blocked,
)

Found = list[tuple[Rewrite, list[Match]]]


@dataclass
class Rewritten:
    """What `rewrite_graph` did to a graph."""

    entries: list[Entry]
    matches: list[Match]  # applied ones
    derived: list[weights.Derived]  # extra graph inputs, in placeholder order
    checked_groups: dict[str, Any] = field(default_factory=dict)  # equal T per call (strict)
    layout: str = ""
    rings: list[Any] = field(default_factory=list)  # shared-weight rings, bound after `derived`
    # ms per rewrite family (find, decide, replace, finish) and "common" (sites, agreement)
    ms: dict[str, float] = field(default_factory=dict)


def _agree(cx: GraphContext, found: Found) -> list[list[list[Any]]]:
    """One all_gather_object: the plan's inputs must be equal on every rank; returns every
    rank's `local()` fact per match, and infers the rank layout from every rank's TP groups.

    Runs on every compile, also when this rank found nothing: a rank that skipped it
    would leave the others waiting (configs that differ raise here instead).
    """
    invariant = {
        "config": cx.config.to_dict(),
        "matches": [[m.invariant() for m in ms] for _, ms in found],
    }  # not which weights this rank freed: a shared-weight series frees different ones
    local = (
        [[m.local() for m in ms] for _, ms in found],
        sorted({s.ranks for s in cx.sites if s.n > 1}),
    )
    everyone = agree_across_ranks(invariant, "the rewrite plan (config or matched graph)", local)
    cx.layout, cx.layout_reason = RankLayout.infer([groups for _, groups in everyone])
    return [
        [[e[0][r][i] for e in everyone] for i in range(len(ms))] for r, (_, ms) in enumerate(found)
    ]


def _plan_weights(cx: GraphContext, applied: list[tuple[Rewrite, Match]]) -> None:
    """Groups and derived weights, in plan order (collective; same on every rank)."""
    for rw, m in applied:
        rw.plan_weights(m, cx)
    requests = [d for _, m in applied for d in m.derived]
    if requests:  # the plan is agreed: every rank returns here together
        weights.materialize(requests)


def rewrite_graph(
    gm: fx.GraphModule,
    config: TPConfig,
    inputs: list[Any] | None = None,
    input_names: list[str] | None = None,
    *,
    decompositions: dict | None = None,
    refused: dict[str, str] | None = None,
    dumper: Dumper | None = None,
    owners: list[tuple[Any, str] | None] | None = None,
    rewrites: Sequence[Rewrite] = REWRITES,
) -> Rewritten:
    """Apply every registered rewrite `config` enables to `gm` in place (collective: every
    rank of the graph's groups calls it). `inputs`: real tensors of the graph inputs
    (weights; default: the placeholders' fake values, so weight rewrites skip).
    `input_names`: their module paths. `refused`: rewrite name -> why the host cannot run
    it. `owners`: (module, attribute) per input, for `release_weights`. `rewrites`: the
    registry to run (default `tp_passes.patterns.REWRITES`), in priority order."""
    phs = list(gm.graph.find_nodes(op="placeholder"))
    fakes = [p.meta.get("val") for p in phs]
    cx = GraphContext(
        gm,
        config,
        list(fakes if inputs is None else inputs),
        list(input_names or [p.name for p in phs]),
        detect_fake_mode(fakes),
        decompositions,
    )
    dumper = dumper or Dumper(False, "", 0)
    clock = _Clock()
    with clock("common"):
        cx.sites = find_sites(gm, cx.input_names)
    found: Found = []
    for rw in rewrites:
        with clock(rw.name):
            found.append((rw, rw.find(cx)))
    for rw, ms in found:
        for m in ms:  # the host's reason first: its own plan took this rewrite
            m.reason = (refused or {}).get(rw.name, "") or m.reason
    with clock("common"):
        facts = outside_compile(_agree, cx, found)
    for (rw, ms), per_match in zip(found, facts):
        with clock(rw.name):
            for m, f in zip(ms, per_match):
                rw.decide(m, f, cx)
    entries = [e for _, ms in found for m in ms for e in m.entries]
    # a graph with no all-reduce and no matmul (a piece between graph breaks) is not where
    # a rewrite was expected: reported, but no error under strict
    busy = bool(cx.sites) or count_matmuls(gm) > 0
    handled = {rw.name for rw, ms in found if ms} | set(refused or {})  # refused: the host's
    entries += nothing_matched(rewrites, config, handled, "this graph", blocked=busy)
    refuse_blocked(entries, config.strict)
    applied = [(rw, m) for rw, ms in found for m in ms if m.apply]
    outside_compile(_plan_weights, cx, applied)
    for i, (rw, ms) in enumerate(found):
        with clock(rw.name):
            for m in ms:
                if m.apply:
                    rw.replace(m, cx)
        stage_ends = i + 1 == len(found) or found[i + 1][0].stage != rw.stage
        if stage_ends and any(r.stage == rw.stage for r, _ in applied):
            dumper.graph(f"after_{rw.stage}", gm)
    for rw, ms in found:
        with clock(rw.name):
            stage = rw.finish(cx, ms)
        if stage:
            dumper.graph(f"after_{stage}", gm)
    with clock("common"):
        gm.graph.lint()
        gm.recompile()
    read = cx.read_inputs()
    weights.refuse_reading_released(cx.inputs, cx.input_names, read)
    if config.release_weights:
        owner_of = {id(t): o for t, o in zip(cx.inputs, owners or []) if o is not None}
        weights.release_unread(
            [m for _, m in applied], read | weights.read_by_compiled_graphs(), owner_of
        )
    return Rewritten(
        entries,
        [m for _, m in applied],
        cx.derived,
        cx.checked_groups,
        describe_layout(cx.layout, cx.layout_reason),
        cx.rings,
        {k: round(v, 2) for k, v in clock.ms.items()},
    )


class _Clock:
    """Milliseconds spent per label (`with clock("flashcomm2"): ...`), for the report."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[label] = self.ms.get(label, 0.0) + (time.perf_counter() - t0) * 1e3


def tp_passes_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **_: Any
):
    """The torch.compile backend (entry point `torch_dynamo_backends: tp_passes`)."""
    from torch._dynamo.backends.common import aot_autograd

    host = resolve_host(options)
    config = host.config
    names = graph_inputs.input_names(gm)
    real = list(example_inputs)
    owners = graph_inputs.input_owners(gm, real) if config.release_weights else None
    decomps = aot_decomps = None
    if config.inner == "inductor":
        from torch._inductor.decomposition import select_decomp_table

        decomps = select_decomp_table()
        # activations stay whole until the rewrites have matched them (decomposed after)
        aot_decomps = {op: fn for op, fn in decomps.items() if op not in KEEP_UNDECOMPOSED}

    def inference(aten_gm: fx.GraphModule, inputs: list[Any]):
        flat_names, flat_real, flat_owners = graph_inputs.aten_inputs(aten_gm, names, real, owners)
        report = GraphReport(next_graph_id(), rank(), config=config.to_dict())
        dumper = Dumper(config.dump, config.dump_dir, report.graph_id)
        dumper.graph("aten", aten_gm)
        report.measure_before(aten_gm)
        fake_mode = detect_fake_mode(inputs)
        done = Rewritten([], [], [])
        if dist.is_available() and dist.is_initialized():
            t0 = time.perf_counter()
            done = rewrite_graph(
                aten_gm,
                config,
                flat_real,
                flat_names,
                decompositions=decomps,
                refused=dict(host.refused),
                dumper=dumper,
                owners=flat_owners,
            )
            report.rewrite_ms = (time.perf_counter() - t0) * 1e3
            report.rewrite_ms_by_family = done.ms
            report.entries, report.layout = done.entries, done.layout
        if decomps is not None:
            decompose_kept(aten_gm, decomps, fake_mode)
        bound = weights.BoundWeights(done.derived, done.rings)
        phs = list(aten_gm.graph.find_nodes(op="placeholder"))
        weights.note_read([t for t, p in zip(flat_real, phs) if p.users])
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in bound.inputs]
        report.measure_after(aten_gm)
        compiled = inner_compile(config, aten_gm, list(inputs) + fakes)
        dumper.graph("final", aten_gm)
        dumper.report(report)
        record(report)
        checked = list(done.checked_groups.values()) if config.strict else []
        return bound.wrap(compiled, checked) if bound.derived or bound.rings else compiled

    def training(aten_gm: fx.GraphModule, inputs: list[Any]):
        report = GraphReport(next_graph_id(), rank())
        why = "training graph: tp_passes rewrites inference graphs only (use torch.no_grad())"
        report.entries.append(Entry("all", "", False, why))
        record(report)
        if decomps is not None:
            decompose_kept(aten_gm, decomps, detect_fake_mode(inputs))
        return inner_compile(config, aten_gm, inputs)

    with inductor_options(host.inductor_options):
        return aot_autograd(
            fw_compiler=training, inference_compiler=inference, decompositions=aot_decomps
        )(gm, example_inputs)


# torch._dynamo.reset() calls the backend's `reset` (through torch.compile's wrapper)
tp_passes_backend.reset = weights.drop_compiled_graphs  # type: ignore[attr-defined]
