"""Rank layout: pure arithmetic on the canonical grid, no torch.distributed.

The grid is vLLM's: ``world = ExternalDP x DP x PP x PCP x TP`` with TP fastest, so the
logical rank of coordinates ``(e, d, p, c, t)`` is ``(((e*DP + d)*PP + p)*PCP + c)*TP + t``.
Every group is "the ranks that differ only along some axes". Module TP and FlashComm2
groups split one axis in two first (DP into ``DP/k x k``; TP into ``m x G``) and vary one
half.

Islands (high-bandwidth domains such as a supernode) change only which physical rank sits
at each logical position: the islands, concatenated in order, are the logical-to-physical
permutation. Each island holding a whole number of TP groups keeps every TP group inside
one island; all other groups follow from the same grid. For tp8 pp2 on 16 ranks with
islands ``[0-3, 8-11]`` and ``[4-7, 12-15]`` this yields Biren's supernode layout.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

Groups = list[list[int]]

AXES = ("external_dp", "dp", "pp", "pcp", "tp")


def groups_varying(sizes: Sequence[int], vary: Sequence[int]) -> Groups:
    """Groups of mixed-radix indices (last axis fastest) that differ only on `vary` axes.

    Groups are ordered by the fixed coordinates, members by the varying ones.
    """
    fixed = [i for i in range(len(sizes)) if i not in vary]
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    groups = []
    for fixed_idx in itertools.product(*(range(sizes[i]) for i in fixed)):
        base = sum(strides[a] * x for a, x in zip(fixed, fixed_idx))
        groups.append(
            [
                base + sum(strides[a] * x for a, x in zip(vary, var_idx))
                for var_idx in itertools.product(*(range(sizes[i]) for i in vary))
            ]
        )
    return groups


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RankLayout: {name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class RankLayout:
    world_size: int
    tp: int = 1
    dp: int = 1
    pp: int = 1
    pcp: int = 1
    islands: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "dp", "pp", "pcp"):
            _positive_int(name, getattr(self, name))
        inner = self.dp * self.pp * self.pcp * self.tp
        if self.world_size % inner:
            raise ValueError(
                f"RankLayout: world_size={self.world_size} is not divisible by "
                f"dp*pp*pcp*tp={inner} (dp={self.dp}, pp={self.pp}, pcp={self.pcp}, "
                f"tp={self.tp})"
            )
        if self.islands is not None:
            islands = tuple(tuple(int(r) for r in island) for island in self.islands)
            object.__setattr__(self, "islands", islands)
            self._check_islands(islands)

    def _check_islands(self, islands: tuple[tuple[int, ...], ...]) -> None:
        flat = [r for island in islands for r in island]
        if sorted(flat) != list(range(self.world_size)):
            missing = sorted(set(range(self.world_size)) - set(flat))
            extra = sorted(
                r for r in set(flat) if flat.count(r) > 1 or not 0 <= r < self.world_size
            )
            raise ValueError(
                f"RankLayout: islands must list every rank of world_size={self.world_size} "
                f"exactly once (missing {missing}, repeated or out of range {extra})"
            )
        for i, island in enumerate(islands):
            if len(island) % self.tp:
                raise ValueError(
                    f"RankLayout: islands[{i}] has {len(island)} ranks, which does not hold "
                    f"whole TP groups of tp={self.tp}"
                )

    @classmethod
    def from_tp_groups(cls, world_size: int, tp_groups: Sequence[Sequence[int]]) -> RankLayout:
        """The layout implied by a model's TP process groups: DP = world / TP.

        `tp_groups` lists every rank's TP group (repeats allowed). Contiguous groups give
        the plain grid; any other partition (e.g. strided ``[0, 2], [1, 3]``) becomes the
        islands, so every TP group is one of the layout's and module TP groups pair ranks
        at the same TP index. Raises ValueError when the groups do not partition the world
        into equal sizes.
        """
        groups = sorted({tuple(sorted(g)) for g in tp_groups})
        sizes = sorted({len(g) for g in groups})
        flat = sorted(r for g in groups for r in g)
        if len(sizes) != 1 or flat != list(range(world_size)):
            raise ValueError(
                f"RankLayout.from_tp_groups: the TP groups {[list(g) for g in groups]} do not "
                f"partition world_size={world_size} into groups of one size"
            )
        tp = sizes[0]
        contiguous = all(list(g) == list(range(g[0], g[0] + tp)) for g in groups)
        return cls(world_size, tp=tp, dp=world_size // tp, islands=None if contiguous else groups)

    @classmethod
    def infer(
        cls, groups_per_rank: Sequence[Sequence[Sequence[int]]]
    ) -> tuple[RankLayout | None, str]:
        """(layout, "") from the TP groups each rank's all-reduces use (rank r's list; empty:
        no TP, the rank alone), or (None, why) when they imply none."""
        per_rank = [list(g) if g else [(r,)] for r, g in enumerate(groups_per_rank)]
        if any(len(g) > 1 for g in per_rank):
            return None, "the model's all-reduces use more than one group per rank"
        try:
            return cls.from_tp_groups(len(per_rank), [g[0] for g in per_rank]), ""
        except ValueError as e:
            return None, str(e)

    # -- coordinates ----------------------------------------------------------------
    @property
    def external_dp(self) -> int:
        return self.world_size // (self.dp * self.pp * self.pcp * self.tp)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.external_dp, self.dp, self.pp, self.pcp, self.tp)

    def physical_ranks(self) -> list[int]:
        """Logical grid position -> physical rank (identity without islands)."""
        if self.islands is None:
            return list(range(self.world_size))
        return [r for island in self.islands for r in island]

    def _map(self, logical: Groups) -> Groups:
        phys = self.physical_ranks()
        return [[phys[r] for r in group] for group in logical]

    def _axis_groups(self, *axes: str) -> Groups:
        return self._map(groups_varying(self.shape, [AXES.index(a) for a in axes]))

    # -- groups -----------------------------------------------------------------------
    def tp_groups(self) -> Groups:
        return self._axis_groups("tp")

    def dp_groups(self) -> Groups:
        return self._axis_groups("dp")

    def pp_groups(self) -> Groups:
        return self._axis_groups("pp")

    def pcp_groups(self) -> Groups:
        return self._axis_groups("pcp")

    def world_groups(self) -> Groups:
        return [self.physical_ranks()]

    def module_tp_groups(self, k: int) -> Groups:
        """Chunks of k consecutive DP indices at fixed ExternalDP, PP, PCP and TP index."""
        _positive_int("module TP size k", k)
        if self.dp % k:
            raise ValueError(f"RankLayout: module TP size k={k} does not divide dp={self.dp}")
        e, d, p, c, t = self.shape
        return self._map(groups_varying((e, d // k, k, p, c, t), [2]))

    def flashcomm2_groups(self, m: int) -> tuple[Groups, Groups]:
        """(OTP, ODP) groups inside every TP group of size n, with G = n / m.

        OTP groups are the strided sets ``{i + j*G : j < m}`` (size m), ODP groups the
        contiguous blocks of G TP indices; a TP index is the rank's position in its TP
        process group, whose members torch orders by global rank.
        """
        _positive_int("flashcomm2 m", m)
        if m >= self.tp or self.tp % m:
            raise ValueError(
                f"RankLayout: flashcomm2 m={m} must divide tp={self.tp} and be smaller than it"
            )
        G = self.tp // m
        otp, odp = [], []
        for tp_group in self.tp_groups():
            g = sorted(tp_group)  # TP index = rank in the TP process group (torch's order)
            otp += [[g[i + j * G] for j in range(m)] for i in range(G)]
            odp += [g[b * G : (b + 1) * G] for b in range(m)]
        return otp, odp

    def shared_weight_groups(self) -> Groups:
        """Every rank that holds the same pipeline stage of one model instance."""
        return self._axis_groups("dp", "pcp", "tp")

    def mc2_groups(self) -> Groups:
        """The MoE dispatch (MC2) domain: DP x PCP x TP at fixed ExternalDP and PP."""
        return self._axis_groups("dp", "pcp", "tp")

    @staticmethod
    def group_of(rank: int, groups: Groups) -> list[int]:
        for group in groups:
            if rank in group:
                return group
        raise ValueError(f"RankLayout: rank {rank} is in none of the groups {groups}")


@dataclass(frozen=True)
class SeriesSchedule:
    """Ownership and prefetch order of a shared-weight series: pure arithmetic.

    The `length` layers of a series run in order, every forward. Layer i lives on group
    rank ``i mod k`` only; the other ranks receive it into a ring of
    ``windows = prefetch + 1`` buffers. Steps count the layers run since the ring was
    filled, across forwards: step s runs layer ``s mod length`` from window
    ``s mod windows``. Before step s computes, the broadcast for step ``s + prefetch`` is
    issued (near the end of a forward: the next forward's first layers, the ring wraps);
    step s waits for its own broadcast only. The windows of steps s..s+prefetch are then
    ``windows`` distinct buffers, and the one the new broadcast overwrites was last read
    by step s - 1, which has finished.
    """

    length: int
    k: int
    prefetch: int

    @property
    def windows(self) -> int:
        return self.prefetch + 1

    def error(self) -> str:
        """Why this series cannot be shared ('' if it can)."""
        if self.k < 2:
            return f"the group has {self.k} rank: there is nothing to share"
        if self.length < 2:
            return f"a series needs at least 2 layers, found {self.length}"
        if not 0 <= self.prefetch <= self.length - 2:
            return (
                f"prefetch_step={self.prefetch} must be in [0, {self.length - 2}] for a series "
                f"of {self.length} layers (a ring of prefetch_step + 1 windows smaller than "
                "the series)"
            )
        return ""

    def owner(self, layer: int) -> int:
        return layer % self.k

    def owned(self, j: int) -> list[int]:
        """The layers group rank j keeps."""
        return list(range(j, self.length, self.k))

    def window(self, step: int) -> int:
        return step % self.windows

    def layer(self, step: int) -> int:
        return step % self.length

    def resident_layers(self, j: int) -> int:
        """Layer-sized buffers group rank j holds: its own layers plus the ring."""
        return len(self.owned(j)) + self.windows

    def saves_everywhere(self) -> bool:
        """Every group rank holds fewer layer-sized buffers than the series' layers (rank 0
        owns the most)."""
        return self.resident_layers(0) < self.length
