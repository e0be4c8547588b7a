"""The worked example of docs/design.md runs as written: a new rewrite is a Rewrite
subclass and one registry entry; the driver does the rest."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.fx.experimental.proxy_tensor import make_fx

from tp_passes.backend import rewrite_graph
from tp_passes.config import TPConfig
from tp_passes.patterns import REWRITES, SequenceParallel
from tp_passes.wire import collective_counts

DOC = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def _example_module() -> types.ModuleType:
    text = DOC.read_text()
    section = text[text.index("## Adding a rewrite") :]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    module = types.ModuleType("trivial_all_reduce")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


def test_worked_example_adds_a_rewrite(fake_world):
    rewrite = _example_module().DropTrivialAllReduce()
    at = next(i for i, r in enumerate(REWRITES) if isinstance(r, SequenceParallel))
    registry = (*REWRITES[:at], rewrite, *REWRITES[at:])  # right before sequence parallelism
    me = dist.get_rank()
    alone, everyone = dist.new_group([me]), dist.group.WORLD

    def f(x, w, r):
        y = funcol.all_reduce(torch.mm(x, w.t()), "sum", alone)  # one rank: a no-op
        z = funcol.all_reduce(y + r, "sum", everyone)
        return z * 2

    inputs = [torch.randn(5, 8), torch.randn(6, 8), torch.randn(5, 6)]
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    assert collective_counts(gm) == {"all_reduce": 2}
    names = ["x", "layers.0.o_proj.weight", "r"]
    sp = TPConfig(sequence_parallel=True)  # the fake group has no cost figures
    done = rewrite_graph(gm, sp, inputs, names, rewrites=registry)
    applied = sorted((e.rewrite, e.module) for e in done.entries if e.applied)
    assert applied == [("drop_trivial_all_reduce", "layers.0.o_proj"), ("sequence_parallel", "")]
    # the trivial all-reduce is gone, the world one became reduce_scatter + all_gather
    assert collective_counts(gm) == {"reduce_scatter_tensor": 1, "all_gather_into_tensor": 1}
    # without the new entry, the one-rank all-reduce stays (sequence parallelism skips it)
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    done = rewrite_graph(gm, sp, inputs, names)
    assert collective_counts(gm)["all_reduce"] == 1
    (skip,) = [e for e in done.entries if e.module == "layers.0.o_proj"]
    assert skip.reason == "all-reduce over a group of size 1"
