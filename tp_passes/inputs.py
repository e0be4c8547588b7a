"""What the graph inputs of a Dynamo graph are: module paths and owning modules.

aot_autograd's inputs are the GraphModule's parameters and buffers, then Dynamo's
placeholders, whose `grapharg` source names them (``L['self']._modules['layers']...``).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
import torch.fx as fx

from tp_passes.fx import module_of, path_from_source
from tp_passes.owner import owner


def _sources(gm: fx.GraphModule) -> list[str]:
    """Dynamo's source of every graph input (``L['self']._modules['layers']...``), or ''."""
    names = ["" for _ in gm.named_parameters(remove_duplicate=False)]
    names += ["" for _ in gm.named_buffers(remove_duplicate=False)]
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        src = getattr(arg, "source", None) if arg is not None else None
        name = getattr(src, "name", "") if src is not None else ""
        names.append(name() if callable(name) else name)
    return names


def _frame_locals() -> dict[str, Any]:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().f_locals
    except Exception:  # noqa: BLE001 - called outside a Dynamo compile
        return {}


def _outermost_module() -> torch.nn.Module | None:
    """The outermost module whose method is on the Python stack (the model the user
    called: a graph break or regional compilation compiles frames of its submodules)."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame, found = sys._getframe(), None
    while frame is not None:
        if "self" in frame.f_code.co_varnames[:1]:
            me = frame.f_locals.get("self")
            me = me._orig_mod if isinstance(me, OptimizedModule) else me  # torch.compile's
            found = me if isinstance(me, torch.nn.Module) else found
        frame = frame.f_back
    return found


def _self_prefix(frame_locals: dict[str, Any]) -> str:
    """The path of the frame's `self` module under the outermost module being run."""
    me = frame_locals.get("self")
    if not isinstance(me, torch.nn.Module):
        return ""
    # module -> its path under the largest module run so far: a graph break resumes
    # inside a submodule, whose frame knows only itself as `self`
    paths = owner().paths
    for root in (_outermost_module(), me):
        if root is not None and root not in paths:
            for path, sub in root.named_modules():
                if len(path) >= len(paths.get(sub, "")):
                    paths[sub] = path  # the longest path: seen from the largest model
    return paths.get(me, "")


def input_names(gm: fx.GraphModule) -> list[str]:
    """Module path of every ATen graph input, in aot_autograd's order. A frame resumed
    inside a submodule (after a graph break) names inputs by the submodule's full path."""
    params = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    params += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    phs = list(gm.graph.find_nodes(op="placeholder"))
    prefix = _self_prefix(_frame_locals())

    def name(src: str) -> str:
        path = path_from_source(src)
        return f"{prefix}.{path}" if prefix and src.startswith("L['self']") else path

    return params + [
        name(src) if src else node.name for src, node in zip(_sources(gm)[len(params) :], phs)
    ]


def input_owners(gm: fx.GraphModule, real_inputs: list[Any]) -> list[tuple[Any, str] | None]:
    """(module, attribute) holding each graph input, found through Dynamo's sources and the
    frame being compiled; None where it cannot be found (then the input is never released)."""
    frame_locals = _frame_locals()
    if not frame_locals:
        return [None] * len(real_inputs)
    out: list[tuple[Any, str] | None] = []
    for src, t in zip(_sources(gm), real_inputs):
        root = re.match(r"^L\['([^']*)'\]", src)
        owner, leaf = None, ""
        if root is not None and isinstance(frame_locals.get(root.group(1)), torch.nn.Module):
            path = path_from_source(src)
            try:
                owner = frame_locals[root.group(1)].get_submodule(module_of(path))
            except AttributeError:
                owner = None
            leaf = path.rpartition(".")[2]
        found = owner is not None and getattr(owner, leaf, None) is t
        out.append((owner, leaf) if found else None)
    return out


def aten_inputs(
    aten_gm: fx.GraphModule, names: list[str], real: list[Any], owners: list[Any] | None
) -> tuple[list[str], list[Any], list[Any] | None]:
    """Names, real values and owners of the ATen graph's placeholders, from Dynamo's.

    aot_autograd flattens a tensor-subclass input (a DTensor parameter of transformers' TP)
    into its inner tensors, plus symbolic sizes when shapes are dynamic, so the ATen graph
    can have more inputs than Dynamo's. Each placeholder's descriptor (``meta["desc"]``)
    says which Dynamo input and which attribute it is: an inner tensor keeps its parameter's
    module path and its real value is that attribute of the real subclass tensor (a
    DTensor's local shard). Placeholders that are no tensor of a Dynamo input (subclass
    sizes) get no name and no value.
    """
    phs = list(aten_gm.graph.find_nodes(op="placeholder"))
    descs = [p.meta.get("desc") for p in phs]
    if any(d is None for d in descs):  # no descriptors: one placeholder per input
        return names, real, owners
    out_names, out_real = [], []
    out_owners: list[Any] | None = [] if owners is not None else None
    for p, d in zip(phs, descs):
        index, attrs = _resolve(d, names)
        value = real[index] if index is not None and index < len(real) else None
        for attr in attrs:
            value = getattr(value, attr, None)
        out_names.append(names[index] if index is not None and index < len(names) else p.name)
        out_real.append(value)
        if out_owners is not None:  # a subclass's inner tensor is not what its owner holds
            out_owners.append(owners[index] if index is not None and not attrs else None)
    return out_names, out_real, out_owners


def _resolve(desc: Any, names: list[str]) -> tuple[int | None, list[str]]:
    """(Dynamo input index, attribute chain) of an aot_autograd input descriptor."""
    from torch._functorch._aot_autograd import descriptors as d

    if isinstance(desc, d.PlainAOTInput):
        return desc.idx, []
    if isinstance(desc, (d.ParamAOTInput, d.BufferAOTInput)):
        return (names.index(desc.target) if desc.target in names else None), []
    if isinstance(desc, d.SubclassGetAttrAOTInput):
        index, attrs = _resolve(desc.base, names)
        return index, [*attrs, desc.attr]
    return None, []  # subclass sizes / strides, RNG seeds, effect tokens
