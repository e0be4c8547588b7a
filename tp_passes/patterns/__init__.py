"""The rewrite families, one file each, and their registry.

`REWRITES` is ordered: the driver finds, decides and replaces in this order, so an
earlier rewrite wins a node both could take (module TP consumes a matmul before
FlashComm2 or sequence parallelism see its all-reduce; FlashComm2 takes an o_proj
all-reduce before sequence parallelism). Adding a rewrite: a file here with a `Rewrite`
subclass, and one line below (see docs/design.md).
"""

from tp_passes.patterns.base import GraphContext, Match, Rewrite, Site, SiteMatch, find_sites
from tp_passes.patterns.flashcomm2 import FlashComm2
from tp_passes.patterns.module_tp import MLPTP, EmbeddingTP, LMHeadTP, ModuleTP, OProjTP
from tp_passes.patterns.sequence_parallel import SequenceParallel
from tp_passes.patterns.shared_weights import SharedWeights

REWRITES: tuple[Rewrite, ...] = (
    OProjTP(),
    EmbeddingTP(),
    LMHeadTP(),
    MLPTP(),
    FlashComm2(),
    SequenceParallel(),
    SharedWeights(),  # last: it shares the weight each linear reads after the others
)

__all__ = [
    "REWRITES",
    "EmbeddingTP",
    "FlashComm2",
    "GraphContext",
    "LMHeadTP",
    "MLPTP",
    "Match",
    "ModuleTP",
    "OProjTP",
    "Rewrite",
    "SequenceParallel",
    "SharedWeights",
    "Site",
    "SiteMatch",
    "find_sites",
]
