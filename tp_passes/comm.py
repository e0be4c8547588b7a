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


def reduce_scatter_rows(p: torch.Tensor, group: str, n: int) -> torch.Tensor:
    """Sum over the group, keep my row chunk: [T, F] partial -> [Tl, F] full sum."""
    return funcol.reduce_scatter_single(pad_rows(p, n), "sum", 0, group)


def gather_rows(x: torch.Tensor, group: str, n: int, rows: int) -> torch.Tensor:
    """Inverse of the token sharding: [Tl, F] -> [rows, F]."""
    return funcol.all_gather_single(x, 0, group).narrow(0, 0, rows)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())


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
