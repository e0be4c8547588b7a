"""Rank layouts (pure math) and the process groups built from them."""

from tp_passes.groups.layout import RankLayout, groups_varying
from tp_passes.groups.registry import (
    GroupRegistry,
    NamedGroup,
    destroy_groups,
    get_group,
    get_group_info,
    init_groups,
    required_groups,
)

__all__ = [
    "GroupRegistry",
    "NamedGroup",
    "RankLayout",
    "destroy_groups",
    "get_group",
    "get_group_info",
    "groups_varying",
    "init_groups",
    "required_groups",
]
