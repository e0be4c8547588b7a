"""Weight plan: derived weights (gathered, reduced, sharded) made once per parameter.

A rewrite that needs a weight in another layout declares a `WeightSpec`; the backend
materializes it from the real parameter at compile time (a collective, issued on every
rank in plan order), caches it per parameter so recompiles share it, and binds it as an
extra graph input.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

_CACHE: "weakref.WeakKeyDictionary[torch.Tensor, dict[tuple, torch.Tensor]]" = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class WeightSpec:
    kind: Literal["gather", "sum"]  # gather shards along `dim`; sum contributions
    dim: int
    group: Any  # ProcessGroup

    def key(self) -> tuple:
        return (self.kind, self.dim, self.group.group_name)


def _gather(t: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def materialize(source: torch.Tensor | None, spec: WeightSpec, like: torch.Tensor | None = None) -> torch.Tensor:
    """The derived tensor; `source` None means "this rank contributes zeros like `like`"."""
    if source is not None and spec.key() in _CACHE.get(source, {}):
        return _CACHE[source][spec.key()]
    with torch.no_grad():
        if spec.kind == "gather":
            assert source is not None
            out = _gather(source, spec.dim, spec.group)
        else:
            out = (source if source is not None else torch.zeros_like(like)).detach().clone()
            dist.all_reduce(out, group=spec.group)
    if source is not None:
        _CACHE.setdefault(source, {})[spec.key()] = out
    return out


def release(param: torch.Tensor) -> None:
    """Free a parameter's storage (as FSDP does); its metadata stays valid."""
    param.untyped_storage().resize_(0)
