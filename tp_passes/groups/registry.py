"""Process-group creation: turn a `RankLayout` + `TPConfig` into named groups.

Creation is collective: every rank calls `new_group` for every rank list, in the same
order, or the ranks that skipped one deadlock the rest. So the plan of what to create is
computed from (config, layout) alone, checked equal on every rank first, and then
executed in one deterministic loop. A rank list already created is reused, so groups of
equal ranks exist once whatever names point at them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from tp_passes.config import TPConfig
from tp_passes.fx import dialects
from tp_passes.groups.layout import Groups, RankLayout
from tp_passes.owner import owner


@dataclass(frozen=True)
class NamedGroup:
    """One named group as this rank sees it."""

    name: str
    ranks: tuple[int, ...]  # the ranks of this rank's group
    pg: Any  # torch ProcessGroup (vLLM: the coordinator's device group)
    coordinator: Any = None  # vLLM GroupCoordinator when created inside vLLM

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def group_name(self) -> str:
        """The name functional collectives take (`torch.distributed` group_name)."""
        return self.pg.group_name


def required_groups(config: TPConfig, layout: RankLayout) -> dict[str, Groups]:
    """Name -> rank lists of every group `config` needs, in creation order."""
    plan: dict[str, Groups] = {
        "world": layout.world_groups(),
        "tp": layout.tp_groups(),
        "dp": layout.dp_groups(),
        "pp": layout.pp_groups(),
    }
    fields = {
        "otp": "oproj_tp",
        "lmheadtp": "lmhead_tp",
        "embedtp": "embedding_tp",
        "mlptp": "mlp_tp",
    }
    try:
        for name, k in config.module_tp_sizes().items():
            field_name = f"TPConfig.{fields[name]}={k}"
            plan[name] = layout.module_tp_groups(k)
        if config.flashcomm2:
            field_name = f"TPConfig.flashcomm2={config.flashcomm2}"
            plan["fc2_otp"], plan["fc2_odp"] = layout.flashcomm2_groups(config.flashcomm2)
    except ValueError as e:
        raise ValueError(f"tp_passes: {field_name} does not fit the layout: {e}") from None
    if config.shared_weights:
        which = config.shared_weights_group
        plan[f"shared_{which}"] = shared_weight_partition(layout, which)
    return plan


def shared_weight_partition(layout: RankLayout, which: str) -> Groups:
    """The rank lists a shared-weight series is spread over (`TPConfig.shared_weights_group`)."""
    return {
        "stage": layout.shared_weight_groups,
        "dp": layout.dp_groups,
        "tp": layout.tp_groups,
    }[which]()


def default_backend() -> str:
    """hccl on Ascend, nccl on CUDA, gloo otherwise."""
    if hasattr(torch, "npu") and torch.npu.is_available():  # type: ignore[attr-defined]
        return "hccl"
    if torch.cuda.is_available():
        return "nccl"
    return "gloo"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def agree_across_ranks(value: Any, what: str, payload: Any = None, group: Any = None) -> list[Any]:
    """Raise on every rank if `value` differs across `group`; return every rank's `payload`.

    One all_gather_object; call it before any collective whose shape depends on `value`.
    """
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (_fingerprint(value), payload), group=group)
    if len({d for d, _ in gathered}) > 1:
        by_digest: dict[str, list[int]] = {}
        for rank, (d, _) in enumerate(gathered):
            by_digest.setdefault(d[:8], []).append(rank)
        raise RuntimeError(
            f"tp_passes: {what} differs across ranks (ranks by fingerprint: {by_digest}); "
            "every rank must pass the same value or collectives would hang"
        )
    return [p for _, p in gathered]


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


@dataclass
class GroupRegistry:
    config: TPConfig
    layout: RankLayout
    backend: str
    groups: dict[str, NamedGroup] = field(default_factory=dict)
    partitions: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    def get(self, name: str) -> NamedGroup:
        try:
            return self.groups[name]
        except KeyError:
            raise KeyError(
                f"tp_passes: no group named {name!r}; initialized: {sorted(self.groups)}"
            ) from None


def init_groups(
    config: TPConfig, layout: RankLayout, *, backend: str | None = None
) -> GroupRegistry:
    """Create every group `config` needs on `layout`. Collective over the world group.

    Idempotent: a second call with the same layout creates only groups not yet present.
    """
    if not dist.is_initialized():
        raise RuntimeError("tp_passes.init_groups: torch.distributed is not initialized")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != layout.world_size:
        raise ValueError(
            f"tp_passes.init_groups: layout.world_size={layout.world_size} but "
            f"torch.distributed world size is {world} (rank {rank})"
        )
    plan = required_groups(config, layout)  # validates sizes before any collective
    agree_across_ranks({"layout": repr(layout), "plan": plan}, "init_groups(config, layout)")
    state = owner()
    if state.explicit is not None and state.explicit.layout != layout:
        raise ValueError(
            f"tp_passes.init_groups: groups already exist for {state.explicit.layout}; call "
            f"destroy_groups() before initializing {layout}"
        )
    if state.explicit is None:
        state.explicit = GroupRegistry(config, layout, backend or _world_backend())
    reg = state.explicit
    reg.config = config
    for name, rank_lists in plan.items():
        partition = tuple(tuple(sorted(g)) for g in rank_lists)
        if name in reg.partitions:  # the registry is the same on every rank
            if reg.partitions[name] != partition:
                raise ValueError(
                    f"tp_passes.init_groups: group {name!r} exists as "
                    f"{[list(g) for g in reg.partitions[name]]}, this config needs "
                    f"{[list(g) for g in partition]}; call destroy_groups() first"
                )
            continue
        reg.partitions[name] = partition
        reg.groups[name] = ensure_partition(reg, name, rank_lists)
    return reg


def ensure_partition(reg: GroupRegistry, name: str, rank_lists: Groups) -> NamedGroup:
    """This rank's group of the partition `rank_lists`, created (collectively) if new.

    Every rank must call this with the same arguments in the same order.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    # torch orders a group's members by global rank, whatever order we list them in
    mine = tuple(sorted(RankLayout.group_of(rank, rank_lists)))
    if name in reg.groups and reg.groups[name].coordinator is not None:
        return reg.groups[name]  # made by an integration, once per partition
    for dialect in dialects():
        if dialect.make_group is None:
            continue
        if (made := dialect.make_group(name, rank_lists, mine, reg.backend)) is not None:
            reg.groups[name] = made
            return made
    created = owner().created  # shared by all registries
    for ranks in rank_lists:  # same order on every rank
        key = tuple(sorted(ranks))
        if key in created:
            continue
        if len(key) == world:
            created[key] = dist.group.WORLD
        else:
            pg = dist.new_group(list(key), backend=reg.backend)
            created[key] = pg if rank in key else None
    reg.groups[name] = NamedGroup(name, mine, created[mine])
    return reg.groups[name]


def registry_for(inferred: RankLayout) -> GroupRegistry:
    """The groups a compiled model runs on.

    The layout given to `init_groups` when there is one (the model's TP groups must be
    its TP groups); otherwise the layout inferred from the model (`RankLayout.from_tp_groups`),
    whose groups are created on first use. Every rank calls this with the same layout
    (inferred from data agreed across ranks).
    """
    state = owner()
    reg = state.explicit
    if reg is not None:
        if sorted(map(sorted, inferred.tp_groups())) != sorted(map(sorted, reg.layout.tp_groups())):
            raise ValueError(
                f"tp_passes: the model's TP groups {inferred.tp_groups()} are not the TP groups "
                f"{reg.layout.tp_groups()} of the layout given to init_groups ({reg.layout}); "
                "pass a RankLayout whose tp (and islands) match the model's TP process groups"
            )
        return reg
    if inferred not in state.inferred:
        state.inferred[inferred] = GroupRegistry(TPConfig(), inferred, _world_backend())
    return state.inferred[inferred]


def _named(layout: RankLayout, name: str, rank_lists: Groups) -> NamedGroup:
    """My group of partition `rank_lists`, registered as `name` in `layout`'s registry.

    One name, one partition: `init_groups` made the explicit registry's names from its
    config, so a compile that needs another partition under that name is an error (the
    same on every rank). In a registry of an inferred layout the newest compile's
    partition takes the name (groups stay cached by rank list).
    """
    reg = registry_for(layout)
    partition = tuple(tuple(sorted(g)) for g in rank_lists)
    known = reg.partitions.get(name, partition)
    if known != partition:
        if reg is owner().explicit:
            raise ValueError(
                f"tp_passes: group {name!r} was made by init_groups as {[list(g) for g in known]} "
                f"but this compile needs {[list(g) for g in partition]}; pass init_groups the "
                "config you compile with"
            )
        del reg.groups[name]
    reg.partitions[name] = partition
    return ensure_partition(reg, name, rank_lists)


def module_tp_group(name: str, k: int, layout: RankLayout) -> NamedGroup:
    """My module TP group `name` ("otp", "embedtp", ...) of size k: chunks of k
    consecutive DP ranks."""
    return _named(layout, name, registry_for(layout).layout.module_tp_groups(k))


def flashcomm2_groups(layout: RankLayout, m: int) -> tuple[NamedGroup, NamedGroup]:
    """My ("fc2_otp", "fc2_odp") groups for flashcomm2=m inside my TP group of `layout`."""
    otp_lists, odp_lists = registry_for(layout).layout.flashcomm2_groups(m)
    return _named(layout, "fc2_otp", otp_lists), _named(layout, "fc2_odp", odp_lists)


def shared_weight_group(layout: RankLayout, which: str) -> NamedGroup:
    """My group ("shared_stage", "shared_dp" or "shared_tp") for a shared-weight series."""
    lists = shared_weight_partition(registry_for(layout).layout, which)
    return _named(layout, f"shared_{which}", lists)


def describe_layout(layout: RankLayout | None, why: str) -> str:
    """The layout a compile's plan uses, and where it comes from, for the report."""
    if layout is None:
        return f"none: {why}"
    if owner().explicit is not None:
        return f"{owner().explicit.layout} (from init_groups)"
    return f"{layout} (inferred from the model's TP groups; init_groups was not called)"


def _world_backend() -> str:
    """The device's backend, unless the world group cannot carry it (gloo-only world)."""
    want = default_backend()
    world = str(dist.get_backend())
    return want if want in world else world.split(":")[-1].split(",")[0]


def get_registry() -> GroupRegistry:
    if owner().explicit is None:
        raise RuntimeError("tp_passes: groups are not initialized; call tp_passes.init_groups")
    return owner().explicit


def get_group(name: str) -> Any:
    """The torch ProcessGroup registered as `name` ('tp', 'otp', 'fc2_odp', ...)."""
    return get_group_info(name).pg


def get_group_info(name: str) -> NamedGroup:
    """A group by name: from init_groups, else from a layout a compile inferred (newest first)."""
    state = owner()
    explicit = [state.explicit] if state.explicit is not None else []
    for reg in explicit + list(reversed(state.inferred.values())):
        if name in reg.groups:
            return reg.groups[name]
    return get_registry().get(name)  # raises: not initialized, or the names that exist


def destroy_groups() -> None:
    """Destroy every group `init_groups` created (not vLLM's own TP/DP/PP groups)."""
    state = owner()
    registries = ([state.explicit] if state.explicit is not None else []) + list(
        state.inferred.values()
    )
    state.explicit = None
    state.inferred.clear()
    destroyed: set[int] = set()
    for reg in registries:
        for name, g in reg.groups.items():
            if g.coordinator is not None and name not in ("world", "tp", "dp", "pp"):
                if id(g.coordinator) not in destroyed:
                    destroyed.add(id(g.coordinator))
                    g.coordinator.destroy()
    created = list(state.created.values())
    state.created.clear()
    if dist.is_initialized():
        for pg in created:
            if pg is not None and pg is not dist.group.WORLD:
                dist.destroy_process_group(pg)
