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


def parallelize(model, config):  # noqa: ANN001 - thin lazy wrapper
    """Apply the configured rewrites to `model`'s modules (eager path); see tp_passes.eager."""
    from tp_passes.eager import parallelize as _parallelize

    return _parallelize(model, config)


def refresh_weights() -> int:
    """Rebuild the derived weights of every compiled graph after a weight update (collective:
    call on every rank); see tp_passes.weights."""
    from tp_passes.weights import refresh_weights as _refresh

    return _refresh()


def last_report() -> list[dict]:
    """One entry per match of the most recently compiled graph."""
    from tp_passes.report import last_report as _last_report

    return _last_report()


def __getattr__(name: str):  # noqa: ANN202 - lazy: Inductor is imported on first use
    if name == "TPPass":
        from tp_passes.inductor_pass import TPPass

        return TPPass
    raise AttributeError(f"module 'tp_passes' has no attribute {name!r}")


__all__ = [
    "TPPass",
    "last_report",
    "parallelize",
    "refresh_weights",
    "RankLayout",
    "TPConfig",
    "destroy_groups",
    "get_group",
    "get_group_info",
    "init_groups",
]
__version__ = "0.1.0"
