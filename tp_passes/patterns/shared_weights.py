"""Shared-weight series: each layer's weight kept on one rank, broadcast ahead of its use.

The layers of a series (every `o_proj`, say) hold equal-shaped weights that are the same
on every rank of a group of k (a weight replicated across DP ranks, or FlashComm2's
full-width o_proj). Layer i is kept on group rank ``i mod k`` only; the others receive it
into a ring of ``prefetch_step + 1`` windows (`SeriesSchedule`). Per rank:
``series bytes / k + (prefetch_step + 1) x layer bytes`` instead of the whole series.

Before (layer i of L; W_i resident on every rank)::

    y_i = mm(x_i, t(W_i))

After (step s = layer s mod L; buf(s) = my W if I own it, else ring window s mod R)::

    b = broadcast_(buf(i + p), src=owner(i + p), group)   # issued before layer i computes
    w = wait_tensor(b_i)                                  # b_i issued p layers earlier
    y_i = mm(x_i, t(w))

For the last p layers the broadcast is the next forward's first layers (the ring wraps);
the graph of the next call waits on those windows. The windows are persistent graph
inputs, passed in ring order (`Ring.windows_in_order`), so every forward of any graph of
the series sees the ring where the previous one left it. The first p windows are filled
when the series is planned. Weights updated in place afterwards: `refresh_weights()`
refills the prefetched windows.

The eager twin (`share_eager`) does the same with async work handles around each
module's own forward. With FlashComm2 the series is FlashComm2's gathered weight (the
vllm-ascend "o_shared" case): every rank still gathers it (the all-gather is collective),
only the owner keeps it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from tp_passes import weights, wire
from tp_passes.fx import c10d, val
from tp_passes.groups.layout import RankLayout, SeriesSchedule
from tp_passes.groups.registry import (
    NamedGroup,
    agree_across_ranks,
    outside_compile,
    shared_weight_group,
    shared_weight_partition,
)
from tp_passes.patterns.base import GraphContext, Match, Rewrite
from tp_passes.patterns.module_tp import _linear_users, excluded
from tp_passes.report import Entry, refuse_blocked

Buffer = Any  # a tensor, or a weights.Derived whose value is the tensor (rebuilt on refresh)


def _tensor(b: Buffer) -> torch.Tensor:
    return b.value if isinstance(b, weights.Derived) else b


@dataclass(eq=False)
class Ring:
    """The runtime state of one series on one rank: owned layers, windows, and the step.

    `step` counts the layers run since the windows were filled, across forwards; it is
    the same on every rank of the group because every rank runs every step (each is a
    broadcast over the group).
    """

    names: list[str]  # layer weight names, series order
    schedule: SeriesSchedule
    group: NamedGroup
    j: int  # my rank in the group
    owned: dict[int, Buffer]  # layer -> my copy (the layers I own)
    windows: list[torch.Tensor]
    step: int = 0
    works: list[Any] = field(default_factory=list)  # eager: pending broadcast per window
    dropped: bool = False  # its compiled graph was dropped (torch._dynamo.reset())

    def __post_init__(self) -> None:
        self.works = [None] * self.schedule.windows
        weights.register_ring(self)

    def buffer(self, step: int) -> torch.Tensor:
        """Where step `step`'s layer lives on this rank: my copy, or its window."""
        layer = self.schedule.layer(step)
        if layer in self.owned:
            return _tensor(self.owned[layer])
        return self.windows[self.schedule.window(step)]

    def drop(self) -> None:
        self.dropped, self.windows, self.owned = True, [], {}

    def windows_in_order(self) -> list[torch.Tensor]:
        """The windows as a graph's placeholders see them: slot s is step `step + s`'s."""
        return [self.windows[self.schedule.window(self.step + s)] for s in range(len(self.windows))]

    def advance(self) -> None:
        """A compiled forward ran every layer once."""
        self.step += self.schedule.length

    def fill(self) -> None:
        """Broadcast the next forward's first `prefetch` layers now (collective)."""
        for w in self.windows + [_tensor(b) for b in self.owned.values()]:
            torch.ops._c10d_functional.wait_tensor(w)  # a graph's prefetch still in flight
        for i, work in enumerate(self.works):
            if work is not None:
                work.wait()
                self.works[i] = None
        for s in range(self.step, self.step + self.schedule.prefetch):
            owner = self.schedule.owner(self.schedule.layer(s))
            dist.broadcast(self.buffer(s), group=self.group.pg, group_src=owner)

    def enter(self, layer: int) -> torch.Tensor:
        """Eager: layer `layer` starts. Issue the broadcast `prefetch` steps ahead, wait
        for this layer's, return its weight."""
        s, sched = self.step, self.schedule
        if layer != sched.layer(s):
            raise RuntimeError(
                f"tp_passes shared_weights: {self.names[layer]} ran out of order; the series "
                f"expects {self.names[sched.layer(s)]} next (layers must run in series order, "
                "each once per forward)"
            )
        ahead = s + sched.prefetch
        self.works[sched.window(ahead)] = dist.broadcast(
            self.buffer(ahead),
            group=self.group.pg,
            group_src=sched.owner(sched.layer(ahead)),
            async_op=True,
        )
        if (work := self.works[sched.window(s)]) is not None:
            work.wait()
            self.works[sched.window(s)] = None
        self.step += 1
        return self.buffer(s)


def fingerprint(t: torch.Tensor) -> tuple:
    """Cheap identity of a weight's values: dtype, shape, sums and a sampled checksum."""
    x = t.detach()
    flat = x.reshape(-1)
    # a copy: numpy() on a view would pin the weight's storage (release could not free it)
    sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32, copy=True)
    return (
        str(x.dtype),
        tuple(x.shape),
        float(torch.sum(x, dtype=torch.float64)),
        float(torch.sum(x.abs(), dtype=torch.float64)),
        zlib.crc32(sample.numpy().tobytes()),
    )


def unequal_weights(
    names: list[str], tensors: list[torch.Tensor], layout: RankLayout, which: str
) -> str:
    """Collective over the world: why the series' weights are not the same on every rank
    of their group ('' if they are). Every rank gets the same answer."""
    # a weight this rank freed (release_weights) or handed to its owner on an earlier
    # compile was checked then: compared where the ranks still hold it
    mine = [None if t is None or weights.is_released(t) else fingerprint(t) for t in tensors]
    everyone = agree_across_ranks(names, "the shared-weight series", mine)
    for ranks in shared_weight_partition(layout, which):
        for i, name in enumerate(names):
            if len({everyone[r][i] for r in ranks} - {None}) > 1:
                return (
                    f"{name} differs across the ranks {sorted(ranks)} of the "
                    f"shared_weights_group={which!r} group (a tensor-parallel shard?); only "
                    "weights replicated on the group can be shared"
                )
    return ""


def make_ring(
    names: list[str],
    sched: SeriesSchedule,
    group: NamedGroup,
    like: tuple[tuple[int, ...], torch.dtype, torch.device],
    owned: dict[int, Buffer],
) -> Ring:
    """A ring of windows shaped `like` (shape, dtype, device), the first filled (collective;
    real tensors: call it outside fake mode)."""
    shape, dtype, device = like
    windows = [torch.empty(shape, dtype=dtype, device=device) for _ in range(sched.windows)]
    ring = Ring(names, sched, group, dist.get_rank(group.pg), owned, windows)
    ring.fill()
    return ring


def series_entry(series: str, ring: Ring, layer_bytes: int, wire_bytes: int | None = None) -> Entry:
    """The report entry of an applied series on this rank."""
    sched, j = ring.schedule, ring.j
    details = {
        "layers": ring.names,
        "owners": [sched.owner(i) for i in range(sched.length)],
        "group": list(ring.group.ranks),
        "prefetch_step": sched.prefetch,
        "windows": sched.windows,
        "owned_layers": sched.owned(j),
        "layer_bytes": layer_bytes,
        "weight_bytes_before": sched.length * layer_bytes,
        "weight_bytes_after": sched.resident_layers(j) * layer_bytes,
        "broadcast_bytes_per_step": (sched.length - len(sched.owned(j))) * layer_bytes,
    }
    if wire_bytes is not None:
        details["wire_bytes_per_step"] = wire_bytes
    details["saved_bytes"] = details["weight_bytes_before"] - details["weight_bytes_after"]
    if details["saved_bytes"] <= 0:  # applied as configured, but say so
        details["note"] = (
            f"saves no memory on this rank: {len(sched.owned(j))} owned layers + "
            f"{sched.windows} windows >= {sched.length} layers; a longer series, a larger "
            "group or a smaller prefetch_step saves"
        )
    return Entry("shared_weights", series, True, "", sched.k, details)


def no_saving(sched: SeriesSchedule, config: Any) -> str:
    """Why "auto" leaves a series alone: some rank would hold as many layer-sized buffers
    as without it ('' if every rank saves, or shared_weights_apply=True)."""
    if config.shared_weights_apply is True or sched.saves_everywhere():
        return ""
    return (
        f"saves no memory (shared_weights_apply='auto'): group rank 0 would hold "
        f"{len(sched.owned(0))} owned layers + {sched.windows} windows >= the series' "
        f"{sched.length} layers; a longer series, a larger group or a smaller prefetch_step "
        "saves; shared_weights_apply=True applies it anyway"
    )


def _selected(names: tuple[str, ...], path: str, config: Any) -> str | None:
    """The series name `path` (a module) belongs to, if any."""
    if excluded(path, config.include_draft_and_vision):
        return None
    return next((n for n in names if path == n or path.endswith("." + n)), None)


# -- graph path ---------------------------------------------------------------------------


@dataclass
class SeriesMatch(Match):
    """One series: the weights of the modules one `shared_weights` name selects."""

    layers: list[str] = field(default_factory=list)  # weight names ("...o_proj.weight")
    shapes: list[str] = field(default_factory=list)
    group: NamedGroup | None = None
    unowned: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # made unread

    def invariant(self) -> tuple:
        return (*super().invariant(), self.layers, self.shapes)

    def replaced_weights(self) -> list[tuple[str, torch.Tensor]]:
        return self.unowned


@dataclass
class _Layer:
    name: str
    w: fx.Node  # the placeholder the linear reads (the model's weight or a derived one)
    t: fx.Node  # its transpose
    mm: fx.Node
    derived: weights.Derived | None
    real: torch.Tensor | None


class SharedWeights(Rewrite):
    """Runs last: it takes the weight each selected linear reads after the other rewrites
    (FlashComm2's gathered weight, or the model's own)."""

    name = stage = "shared_weights"

    def wanted(self, config: Any) -> str:
        return f"modules named {list(config.shared_weights)}" if config.shared_weights else ""

    def find(self, cx: GraphContext) -> list[Match]:
        out = []
        for series in cx.config.shared_weights:
            layers, shapes = [], []
            for name, ph in zip(cx.input_names, cx.graph.find_nodes(op="placeholder")):
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and _selected((series,), module, cx.config) and ph.users:
                    layers.append(name)
                    shapes.append(f"{val(ph).dtype} {tuple(val(ph).shape)}")
            m = SeriesMatch(f"{series} series", 0, layers=layers, shapes=shapes)
            if not layers:
                m.reason = f"configured, but no module named {series!r} reads a weight here"
            elif len(layers) < 2:
                m.reason = (
                    f"this graph holds 1 layer of the series (each layer compiled on its own, "
                    "or a graph break splits the model): compile the whole model, or use "
                    "tp_passes.parallelize"
                )
            elif len(set(shapes)) > 1:
                m.reason = f"the layers' weights differ in shape or dtype: {sorted(set(shapes))}"
            out.append(m)
        return out

    def decide(self, m: SeriesMatch, facts: list[Any], cx: GraphContext) -> None:
        which = cx.config.shared_weights_group
        if not m.reason and cx.layout is None:
            m.reason = f"no rank layout for the series' group: {cx.layout_reason}"
        if not m.reason:
            m.size = len(shared_weight_partition(cx.layout, which)[0])
            sched = SeriesSchedule(len(m.layers), m.size, cx.config.prefetch_step)
            m.reason = sched.error()
            if not m.reason and (why := no_saving(sched, cx.config)):
                m.reason = why
                m.entries.append(Entry(self.name, m.module, False, why, m.size))
                return
        m.apply = not m.reason
        m.entries.append(Entry(self.name, m.module, m.apply, m.reason, m.size, blocked=not m.apply))

    def plan_weights(self, m: SeriesMatch, cx: GraphContext) -> None:
        m.group = shared_weight_group(cx.layout, cx.config.shared_weights_group)

    def _locate(self, m: SeriesMatch, cx: GraphContext) -> list[_Layer] | str:
        """Each layer's weight placeholder and linear now, in graph order (or why not)."""
        phs = {p.name: p for p in cx.graph.find_nodes(op="placeholder")}
        order = {n: i for i, n in enumerate(cx.graph.nodes)}
        layers = []
        for name in m.layers:
            kept = [
                (d, phs.get(f"tp_passes_w{i}"))
                for i, d in enumerate(cx.derived)
                if d.name == name and d.keep
            ]
            d, w = kept[0] if kept else (None, None)
            if d is not None and d.spec.kind != "gather":
                return f"{name} was resharded by another rewrite ({d.spec.kind} over a group)"
            if d is None:
                i = cx.input_names.index(name)
                w = list(cx.graph.find_nodes(op="placeholder"))[i]
            users = _linear_users(w) if w is not None else []
            if len(users) != 1 or len(w.users) != 1:
                return f"{name} is not read by exactly one linear (x @ w.T) in the graph"
            real = d.value if d is not None else cx.real(w)
            if real is None and d is None:
                return f"{name} has no real tensor at compile time"
            mm = users[0][0]
            layers.append(_Layer(name, w, next(iter(w.users)), mm, d, real))
        return sorted(layers, key=lambda lay: order[lay.mm])

    def replace(self, m: SeriesMatch, cx: GraphContext) -> None:
        layers = self._locate(m, cx)
        which = cx.config.shared_weights_group
        if isinstance(layers, list):  # the graph is the same on every rank, so is `layers`
            names = [lay.name for lay in layers]
            reals = [lay.real for lay in layers]
            why = outside_compile(unequal_weights, names, reals, cx.layout, which)
        else:
            why = layers
        entry = m.entries[0]  # the driver's report holds this object: update it in place
        if why:
            m.apply, m.reason = False, why
            entry.applied, entry.reason, entry.blocked = False, why, True
            refuse_blocked(m.entries, cx.config.strict)
            return
        sched = SeriesSchedule(len(layers), m.size, cx.config.prefetch_step)
        j = dist.get_rank(m.group.pg)
        owned = {i: lay.derived or lay.real for i, lay in enumerate(layers) if sched.owner(i) == j}
        v = val(layers[0].w)  # a rank may own no layer (k > layers): shape from the graph
        like = (tuple(v.shape), v.dtype, v.device)
        ring = outside_compile(make_ring, names, sched, m.group, like, owned)
        inserted = self._rewire(cx, layers, ring)
        for i, lay in enumerate(layers):
            if i in owned:
                continue
            if lay.derived is not None:  # gathered on every rank, kept on the owner only
                lay.derived.forget()
                cx.graph.erase_node(lay.w)
            else:
                m.unowned.append((lay.name, lay.real))
        cx.rings.append(ring)
        layer_bytes = v.numel() * v.element_size()
        wire_bytes = wire.total(wire.collective_bytes(inserted))
        entry.details.update(series_entry(m.module, ring, layer_bytes, wire_bytes).details)

    def _rewire(self, cx: GraphContext, layers: list[_Layer], ring: Ring) -> list[fx.Node]:
        """Windows as new inputs; broadcast + wait before each linear (see module doc)."""
        sched, g = ring.schedule, ring.group.group_name
        last = list(cx.graph.find_nodes(op="placeholder"))[-1]
        slots = []
        for s, window in enumerate(ring.windows):
            with cx.graph.inserting_after(last):
                last = cx.graph.placeholder(f"tp_passes_ring{len(cx.rings)}_{s}")
            last.meta["val"] = cx.fake_mode.from_tensor(window, static_shapes=True)
            slots.append(last)

        def buf(step: int) -> fx.Node:
            layer = sched.layer(step)
            return layers[layer].w if layer in ring.owned else slots[sched.window(step)]

        issued: dict[int, fx.Node] = {}
        inserted = []
        for i, lay in enumerate(layers):
            ahead = i + sched.prefetch
            with cx.graph.inserting_before(lay.mm):
                target = buf(ahead)
                b = cx.graph.call_function(
                    c10d.broadcast_.default, (target, sched.owner(sched.layer(ahead)), g)
                )
                b.meta["val"] = val(target)
                issued[ahead] = b
                ready = issued.get(i, buf(i))  # the first p: filled before this call
                w = cx.graph.call_function(c10d.wait_tensor.default, (ready,))
                w.meta["val"] = val(ready)
                t = cx.graph.call_function(lay.t.target, (w, *lay.t.args[1:]), dict(lay.t.kwargs))
                t.meta = dict(lay.t.meta)
            lay.mm.replace_input_with(lay.t, t)
            cx.graph.erase_node(lay.t)
            inserted += [b, w]
        return inserted


# -- eager twin ----------------------------------------------------------------------------


def find_eager(model: nn.Module, config: Any) -> dict[str, list[str]]:
    """Series name -> module paths (model order) of modules with a 2-D weight it selects."""
    out: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        w = getattr(module, "weight", None)
        series = _selected(config.shared_weights, path, config) if config.shared_weights else None
        if series is not None and isinstance(w, torch.Tensor) and w.dim() == 2:
            out.setdefault(series, []).append(path)
    return out


def share_eager(
    model: nn.Module,
    config: Any,
    layout: RankLayout | None,
    layout_why: str,
    found: dict[str, list[str]],
    hosts: Mapping[str, str] | None = None,
) -> list[Entry]:
    """Apply every series `found` (agreed across ranks) to the modules: the owner keeps
    its layers' weights, the others' are freed; each module's forward enters the ring.
    Run after the other eager rewrites (a FlashComm2 layer's weight is its gathered block).

    `hosts`: {layer path: module path} for layers whose weight another module's forward
    reads in place of theirs (a parent rewritten by FlashComm2): that forward enters the
    ring."""
    entries = []
    which = config.shared_weights_group
    for series, paths in found.items():
        modules = [model.get_submodule(p) for p in paths]
        runs = [(hosts or {}).get(p, p) for p in paths]
        ws = [mod.weight for mod in modules]
        shapes = {(str(w.dtype), tuple(w.shape)) for w in ws}
        k = len(shared_weight_partition(layout, which)[0]) if layout is not None else 0
        why = (
            (f"no rank layout for the series' group: {layout_why}" if layout is None else "")
            or (
                f"the layers' weights differ in shape or dtype: {sorted(shapes)}"
                if len(shapes) > 1
                else ""
            )
            or SeriesSchedule(len(paths), k, config.prefetch_step).error()
            or (
                f"several of its layers are run by one module's forward: {sorted(runs)}"
                if len(set(runs)) < len(runs)
                else ""
            )
        )
        names = [f"{p}.weight" for p in paths]
        name = f"{series} series"
        if not why and (skip := no_saving(SeriesSchedule(len(paths), k, config.prefetch_step), config)):
            entries.append(Entry("shared_weights", name, False, skip, k))
            continue
        if not why:
            why = unequal_weights(names, ws, layout, which)
        if why:
            entries.append(Entry("shared_weights", name, False, why, k, blocked=True))
            refuse_blocked(entries[-1:], config.strict)
            continue
        sched = SeriesSchedule(len(paths), k, config.prefetch_step)
        group = shared_weight_group(layout, which)
        j = dist.get_rank(group.pg)
        owned = {i: ws[i] for i in sched.owned(j)}
        like = (tuple(ws[0].shape), ws[0].dtype, ws[0].device)
        ring = make_ring(names, sched, group, like, owned)
        for i, (module, run) in enumerate(zip(modules, runs)):
            _enter_ring(module, model.get_submodule(run), ring, i)
            if i not in owned:
                weights.release(ws[i], names[i], f"shared_weights at {name}", module, "weight")
        entries.append(series_entry(name, ring, ws[0].numel() * ws[0].element_size()))
    return entries


def _enter_ring(module: nn.Module, host: nn.Module, ring: Ring, i: int) -> None:
    """`host`'s forward (the module's own, or the parent's that reads its weight), run
    with the module's weight from the ring."""
    inner = host.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # its async broadcasts cannot be traced
            raise RuntimeError(
                "tp_passes: a model with an eager shared-weight series (tp_passes.parallelize) "
                "cannot be compiled; compile the original model with backend='tp_passes' and "
                "the same shared_weights instead"
            )
        w = ring.enter(i)
        params = module._parameters
        saved = params["weight"]
        params["weight"] = w  # read by the module's own forward as self.weight
        try:
            return inner(*args, **kwargs)
        finally:
            params["weight"] = saved

    host.forward = forward
