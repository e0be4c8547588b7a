"""The one owner of what compiles and rewritten models leave behind in a process.

Every piece of state the package keeps past one call lives here, on one object, so a
reader can say what a compile leaves behind and how much of it there can be:

=================  ==========================================  ========================
field              created by                                  freed by
=================  ==========================================  ========================
``explicit``       ``init_groups``                             ``destroy_groups``
``inferred``       a compile on a layout inferred from its TP  ``destroy_groups``
                   groups
``created``        the first group of a rank list              ``destroy_groups``
``graphs``         each compiled graph's ``BoundWeights``      its graph (weak), or
                                                               ``torch._dynamo.reset()``
``rings``          each shared-weight series' ring             its graph or module (weak)
``derived``        derived weights, cached per anchor tensor   the anchor (weak)
``released``       ``release_weights=True`` (why, per tensor)  the tensor (weak)
``guarded``        modules whose weights were released         the module (weak)
``read``           tensors some compiled graph reads           the tensor (weak)
``paths``          module -> path under the largest model run  the module (weak)
``reports``        one per compiled graph or eager rewrite     the oldest, past
                                                               ``REPORT_HISTORY``
``integrations``   an integration's adapter (vLLM: the loaded  the adapter
                   config, the layers planned at load time)
=================  ==========================================  ========================

Nothing is attached to parameters or modules: tensors and modules are keys of weak
dictionaries (by identity), so the owner never keeps a model alive and never grows past
what is alive. Process groups are process-wide in ``torch.distributed`` as well, hence one
owner per process (`owner()`), created on first use; `Owner.close` frees what it holds.
"""

from __future__ import annotations

import collections
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any

from torch.utils.weak import WeakIdKeyDictionary

REPORT_HISTORY = 1024  # graphs whose reports are kept (a server recompiles for new shapes)


@dataclass(eq=False)
class Owner:
    # groups (tp_passes.groups.registry)
    explicit: Any = None  # GroupRegistry from init_groups
    inferred: dict[Any, Any] = field(default_factory=dict)  # RankLayout -> GroupRegistry
    created: dict[tuple[int, ...], Any] = field(default_factory=dict)  # ranks -> ProcessGroup
    # derived weights (tp_passes.weights)
    graphs: list[weakref.ref] = field(default_factory=list)  # BoundWeights, creation order
    rings: list[weakref.ref] = field(default_factory=list)  # shared-weight rings
    derived: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    released: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    guarded: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    read: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    # module paths (tp_passes.inputs)
    paths: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    # reports (tp_passes.report)
    reports: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=REPORT_HISTORY)
    )
    graph_ids: itertools.count = field(default_factory=itertools.count)
    integrations: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Destroy the groups this owner created and free every derived weight and ring
        (collective where the groups are: call on every rank)."""
        from tp_passes.groups.registry import destroy_groups
        from tp_passes.weights import drop_compiled_graphs

        drop_compiled_graphs()
        destroy_groups()
        self.reports.clear()
        self.integrations.clear()


_OWNER: list[Owner] = []  # the process's owner (one: process groups are process-wide)


def owner() -> Owner:
    """This process's owner, created on first use."""
    if not _OWNER:
        _OWNER.append(Owner())
    return _OWNER[0]
