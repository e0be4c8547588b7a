"""Weight plan: derived weights (gathered, reduced, sharded) made once per parameter.

A rewrite that needs a weight in another layout declares a `WeightSpec`; the backend
materializes it from the real parameter at compile time (a collective, issued on every
rank in plan order), caches it per parameter so recompiles share it, and binds it as an
extra graph input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from tp_passes import comm

# Derived tensors live on the parameter object itself, so their lifetime is the
# parameter's and a hit or miss never depends on object ids (a rank that missed would
# issue a collective the others skip).
ATTR = "_tp_passes_derived"


@dataclass(frozen=True)
class WeightSpec:
    kind: Literal["gather", "sum", "shard", "shard_halves"]
    # gather: concatenate the group's tensors along `dim`; sum: add contributions;
    # shard: my chunk along `dim` (padded); shard_halves: my chunk of each half (gate_up)
    dim: int
    group: Any  # ProcessGroup

    def key(self) -> tuple:
        return (self.kind, self.dim, self.group.group_name)


def _gather(t: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    k = dist.get_world_size(group)
    out = funcol.wait_tensor(funcol.all_gather_single(t.detach().contiguous(), 0, group))
    return torch.cat(out.chunk(k), dim=dim)


def materialize(source: torch.Tensor | None, spec: WeightSpec, like: torch.Tensor | None = None) -> torch.Tensor:
    """The derived tensor; `source` None means "this rank contributes zeros like `like`"."""
    cached = getattr(source, ATTR, {}) if source is not None else {}
    if spec.key() in cached:
        return cached[spec.key()]
    with torch.no_grad():
        if spec.kind in ("shard", "shard_halves"):  # local: no collective
            k, j = dist.get_world_size(spec.group), dist.get_rank(spec.group)
            src = source.detach()
            out = comm.shard_padded(src, spec.dim, k, j) if spec.kind == "shard" else comm.shard_halves(src, k, j)
        elif spec.kind == "gather":
            assert source is not None
            out = _gather(source, spec.dim, spec.group)
        else:
            src = source if source is not None else torch.zeros_like(like)
            out = src.detach().float()  # exactly one rank contributes: the sum is exact
            dist.all_reduce(out, group=spec.group)
            out = out.to(src.dtype)
    if source is not None:
        setattr(source, ATTR, {**cached, spec.key(): out})
    return out


def release(params: list[torch.Tensor]) -> None:
    """Free the parameters' storage (as FSDP does), each once; their metadata stays valid.

    Call only after every derived tensor exists: tied weights feed two rewrites.
    """
    for p in {id(p): p for p in params}.values():
        p.untyped_storage().resize_(0)
