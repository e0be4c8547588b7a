"""What the backend did: one entry per (match, rewrite), and the dump files per rank."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.fx as fx

from tp_passes.owner import owner


@dataclass
class Entry:
    rewrite: str  # "sequence_parallel" | "mm_reduce_scatter" | "flashcomm2" | ...
    module: str
    applied: bool
    reason: str = ""
    group_size: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    blocked: bool = False  # wanted but unsafe: an error under strict=True


@dataclass
class GraphReport:
    graph_id: int
    rank: int
    entries: list[Entry] = field(default_factory=list)
    collectives: dict[str, int] = field(default_factory=dict)  # final graph: op -> count
    wire_bytes_before: int = 0  # per rank per call, from the graph's collectives
    wire_bytes_after: int = 0
    wire_rows: list[dict[str, Any]] = field(default_factory=list)  # final graph, per collective
    nodes: int = 0  # ATen graph nodes seen by the rewrites
    rewrite_ms: float = 0.0  # time spent matching, planning and rewriting
    rewrite_ms_by_family: dict[str, float] = field(default_factory=dict)  # and "common"
    config: dict[str, Any] = field(
        default_factory=dict
    )  # the TPConfig this graph was rewritten with
    matmuls_before: int = 0  # mm/addmm/bmm nodes before and after: a rewrite never computes twice
    matmuls_after: int = 0
    layout: str = ""  # the rank layout the plan ran on, and where it came from

    def measure_before(self, gm: fx.GraphModule) -> None:
        """Size, matmuls and bytes on the wire of the graph the rewrites receive."""
        from tp_passes import wire

        self.wire_bytes_before = wire.total(wire.collective_bytes(gm))
        self.nodes = len(gm.graph.nodes)
        self.matmuls_before = count_matmuls(gm)

    def measure_after(self, gm: fx.GraphModule) -> None:
        """Collectives, matmuls and bytes on the wire of the final graph."""
        from tp_passes import wire

        self.collectives = wire.collective_counts(gm)
        self.matmuls_after = count_matmuls(gm)
        self.wire_rows = wire.collective_bytes(gm)
        self.wire_bytes_after = wire.total(self.wire_rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "graph": self.graph_id,
            "rank": self.rank,
            "entries": [asdict(e) for e in self.entries],
            "collectives": self.collectives,
            "wire_bytes_per_rank": {
                "before": self.wire_bytes_before,
                "after": self.wire_bytes_after,
            },
            "nodes": self.nodes,
            "matmuls": {"before": self.matmuls_before, "after": self.matmuls_after},
            "rewrite_ms": self.rewrite_ms,
            "rewrite_ms_by_family": self.rewrite_ms_by_family,
            "layout": self.layout,
            "config": self.config,
        }

    def summary(self) -> str:
        applied: dict[str, int] = {}
        for e in self.entries:
            if e.applied:
                applied[e.rewrite] = applied.get(e.rewrite, 0) + 1
        skipped = sum(not e.applied for e in self.entries)
        parts = ", ".join(f"{k} x{v}" for k, v in sorted(applied.items())) or "no rewrite"
        return (
            f"tp_passes graph {self.graph_id}: {parts}; {skipped} skipped; "
            f"collectives {self.collectives}"
        )


def refuse_blocked(entries: list[Entry], strict: bool) -> None:
    """strict=True turns rewrites that cannot be applied safely into an error. Entries are
    decided from inputs agreed across ranks, so every rank raises together."""
    blocked = [e for e in entries if e.blocked]
    if strict and blocked:
        raise RuntimeError(
            "tp_passes (strict): rewrites that cannot be applied safely: "
            + "; ".join(f"{e.rewrite} at {e.module or '?'}: {e.reason}" for e in blocked)
        )


def next_graph_id() -> int:
    """Numbers compiled graphs (and eager rewrites) in this process, for reports and dumps."""
    return next(owner().graph_ids)


def record(report: GraphReport) -> None:
    owner().reports.append(report)


def last_report() -> list[dict[str, Any]]:
    """Entries of the most recently compiled graph, as dicts."""
    reports = owner().reports
    return [asdict(e) for e in reports[-1].entries] if reports else []


def all_reports() -> list[GraphReport]:
    """The reports of this process's last `REPORT_HISTORY` graphs, oldest first."""
    return list(owner().reports)


def reset_reports() -> None:
    owner().reports.clear()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Dumper:
    """Writes readable graphs per rank and graph: ``<dir>/rank<r>/graph<k>/NN_<stage>.py``."""

    def __init__(self, enabled: bool, root: str, graph_id: int) -> None:
        self.enabled = enabled
        self.dir = Path(root) / f"rank{rank()}" / f"graph{graph_id:03d}"
        self.step = 0
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def graph(self, stage: str, gm: fx.GraphModule) -> None:
        if not self.enabled:
            return
        gm.recompile()
        text = gm.print_readable(print_output=False, include_stride=True, include_device=True)
        (self.dir / f"{self.step:02d}_{stage}.py").write_text(text)
        self.step += 1

    def report(self, report: GraphReport) -> None:
        if not self.enabled:
            return
        (self.dir / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
        if report.rank == 0:
            print(report.summary(), f"(dump: {os.path.abspath(self.dir)})", flush=True)


MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default")


def count_matmuls(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in MATMULS)
