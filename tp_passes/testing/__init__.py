"""Test and demo scaffolding: real gloo ranks in spawned CPU processes (`run_ranks`), a
reference tensor-parallel Llama (`tp_passes.testing.models`) and the case matrices of the
differential tests (`cases`). Not used by the rewrites."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from tp_passes.testing.ranks import RankFailure, free_port, run_ranks

__all__ = ["RankFailure", "cases", "free_port", "run_ranks", "soak"]


def soak() -> bool:
    """TPP_SOAK=1: the tests run their full case matrices (see `cases`)."""
    return os.environ.get("TPP_SOAK") == "1"


def cases(rows: Sequence[Any], dtypes: Sequence[Any], shapes: Sequence[Any]) -> list[tuple]:
    """(row, dtype, shape) cases of a differential test, each one a compile.

    Under `soak()` the full product. Otherwise every row at every shape in the first dtype,
    and at one shape in each other dtype, rotating, so every (row, dtype), (row, shape) and,
    given as many rows as shapes, every (dtype, shape) pair is still run.
    """
    if soak():
        return list(itertools.product(rows, dtypes, shapes))
    out = []
    for i, row in enumerate(rows):
        out += [(row, dtypes[0], s) for s in shapes]
        out += [(row, d, shapes[(i + j) % len(shapes)]) for j, d in enumerate(dtypes[1:], 1)]
    return out
