"""`TPPass` inside vLLM's VLLM_COMPILE: a vLLM `InductorPass` run by its PostGradPassManager.

vLLM installs its `PostGradPassManager` as Inductor's ``post_grad_custom_post_pass`` and
adds the pass found under that key in ``compilation_config.inductor_compile_config`` after
its own passes (noop elimination, fusions), before `fix_functionalization`. The pass must
be a vLLM `InductorPass` (an `is_applicable_for_range` and a `uuid` that enters vLLM's and
Inductor's cache keys): this class wraps `tp_passes.TPPass` so.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from vllm.compilation.passes.inductor_pass import InductorPass

from tp_passes.config import TPConfig
from tp_passes.inductor_pass import TPPass

PASS_KEY = "post_grad_custom_post_pass"


class VllmTPPass(InductorPass):
    """The tensor-parallel rewrites as the custom pass of vLLM's PostGradPassManager."""

    def __init__(self, config: TPConfig) -> None:
        self.inner = TPPass(config)

    @property
    def config(self) -> TPConfig:
        return self.inner.config

    def __call__(self, graph: fx.Graph) -> None:
        self.inner(graph)

    def uuid(self) -> str:
        return self.inner.uuid()


def installed_pass(compilation_config: Any) -> VllmTPPass | None:
    """Our pass, if `compilation_config` carries it."""
    p = compilation_config.inductor_compile_config.get(PASS_KEY)
    return p if isinstance(p, VllmTPPass) else None
