"""The math of every rewrite, as plain torch functions on tensors.

These functions are the eager twins *and* the graph replacements: the graph rewrites trace
them with make_fx on the matched nodes' fake values and splice the result in, so the two
paths cannot drift apart. Collectives are torch's functional collectives, which trace to
`_c10d_functional.*` ops that Inductor understands.

Token layouts: a token-sharded tensor holds rows ``[j*Tl, (j+1)*Tl)`` of the full tensor
padded to ``Tpad = n*Tl`` rows, ``Tl = ceil(T/n)``; padding rows are zeros on entry and are
sliced off when gathered.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dim 0 with zero rows up to a multiple of n."""
    return F.pad(x, (0, 0, 0, (-x.shape[0]) % n))


def shard_rows(x: torch.Tensor, n: int, j: int) -> torch.Tensor:
    """My row chunk of a replicated [..., F] tensor, as [Tl, F] (flattens leading dims)."""
    flat = pad_rows(x.reshape(-1, x.shape[-1]), n)
    rows = flat.shape[0] // n
    return flat.narrow(0, j * rows, rows)


def reduce_scatter_rows(p: torch.Tensor, group: str, n: int, native: Any = None) -> torch.Tensor:
    """Sum over the group, keep my row chunk: [T, F] partial -> [Tl, F] full sum.
    `native`: a host's own collectives (`tp_passes.fx.NativeCollectives`) to emit instead."""
    if native is not None:
        return native.reduce_scatter(pad_rows(p, n), 0, n, native.group)
    return funcol.reduce_scatter_single(pad_rows(p, n), "sum", 0, group)


def gather_rows(x: torch.Tensor, group: str, n: int, rows: int) -> torch.Tensor:
    """Inverse of the token sharding: [Tl, F] -> [rows, F]."""
    return funcol.all_gather_single(x, 0, group).narrow(0, 0, rows)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())


Local = Callable[[torch.Tensor], torch.Tensor]  # a layer's own local op on its shard


def _local(mm: Local | None, w: torch.Tensor | None) -> Local:
    """X -> X @ w.T, by `mm` when given (a layer's own kernel), else `linear`."""
    if mm is not None:
        return mm
    if w is None:
        raise ValueError("tp_passes.comm: a shard or a local product is needed")
    return lambda X: linear(X, w)


def mm_reduce_scatter(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group: str, n: int
) -> torch.Tensor:
    """reduce_scatter(x @ w.T + bias): the op the fused kernels implement (CPU: decomposed)."""
    return reduce_scatter_rows(linear(x, w, bias), group, n)


def flashcomm2_rows(
    x: torch.Tensor,
    w_block: torch.Tensor,
    odp_group: str,
    odp_size: int,
    otp_group: str | None,
    otp_size: int,
) -> torch.Tensor:
    """FlashComm2 o_proj: head-sharded x [T, A/n] -> token-sharded y [Tl, H] (no bias).

    TP group of n = m*G ranks, TP index t = b*G + i (ODP block b, position i). Rank t holds
    columns block t of A. Token pieces p < n of Tl rows; rank t must end with piece t.
    1. all_to_all inside the ODP block: position i receives, from every member, the
       pieces {j*G + i : j < m} of that member's column block -> [m*Tl, A/m] (block b).
    2. y_partial = X @ W[:, block b].T (w_block is that [H, A/m] slice).
    3. reduce_scatter over OTP ({i + j*G}): member j keeps piece j*G + i = its TP index.
    With m = 1 the ODP group is the TP group and step 3 vanishes.
    """
    m, G = otp_size, odp_size
    xp = pad_rows(x, m * G)
    tl = xp.shape[0] // (m * G)
    a_local = xp.shape[1]
    # reorder pieces so destination i gets pieces [i, G+i, 2G+i, ...]
    send = xp.reshape(m, G, tl, a_local).transpose(0, 1).reshape(m * G * tl, a_local)
    recv = funcol.all_to_all_single(send, None, None, odp_group)
    # recv: G sources x [m*tl, A/n]; source i' holds column block i' of this ODP block
    X = recv.reshape(G, m * tl, a_local).transpose(0, 1).reshape(m * tl, G * a_local)
    y = linear(X, w_block)
    if m > 1:
        y = funcol.reduce_scatter_single(y, "sum", 0, otp_group)
    return y


# -- module TP across data-parallel ranks (every rank brings its own T tokens) -------------
# k = group size, j = my index. All ranks of the group must bring the same T (the eager
# path pads to the group maximum first; see `pad_to_group_max`).


def oproj_dp(
    x: torch.Tensor, w_j: torch.Tensor | None, group: str, k: int, mm: Local | None = None
) -> torch.Tensor:
    """x[T, A] @ W.T with W sharded by input columns: w_j = W[:, chunk j] ([H, A/k]).

    all_to_all sends column chunk c of my tokens to rank c, so rank j holds chunk j of
    every rank's tokens ([kT, A/k]); reduce_scatter sums the k column chunks and returns
    each rank its own tokens. `mm`: the local product X @ w_j.T by a layer's own kernel
    (vLLM: a prepacked or quantized shard), instead of `linear(X, w_j)`.
    """
    x = F.pad(x, (0, (-x.shape[1]) % k))  # A not divisible by k: zero columns (w_j padded too)
    t, a = x.shape
    send = x.reshape(t, k, a // k).transpose(0, 1).reshape(k * t, a // k)
    X = funcol.all_to_all_single(send, None, None, group)
    return funcol.reduce_scatter_single(_local(mm, w_j)(X), "sum", 0, group)


def embedding_dp(
    ids: torch.Tensor,
    w_j: torch.Tensor,
    j: int,
    group: str,
    k: int,
    lookup: Local | None = None,
) -> torch.Tensor:
    """W[ids] with W sharded by rows: w_j = rows [j*V/k, (j+1)*V/k) (vocab padded to k).
    `lookup`: the local lookup by a layer's own kernel, instead of `F.embedding(., w_j)`."""
    all_ids = funcol.all_gather_single(ids.reshape(-1), 0, group)
    rows = w_j.shape[0]
    local = all_ids - j * rows
    outside = (local < 0) | (local >= rows)
    found = (lookup or (lambda i: F.embedding(i, w_j)))(local.masked_fill(outside, 0))
    e = found.masked_fill(outside.unsqueeze(-1), 0.0)
    return funcol.reduce_scatter_single(e, "sum", 0, group)


def lmhead_dp(
    h: torch.Tensor,
    w_j: torch.Tensor | None,
    group: str,
    k: int,
    vocab: int,
    mm: Local | None = None,
) -> torch.Tensor:
    """h[T, H] @ W.T with W sharded by rows (vocab): gather tokens, compute my vocab slice
    for all of them, all_to_all back so each rank has all vocab slices of its tokens.
    `mm` as in `oproj_dp`."""
    t = h.shape[0]
    logits = _local(mm, w_j)(funcol.all_gather_single(h, 0, group))  # [kT, V/k]
    mine = funcol.all_to_all_single(logits, None, None, group)  # [k(source j'), T, V/k]
    return mine.reshape(k, t, -1).transpose(0, 1).reshape(t, -1)[:, :vocab]


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def mlp_dp(
    x: torch.Tensor,
    gate_j: torch.Tensor | None,
    up_j: torch.Tensor | None,
    down_j: torch.Tensor | None,
    group: str,
    k: int,
    act: str = "silu",
    local: Local | None = None,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with gate/up sharded by rows (a merged gate_up weight is
    sharded half by half, see `shard_halves`) and down by columns. `local`: the MLP on
    the gathered rows by a module's own layers (vLLM), instead of the three products."""
    xs = funcol.all_gather_single(x, 0, group)  # [kT, H]
    if local is None:  # [kT, I/k] between the projections
        y = linear(ACTIVATIONS[act](linear(xs, gate_j)) * linear(xs, up_j), down_j)
    else:
        y = local(xs)
    return funcol.reduce_scatter_single(y, "sum", 0, group)


def shard_padded(w: torch.Tensor, dim: int, k: int, j: int) -> torch.Tensor:
    """Chunk j of `w` along `dim` after zero-padding that dim to a multiple of k."""
    pad = (-w.shape[dim]) % k
    if pad:
        widths = [0, 0] * (w.dim() - 1 - dim) + [0, pad]
        w = F.pad(w, widths)
    return w.chunk(k, dim=dim)[j].clone(memory_format=torch.contiguous_format)  # own storage


def shard_halves(w: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """A merged [gate; up] weight: shard each half, never the merged rows."""
    gate, up = w.chunk(2)
    return torch.cat([shard_padded(gate, 0, k, j), shard_padded(up, 0, k, j)])


def pad_to_group_max(x: torch.Tensor, group: str, k: int, key: str) -> tuple[torch.Tensor, int]:
    """Pad dim 0 to the largest T in the group (one small all_gather); return (x, max T).

    Module TP over DP exchanges tokens between ranks that serve different requests, so
    their T may differ; padding instead of assuming equal T is what keeps them from
    hanging (vllm-ascend #10586). The same all_gather carries the module's `key`: ranks
    that entered different modules raise together instead of exchanging mismatched rows.
    """
    mine = torch.tensor([x.shape[0], zlib.crc32(key.encode())], dtype=torch.int64)
    every = funcol.all_gather_single(mine, 0, group)
    every = (every.wait() if isinstance(every, funcol.AsyncCollectiveTensor) else every)
    every = every.reshape(k, 2)
    if len(set(every[:, 1].tolist())) > 1:
        raise RuntimeError(
            f"tp_passes: ranks of a module TP group entered different modules ({key} here; "
            f"module codes {every[:, 1].tolist()}): the DP ranks are not in lockstep"
        )
    t_max = int(every[:, 0].max())
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, t_max - x.shape[0])), t_max
