"""tp_passes: tensor-parallel graph rewrites for LLM inference, as a torch.compile backend.

Importing the package does no work: the backend, the eager path and the vLLM plugin are
loaded when first used.
"""

from tp_passes.config import TPConfig
from tp_passes.groups import (
    RankLayout,
    destroy_groups,
    get_group,
    get_group_info,
    init_groups,
)

__all__ = [
    "RankLayout",
    "TPConfig",
    "destroy_groups",
    "get_group",
    "get_group_info",
    "init_groups",
]
__version__ = "0.1.0"
