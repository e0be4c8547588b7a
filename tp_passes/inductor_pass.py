"""`TPPass`: the rewrite driver as an Inductor post-grad pass.

    torch.compile(model, options={"post_grad_custom_post_pass": tp_passes.TPPass(config)})

With the default Inductor backend, Inductor calls the pass on its post-grad ATen graph
(functionalized, decomposed) after its own passes; the pass runs `rewrite_graph` on it::

    before:  y = wait_tensor(all_reduce(mm(x, w), "sum", tp)); h = rms_norm(y + r)
    after:   y = wait_tensor(reduce_scatter(mm(x, w), "sum", tp)); h = rms_norm(y + r_j)
             ... all_gather(h_j) before the next column-parallel matmul

`uuid()` covers the config, the package version and the package's source files, so it
enters Inductor's FX graph cache key: a cached graph is reused only for the same
rewrites, and on a cache hit the pass does not run (the cached code already holds them).

Rewrites that need real weights (FlashComm2's gathered o_proj, module TP shards) cannot
run inside the pass: it sees fake tensors and cannot add graph inputs. They are planned
before compiling, on the real model, by `TPPass.prepare(model)` (the eager path: the
weights are derived once and the modules' forwards carry the collectives, which the pass
then sees in the graph); unprepared, they are skipped with that reason. The cross-rank
plan agreement runs in `prepare` and inside the pass (on a cache hit the pass does not
run; the prepared weights and the agreement of `prepare` still do).

    pass_ = tp_passes.TPPass({"flashcomm2": 1, "sequence_parallel": True})
    pass_.prepare(model)            # collective: every rank, before compiling
    torch.compile(model, options={"post_grad_custom_post_pass": pass_})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from tp_passes.config import MODULE_NAME_KEYS, TPConfig
from tp_passes.report import (
    Dumper,
    Entry,
    GraphReport,
    next_graph_id,
    rank,
    record,
    refuse_blocked,
)

NEEDS_WEIGHTS = (
    "needs real weights (a derived weight bound as a graph input), which an Inductor "
    "post-grad pass cannot provide; call TPPass.prepare(model) before compiling, or use "
    "backend='tp_passes'"
)


SHARED_WEIGHTS_ROUTE = (
    "a shared-weight series binds its ring windows as graph inputs on every call, which a "
    "post-grad pass cannot do; use backend='tp_passes', or tp_passes.parallelize without "
    "compiling"
)


class TPPass(CustomGraphPass):
    """Run the tensor-parallel rewrites on Inductor's post-grad graph (every rank of the
    graph's groups must compile the same graph with the same config)."""

    def __init__(self, config: TPConfig | Mapping[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, TPConfig) else TPConfig.from_dict(config or {})
        self.prepared: list[dict] = []  # the entries of `prepare`

    def weight_rewrites(self) -> list[str]:
        """The configured rewrites that need real weights."""
        names = (*MODULE_NAME_KEYS, "flashcomm2", "shared_weights")
        return [n for n in names if getattr(self.config, n)]

    def prepare(self, model: Any, recognize: Any = None) -> list[dict]:
        """Apply the weight rewrites to `model` before compiling (collective: every rank);
        sequence parallelism and mm + reduce-scatter are left to the pass. `recognize`:
        how row-parallel layers are found (`tp_passes.eager.parallelize`'s argument)."""
        from tp_passes.eager import parallelize

        only = dataclasses.replace(
            self.config, sequence_parallel=False, fuse_mm_reduce_scatter=False, shared_weights=()
        )
        kwargs = {"recognize": recognize} if recognize is not None else {}
        self.prepared = [
            e for e in parallelize(model, only, **kwargs) if e["rewrite"] in self.weight_rewrites()
        ]
        return self.prepared

    def __call__(self, graph: fx.Graph) -> None:
        from torch._inductor.decomposition import select_decomp_table

        from tp_passes.backend import rewrite_graph

        if not (dist.is_available() and dist.is_initialized()):
            return
        gm = graph.owning_module
        report = GraphReport(next_graph_id(), rank(), config=self.config.to_dict())
        dumper = Dumper(self.config.dump, self.config.dump_dir, report.graph_id)
        dumper.graph("post_grad", gm)
        report.measure_before(gm)
        # the post-grad graph's inputs are nameless fakes: weight rewrites were planned by
        # `prepare` (its entries are reported with this graph) or are skipped here
        weighted = self.weight_rewrites()
        prepared = [Entry(**e) for e in self.prepared]
        skipped = [
            Entry(n, "", False, SHARED_WEIGHTS_ROUTE, 0, blocked=True)
            if n == "shared_weights"
            else Entry(n, "", False, NEEDS_WEIGHTS, getattr(self.config, n), blocked=True)
            for n in weighted
            if n not in {e.rewrite for e in prepared}
        ]
        refuse_blocked(skipped, self.config.strict)
        done = rewrite_graph(
            gm,
            dataclasses.replace(
                self.config, **{n: () if n == "shared_weights" else 0 for n in weighted}
            ),
            decompositions=select_decomp_table(),  # inserted ops as Inductor expects them
            dumper=dumper,
        )
        done.entries[:0] = prepared + skipped
        report.entries, report.layout = done.entries, done.layout
        report.measure_after(gm)
        dumper.graph("final", gm)
        dumper.report(report)
        record(report)

    def uuid(self) -> str:
        import tp_passes

        package = Path(tp_passes.__file__).parent
        sources = get_hash_for_files(tuple(sorted(str(p) for p in package.rglob("*.py"))))
        key = json.dumps([self.config.to_dict(), tp_passes.__version__], sort_keys=True)
        return hashlib.sha256(key.encode() + sources).hexdigest()
