"""What the graph inputs of a Dynamo graph are: module paths and owning modules.

aot_autograd's inputs are the GraphModule's parameters and buffers, then Dynamo's
placeholders, whose `grapharg` source names them (``L['self']._modules['layers']...``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

from tp_passes.fx import module_of, path_from_source


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


def input_names(gm: fx.GraphModule) -> list[str]:
    """Module path of every ATen graph input, in aot_autograd's order."""
    params = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    params += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    phs = list(gm.graph.find_nodes(op="placeholder"))
    return params + [
        path_from_source(src) if src else node.name
        for src, node in zip(_sources(gm)[len(params) :], phs)
    ]


def input_owners(gm: fx.GraphModule, real_inputs: list[Any]) -> list[tuple[Any, str] | None]:
    """(module, attribute) holding each graph input, found through Dynamo's sources and the
    frame being compiled; None where it cannot be found (then the input is never released)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        frame_locals = InstructionTranslator.current_tx().f_locals
    except Exception:
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
