"""Weight plan: derived weights (gathered, summed, sharded), keyed by what they depend on.

A rewrite that needs a weight in another layout asks for a `Derived` weight: a
`WeightSpec` applied to a source parameter. `materialize` makes every derived weight of
one compile, reusing a cached one only when it is still valid:

- the cache key is the spec plus the source's dtype, device, shape and data version
  (`Tensor._version`), so a cast, a `load_state_dict` or an in-place update is never
  served stale;
- whether a derived weight is rebuilt (which issues a collective for "gather" and "sum")
  is decided from every rank's cache state at once (one `all_gather_object`), never from
  what one rank happens to have cached: a hit on one rank and a miss on another would
  leave the miss waiting in a collective forever;
- the cache is keyed by an *anchor* tensor every rank has (the source, or the o_proj
  weight for a bias that exists on TP rank 0 only), held by the owner (`tp_passes.owner`)
  in a weak dictionary: nothing is set on the tensor.

`release` frees a source's storage after its derived weights exist (as FSDP does). A
released tensor keeps its metadata and is noted by the owner; it is never read again: a rebuild from
it is refused on every rank with the weight's name, and the backend refuses a graph that
would still read it.

After compiling, `BoundWeights.check` runs on every call: a source updated in place is
re-sharded locally (no collective); a source of a gathered or summed weight cannot be
refreshed without one, so it raises, and `refresh_weights()` (called on every rank) rebuilds
every derived weight of every live compiled graph. Writes through `param.data` bypass
torch's version counter: call `refresh_weights()` after them too.
"""

from __future__ import annotations

import dataclasses
import math
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from tp_passes import comm
from tp_passes.owner import owner



@dataclass(frozen=True)
class WeightSpec:
    kind: Literal["gather", "sum", "shard", "shard_halves"]
    # gather: concatenate the group's tensors along `dim`; sum: add contributions;
    # shard: my chunk along `dim` (padded); shard_halves: my chunk of each half (gate_up)
    dim: int
    group: Any  # ProcessGroup

    def key(self) -> tuple:
        """What the derived value depends on: the group's members, not its name (groups
        destroyed and created again with the same ranks derive the same values)."""
        return (self.kind, self.dim, tuple(dist.get_process_group_ranks(self.group)))

    @property
    def collective(self) -> bool:
        return self.kind in ("gather", "sum")


def state(t: torch.Tensor | None) -> tuple | None:
    """What a derived tensor depends on: dtype, device, shape, data version."""
    if t is None:
        return None
    return (str(t.dtype), str(t.device), tuple(t.shape), t._version)


def is_released(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t in owner().released


def derive(
    source: torch.Tensor | None, spec: WeightSpec, like: torch.Tensor | None = None
) -> torch.Tensor:
    """Build the derived tensor (no cache). `source` None: this rank contributes zeros like
    `like` (a bias held by one rank only). "gather" and "sum" are collectives."""
    with torch.no_grad():
        if spec.kind in ("shard", "shard_halves"):
            k, j = dist.get_world_size(spec.group), dist.get_rank(spec.group)
            src = source.detach()
            return (
                comm.shard_padded(src, spec.dim, k, j)
                if spec.kind == "shard"
                else comm.shard_halves(src, k, j)
            )
        if spec.kind == "gather":
            k = dist.get_world_size(spec.group)
            out = funcol.wait_tensor(
                funcol.all_gather_single(source.detach().contiguous(), 0, spec.group)
            )
            return torch.cat(out.chunk(k), dim=spec.dim)
        src = source if source is not None else torch.zeros_like(like)
        # a copy even when `src` is fp32 already: the all_reduce below writes into `out`
        out = src.detach().to(torch.float32, copy=True)
        dist.all_reduce(out, group=spec.group)
        return out.to(src.dtype)


@dataclass(eq=False)
class Derived:
    """One derived weight: `spec` applied to `source`, cached on `anchor`."""

    name: str  # the source's module path, for messages
    spec: WeightSpec
    source: torch.Tensor | None
    anchor: torch.Tensor
    like: torch.Tensor | None = None  # shape/dtype of the zeros a rank without source adds
    value: torch.Tensor | None = None
    made_from: tuple | None = None  # state(source) when `value` was made
    # False: still built whenever the other ranks build it (a "gather" is a collective),
    # but neither bound to the graph nor cached: a shared series' layer this rank does
    # not own (`forget`)
    keep: bool = True
    # graph input indices of source and anchor (compiled graphs: a call's own tensors)
    source_index: int | None = None
    anchor_index: int | None = None

    def _cache_key(self) -> tuple:
        return (self.spec.key(), self.name)

    def cached(self) -> tuple[bool, torch.Tensor | None]:
        """(hit, value): a hit with no value is a weight this rank made and handed to a
        shared-weight series' owner (`forget`): it needs no rebuild here."""
        hit = owner().derived.get(self.anchor, {}).get(self._cache_key()) if self.keep else None
        if hit is not None and hit[0] == (state(self.source), state(self.anchor)):
            return True, hit[1]
        return False, None

    def shape(self) -> list[int]:
        if self.value is not None:
            return list(self.value.shape)
        shape = list(self.source.shape)
        if self.spec.kind == "gather":
            shape[self.spec.dim] *= dist.get_world_size(self.spec.group)
        return shape

    def nbytes(self) -> int:
        """Bytes of the value, also where only the series' owner holds it."""
        return math.prod(self.shape()) * self.source.element_size()

    def template(self, fake_mode: Any) -> torch.Tensor:
        """A fake tensor shaped like the value (which a `forget` on an earlier compile may
        have left on the series' owner only)."""
        if self.value is not None:
            return fake_mode.from_tensor(self.value, static_shapes=True)
        with fake_mode:
            return torch.empty(self.shape(), dtype=self.source.dtype, device=self.source.device)

    def build(self) -> None:
        value = derive(self.source, self.spec, self.like)
        self.made_from = state(self.source)
        if not self.keep:
            return
        self.value = value
        store = owner().derived.setdefault(self.anchor, {})
        store[self._cache_key()] = ((self.made_from, state(self.anchor)), self.value)

    def forget(self) -> None:
        """Drop the value from now on (see `keep`). The cache remembers it was made, so a
        recompile finds it held by the series' owner instead of rebuilding it (its source
        may be freed by release_weights)."""
        key, store = self._cache_key(), owner().derived.get(self.anchor, {})
        if key in store:
            store[key] = (store[key][0], None)
        self.keep, self.value = False, None


def materialize(requests: list[Derived]) -> None:
    """Fill every request's `value`, rebuilding exactly where some rank's cache misses.

    Collective over the world group: every rank calls it with the same requests (names and
    specs are checked in the same all_gather_object that exchanges the cache hits).
    """
    from tp_passes.groups.registry import agree_across_ranks

    hits = [d.cached() for d in requests]
    unbuildable = [d.name for d, (h, _) in zip(requests, hits) if not h and is_released(d.source)]
    same = [(d.name, d.spec.kind, d.spec.dim) for d in requests]
    everyone = agree_across_ranks(same, "derived weights", ([h for h, _ in hits], unbuildable))
    lost = sorted({name for _, names in everyone for name in names})
    if lost:
        raise RuntimeError(
            "tp_passes: cannot derive weights from "
            + ", ".join(lost)
            + ": their storage was freed by release_weights=True and they changed (dtype, "
            "device, shape or an in-place update) or were never derived for this plan; "
            "reload the model, or compile without release_weights"
        )
    for i, d in enumerate(requests):
        if all(hit_bits[i] for hit_bits, _ in everyone):
            d.value, d.made_from = hits[i][1], state(d.source)
        else:
            d.build()


def release(t: torch.Tensor, name: str, why: str, module: Any, leaf: str) -> None:
    """Free `t` (module path `name`)'s storage, as FSDP does, and note it released;
    `module.<leaf>` is `t`.

    Call only for a tensor nothing reads any more, after every derived tensor exists.
    The owning module then refuses `state_dict()` and `.to()`/`.half()`/... with the
    weight's name instead of handing out or converting a tensor that holds no data.
    """
    if is_released(t):
        return
    owner().released[t] = why
    t.untyped_storage().resize_(0)
    leaves = owner().guarded.setdefault(module, {})
    if not leaves:  # first released weight of this module: install the guards once
        module.register_state_dict_post_hook(lambda mod, *_: _refuse(mod, "state_dict()"))
        # nn.Module has no hook before a conversion; its instance `_apply` is the one place
        module._apply = types.MethodType(
            lambda mod, *_a, **_k: _refuse(mod, "converting it (.to(), .half(), ...)"), module
        )
    leaves[leaf] = f"{name} ({why})"


def release_unread(
    matches: list[Any], read: set[int], owner_of: dict[int, tuple[Any, str]]
) -> None:
    """Free the full weights the applied `matches` derived from, unless a graph still reads
    them (`read`: ids) or no owning module is known to guard them (noted in the report)."""
    for m in matches:
        entry = m.entries[0] if m.entries else None
        for name, source in m.replaced_weights():
            if entry is None:
                continue
            if id(source) in read:
                entry.details.setdefault("kept_full_weights", []).append(name)
            elif id(source) not in owner_of:  # no module to guard: never a silent empty tensor
                entry.details.setdefault("kept_full_weights", []).append(
                    f"{name} (owner not found)"
                )
            else:
                release(source, name, f"{entry.rewrite} at {entry.module}", *owner_of[id(source)])


def refuse_reading_released(inputs: list[Any], names: list[str], read: set[int]) -> None:
    """Raise if a graph reads a released input (the released set and the plan are agreed
    across ranks, so this raises on every rank)."""
    bad = [n for n, t in zip(names, inputs) if is_released(t) and id(t) in read]
    if bad:
        raise RuntimeError(
            f"tp_passes: the compiled graph reads {', '.join(bad)}, whose storage was freed "
            "by release_weights=True in an earlier compile; compile with the same rewrites "
            "(config) as that compile, or reload the model"
        )


def _refuse(module: Any, what: str) -> None:
    names = ", ".join(owner().guarded[module].values())
    raise RuntimeError(
        f"tp_passes: {what} is not possible: {names} was freed by the rewrite named (with "
        "release_weights=True, or a shared-weight series that keeps it on another rank) and "
        "lives only in derived form; reload the model to get full weights"
    )


def note_read(tensors: list[torch.Tensor]) -> None:
    """Record tensors a compiled graph reads at run time: `release` must never free them."""
    read = owner().read
    for t in tensors:
        if isinstance(t, torch.Tensor):
            read[t] = True


def read_by_compiled_graphs() -> set[int]:
    return {id(t) for t in owner().read.keys()}


# -- after compile: detect updates, refresh -----------------------------------------------

@dataclass(eq=False)
class BoundWeights:
    """The derived weights one compiled graph takes as extra inputs (the kept ones, in
    placeholder order), then the windows of its shared-weight rings.

    Derived weights are looked up per call from the tensors the call passes in: Dynamo
    reuses one graph for every layer of the same code (regional compilation, or a graph
    break inside a layer), each call passing that layer's own parameters. `sets` maps the
    anchors a call brings (by identity) to the derived weights made from them; the set
    planned at compile time is the first. A call with anchors not seen before derives
    theirs (`materialize`: collective over the world, decided by which layer's tensors the
    call passes, so every rank running the same model derives in the same call).
    """

    derived: list[Derived]
    rings: list[Any] = field(default_factory=list)  # shared_weights.Ring, placeholder order
    sets: dict[tuple[int, ...], tuple[list[weakref.ref], list[Derived]]] = field(
        default_factory=dict
    )

    dropped: bool = False  # its graph was dropped by torch._dynamo.reset()

    def __post_init__(self) -> None:
        if self.derived and self.per_call:
            anchors = [d.anchor for d in self.derived]
            self.sets[tuple(map(id, anchors))] = ([weakref.ref(a) for a in anchors], self.derived)
        owner().graphs.append(weakref.ref(self))

    @property
    def per_call(self) -> bool:
        """Can the derived weights be found from a call's inputs (every anchor is one)?"""
        return all(d.anchor_index is not None for d in self.derived)

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The extra inputs as they are bound now (for the compiler's example inputs)."""
        return [d.value for d in self.derived if d.keep] + self.windows()

    def windows(self) -> list[torch.Tensor]:
        return [t for r in self.rings for t in r.windows_in_order()]

    def all_sets(self) -> list[list[Derived]]:
        """Every set of derived weights this graph holds, alive ones, in creation order."""
        self.sets = {k: v for k, v in self.sets.items() if all(r() is not None for r in v[0])}
        return [ds for _, ds in self.sets.values()] or ([self.derived] if self.derived else [])

    def wrap(self, compiled: Any, checked_groups: list[Any]) -> Any:
        """A boxed callable: `compiled` with the derived weights appended to its inputs.
        `checked_groups`: module TP groups whose ranks must bring equal input shapes
        (token counts), checked every call (strict=True) instead of hanging."""
        from tp_passes.groups.registry import agree_across_ranks

        def run(args: list[Any]) -> Any:
            for pg in checked_groups:
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                what = "input shapes (token counts) across a module TP group"
                agree_across_ranks(shapes, what, group=pg)
            out = compiled(list(args) + self.check(args) + self.windows())
            for ring in self.rings:  # one forward ran: the next starts len(series) steps on
                ring.advance()
            return out

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def drop(self) -> None:
        """Free the derived weights and ring windows; a later call raises."""
        self.dropped, self.sets = True, {}
        for d in self.derived:
            d.value = None
        for ring in self.rings:
            ring.drop()

    def for_call(self, args: list[Any]) -> list[Derived]:
        """The derived weights of the tensors `args` passes (made now if new)."""
        if self.dropped:
            raise RuntimeError(
                "tp_passes: this compiled graph was dropped by torch._dynamo.reset() (its "
                "derived weights are freed); call the model through torch.compile again"
            )
        if not self.per_call:
            return self.derived
        anchors = [args[d.anchor_index] for d in self.derived]
        hit = self.sets.get(tuple(map(id, anchors)))
        if hit is not None and all(r() is a for r, a in zip(hit[0], anchors)):
            return hit[1]
        fresh = [
            dataclasses.replace(
                d,
                name=f"{d.name} (in a call with another layer's tensors)",
                source=args[d.source_index] if d.source_index is not None else None,
                anchor=a,
                value=None,
                made_from=None,
            )
            for d, a in zip(self.derived, anchors)
        ]
        materialize(fresh)
        self.all_sets()  # drop the sets of tensors that died
        self.sets[tuple(map(id, anchors))] = ([weakref.ref(a) for a in anchors], fresh)
        return fresh

    def check(self, args: list[Any]) -> list[torch.Tensor]:
        """The values to pass for this call; re-shard sources updated in place (local, no
        collective)."""
        current = self.for_call(args)
        for d in current:
            if d.source is None or state(d.source) == d.made_from:
                continue
            if d.spec.collective or is_released(d.source):
                raise RuntimeError(
                    f"tp_passes: {d.name} changed after compile (dtype, shape or an in-place "
                    f"update) and its {d.spec.kind} over a group is baked into the compiled "
                    "graph; call tp_passes.refresh_weights() on every rank after updating weights"
                )
            d.build()
        return [d.value for d in current if d.keep]


def drop_compiled_graphs() -> None:
    """`torch._dynamo.reset()` dropped every compiled graph from Dynamo's caches (a
    ``__compiled_fn`` global in the model's module may still hold the function): free
    their derived weights and rings, so `refresh_weights()` neither rebuilds them (on
    groups that may be destroyed by now) nor keeps them alive."""
    graphs = owner().graphs
    for ref in graphs:
        if (b := ref()) is not None:
            b.drop()
    graphs.clear()


def refresh_weights() -> int:
    """Rebuild the derived weights of every live compiled graph from their sources.

    Collective: call on every rank, after updating weights (RL weight sync, a reload, a
    write through `param.data`); it also refills the windows shared-weight rings
    prefetched for the next forward. Sources freed by release_weights cannot be rebuilt: they
    are skipped while unchanged, and raise (on every rank) if they changed. Returns the
    number of derived weights rebuilt.
    """
    import gc

    gc.collect()  # graphs dropped by torch._dynamo.reset() must not count on one rank only
    graphs = owner().graphs
    live = [b for b in (ref() for ref in graphs) if b is not None]
    graphs[:] = [weakref.ref(b) for b in live]
    every = [d for b in live for ds in b.all_sets() for d in ds]
    todo = [d for d in every if not is_released(d.source)]
    lost = [d.name for d in every if is_released(d.source) and state(d.source) != d.made_from]
    if dist.is_initialized():
        from tp_passes.groups.registry import agree_across_ranks

        plan = [(d.name, d.spec.kind) for d in todo]
        plan.append([ring.names for ring in live_rings()])
        everyone = agree_across_ranks(
            plan, "refresh_weights() (derived weights of compiled graphs)", lost
        )
        lost = sorted({n for names in everyone for n in names})
    if lost:
        raise RuntimeError(
            f"tp_passes.refresh_weights: {', '.join(lost)} changed after release_weights=True "
            "freed them; their derived weights cannot be rebuilt "
            "(reload the model and compile again)"
        )
    for d in todo:
        d.build()
    for ring in live_rings():  # windows prefetched before the update hold the old weights
        ring.fill()
    return len(todo)


def register_ring(ring: Any) -> None:
    owner().rings.append(weakref.ref(ring))


def live_rings() -> list[Any]:
    """Shared-weight rings (graph and eager) still in use, in creation order."""
    refs = owner().rings
    rings = [r for r in (ref() for ref in refs) if r is not None and not r.dropped]
    refs[:] = [weakref.ref(r) for r in rings]
    return rings


def derived_values(anchor: torch.Tensor) -> list[torch.Tensor]:
    """The derived tensors cached for `anchor` (for tests and memory accounting)."""
    return [v for _, v in owner().derived.get(anchor, {}).values() if v is not None]
