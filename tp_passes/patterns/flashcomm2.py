"""FlashComm2 on o_proj: all_to_all before the matmul instead of all_reduce after it.

Before (per TP rank t of n; x is sharded by heads)::

    p = mm(x[T, A/n], t(w_t[H, A/n]))
    y = wait_tensor(all_reduce(p, "sum", tp))          # [T, H]

After (m = flashcomm2, G = n/m; see `comm.flashcomm2_rows` for the piece order)::

    s = all_to_all_single(reorder(pad(x)), odp)        # my tokens, A/m columns
    p = mm(s, t(w_block[H, A/m]))                      # w_block gathered once over ODP
    ys = reduce_scatter(p, "sum", otp)                 # m > 1 only; [T/n, H]
    y  = all_gather(ys, tp)[:T]                        # or stays sharded under SP

The o_proj modules are those `module_tp.selects(config, "oproj_tp", path)` picks. A bias
added before the reduce (rank 0 only) becomes one bias, summed over the TP group once at
compile time, added to every rank's token piece. The result is a token-sharded value
(`TokenSharding`): sequence parallelism keeps it sharded or gathers it where it must.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tp_passes import comm, cost, weights, wire
from tp_passes.fx import data_users, describe_producer
from tp_passes.groups.registry import flashcomm2_groups
from tp_passes.patterns.base import (
    GraphContext,
    Match,
    Rewrite,
    Site,
    SiteMatch,
    resolve_group,
    weight_bytes,
)
from tp_passes.patterns.module_tp import O_PROJ, selects
from tp_passes.patterns.sequence_parallel import (
    Sharded,
    TokenSharding,
    site_links,
    site_shape,
)
from tp_passes.report import Entry


def flashcomm2_size_error(m: int, n: int) -> str:
    """Why flashcomm2=m cannot run on a TP group of n ranks ('' if it can)."""
    if n % m or (m >= n and m != 1):
        return f"flashcomm2={m} must divide the TP size n={n} and be smaller than it"
    return ""


class FlashComm2(Rewrite):
    name = stage = "flashcomm2"

    def wanted(self, config: Any) -> str:
        if not config.flashcomm2:
            return ""
        names = config.names_for("oproj_tp", O_PROJ)
        return (
            f"a sum all-reduce of a module's product over a TP group, the module named one of "
            f"{list(names)} (TPConfig.module_names['oproj_tp'] selects others)"
        )

    def find(self, cx: GraphContext) -> list[Match]:
        m = cx.config.flashcomm2
        return [
            SiteMatch(s.module, s.n, site=s)
            for s in cx.sites
            if m and s.n > 1 and not s.reason and selects(cx.config, "oproj_tp", s.module)
        ]

    def blocker(self, site: Site, cx: GraphContext) -> str:
        why = flashcomm2_size_error(cx.config.flashcomm2, site.n)
        mm = cx.matmul(site)
        if why:
            return why
        if mm is None:
            return (
                f"o_proj's product comes from {describe_producer(site.ar.partial)}, not a "
                "plain matmul: its weight cannot be resharded"
            )
        if site.weight_index is None:
            return "o_proj weight is not a graph input (cannot gather it)"
        if len(data_users(mm.weight)) != 1:
            return "o_proj weight is read elsewhere in the graph"
        if cx.real(mm.weight) is None:
            return "o_proj weight has no real tensor at compile time"
        return cx.layout_reason if cx.layout is None else ""

    def decide(self, m: SiteMatch, facts: list[tuple[bool, bool]], cx: GraphContext) -> None:
        m.any_bias = any(has for has, _ in facts)
        if any(has and not is_input for has, is_input in facts):
            m.reason = m.reason or "o_proj's bias is computed in the graph, not a graph input"
        m.reason = m.reason or self.blocker(m.site, cx)
        m.apply = not m.reason
        details = {"dialect": m.site.ar.dialect, "cost": self.predicted(m, cx).to_json()}
        if m.apply:
            details["m"] = cx.config.flashcomm2
            cx.taken.add(m.site.ar.result)
        m.entries.append(
            Entry(self.name, m.module, m.apply, m.reason, m.size, details, blocked=not m.apply)
        )

    def predicted(self, m: SiteMatch, cx: GraphContext) -> cost.Choice:
        """The cost model's figures for this site. FlashComm2 is configured, not chosen by
        "auto" (it trades weight memory for bytes), so the choice is the configuration's."""
        site, mo = m.site, cx.config.flashcomm2
        chosen = "flashcomm2" if m.apply else "all_reduce"
        why = f"flashcomm2={mo} (configured)" if m.apply else m.reason
        links = site_links(site)
        if isinstance(links, str) or site.matmul is None or flashcomm2_size_error(mo, site.n):
            return cost.Choice(chosen, {}, "", {}, why=why)
        keep, new = links
        shape, (lo, hi) = site_shape(site, cx), site.token_range()
        t = cost.reference_tokens(lo, hi)
        cols = int(site.matmul.x.meta["val"].shape[-1])
        predicted = {
            "all_reduce": cost.keep_us(shape, t, keep),
            "flashcomm2": cost.flashcomm2_us(shape, t, new, cols, mo),
        }
        links_used = {"all_reduce": keep.name, "flashcomm2": new.name}
        return cost.Choice(chosen, predicted, cost.tokens_label(lo, hi), links_used, why=why)

    def plan_weights(self, m: SiteMatch, cx: GraphContext) -> None:
        mm = m.site.matmul
        m.groups = flashcomm2_groups(cx.layout, cx.config.flashcomm2)
        w_real = cx.real(mm.weight)
        gather = weights.WeightSpec("gather", 1, m.groups[1].pg)
        m.derived = [cx.derive(cx.name(mm.weight), gather, mm.weight, mm.weight)]
        if m.any_bias:  # rank 0's bias, summed with zeros from the others: one bias everywhere
            like = torch.zeros(w_real.shape[0], dtype=w_real.dtype)
            spec = weights.WeightSpec("sum", 0, resolve_group(m.site.ar.group_name))
            m.derived.append(cx.derive(f"{m.module}.bias", spec, mm.bias, mm.weight, like))

    def replace(self, m: SiteMatch, cx: GraphContext) -> None:
        site, mm = m.site, m.site.matmul
        otp, odp = m.groups[0].group_name, m.groups[1].group_name
        mo = cx.config.flashcomm2
        w_node, *b_nodes = [cx.bind(d) for d in m.derived]
        sharding = TokenSharding.of(cx)
        before = site.ar.result

        def produce(x, w, b=None):
            y = comm.flashcomm2_rows(x, w, odp, site.n // mo, otp, mo)
            return y if b is None else y + b

        with cx.graph.inserting_before(before):
            rows = sharding.size(mm.x, 0)
            shape = sharding.output_shape(site, mm, rows)
        key = ("flashcomm2", odp, site.n // mo, otp, mo)
        twin = sharding.splice(produce, [mm.x, w_node, *b_nodes], before, key)
        sharding.add(
            before,
            Sharded(twin, site.ar.group_name, site.n, site.j, rows, shape, site.ar.native),
        )
        w = m.derived[0]
        m.entries[0].details.update(
            weight_bytes_before=weight_bytes([w.source]),
            weight_bytes_after=w.nbytes(),
            wire_bytes_per_step=wire.total(wire.collective_bytes(twin.meta["tp_passes_inserted"])),
            wire_note="all_to_all (+ OTP reduce_scatter); the all_gather is counted where SP "
            "places it",
        )

    # -- eager twin ---------------------------------------------------------------------
    def blocker_eager(self, rp: Any, cx: GraphContext) -> str:
        n = dist.get_world_size(rp.group)
        return (
            flashcomm2_size_error(cx.config.flashcomm2, n)
            or rp.why_opaque
            or (cx.layout_reason if cx.layout is None else "")
        )

    def parallelize(self, name: str, module: nn.Module, rp: Any, cx: GraphContext) -> Entry:
        """The layer's weight becomes the gathered [H, A/m] block (collective); its forward
        all_to_all + full-width o_proj + all_gather."""
        n, mo = dist.get_world_size(rp.group), cx.config.flashcomm2
        otp, odp = flashcomm2_groups(cx.layout, mo)
        d = weights.Derived(
            f"{name}.weight", weights.WeightSpec("gather", 1, odp.pg), rp.weight, rp.weight
        )
        weights.materialize([d])
        before = weight_bytes([rp.weight])
        module.weight = nn.Parameter(d.value, requires_grad=False)  # the module holds the block
        g, bias = rp.group.group_name, rp.bias  # the module's own bias: a cast reaches it

        def forward(self: nn.Module, x: torch.Tensor) -> Any:
            x2 = x.reshape(-1, x.shape[-1])
            ys = comm.flashcomm2_rows(x2, self.weight, odp.group_name, n // mo, otp.group_name, mo)
            if bias is not None:
                ys = ys + bias
            return rp.wrap(comm.gather_rows(ys, g, n, x2.shape[0]).view(*x.shape[:-1], -1))

        module.forward = types.MethodType(forward, module)
        return Entry(
            self.name,
            name,
            True,
            "",
            n,
            {"weight_bytes_before": before, "weight_bytes_after": weight_bytes([d.value])},
        )
