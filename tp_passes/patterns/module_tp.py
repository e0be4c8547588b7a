"""Fine-grained module TP across data-parallel ranks: which modules, and their groups.

Selection is by module path (last component), with the names users expect; draft and
vision modules are never selected unless asked. The graph rewrites of this family are not
written yet; the eager path (`tp_passes.eager`) applies them to modules.
"""

from __future__ import annotations

O_PROJ = ("o_proj", "out_proj", "wo", "attention.dense")
EMBEDDING = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings")
LM_HEAD = ("lm_head", "output", "embed_out")
MLP_PAIRS = (("gate_up_proj", "down_proj"), ("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
EXCLUDED = ("mtp", "vision", "visual")


def matches(path: str, names: tuple[str, ...], include_excluded: bool = False) -> bool:
    parts = path.split(".")
    if not include_excluded and any(p in EXCLUDED for p in parts):
        return False
    return any(path == n or path.endswith("." + n) for n in names)
