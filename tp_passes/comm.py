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


def gather_rows(x: torch.Tensor, group: str | Collectives, n: int, rows: int) -> torch.Tensor:
    """Inverse of the token sharding: [Tl, F] -> [rows, F]."""
    return collectives(group).all_gather(x).narrow(0, 0, rows)


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
    w_block: torch.Tensor | None,
    odp_group: str | Collectives,
    odp_size: int,
    otp_group: str | Collectives | None,
    otp_size: int,
    mm: Local | None = None,
) -> torch.Tensor:
    """FlashComm2 o_proj: head-sharded x [T, A/n] -> token-sharded y [Tl, H] (no bias).
    `mm`: the product by the layer's own kernel on its [H, A/m] block (vLLM: prepacked),
    instead of `linear(X, w_block)`.

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
    recv = collectives(odp_group).all_to_all(send)
    # recv: G sources x [m*tl, A/n]; source i' holds column block i' of this ODP block
    X = recv.reshape(G, m * tl, a_local).transpose(0, 1).reshape(m * tl, G * a_local)
    y = _local(mm, w_block)(X)
    if m > 1:
        assert otp_group is not None
        y = collectives(otp_group).reduce_scatter(y)
    return y


# -- module TP across data-parallel ranks (every rank brings its own T tokens) -------------
# k = group size, j = my index. All ranks of the group must bring the same T (the callers
# pad to the group maximum first; see `pad_to_group_max`). Every weight is sharded so that
# each output element is one rank's whole dot product (linear layers by output rows, the
# embedding by vocab rows): no partial sums cross ranks, so a bf16 shard rounds exactly as
# the unsharded matmul does, and the exchange moves the same bytes as a column split would.


class Collectives:
    """The dim-0 collectives of one group that module TP exchanges through: torch's
    functional collectives on a named group (traceable; a graph rewrite emits these).
    A host with faster ones (vLLM's shared-memory or device communicators) subclasses."""

    transport = "torch functional collectives"

    def __init__(self, group: str) -> None:
        self.group = group

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [k*T, ...], source-major."""
        return funcol.all_gather_single(x, 0, self.group)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """[k*c, ...]: chunk d goes to rank d; returns the k chunks received, source-major."""
        return funcol.all_to_all_single(x, None, None, self.group)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[k*c, ...] -> my chunk of the sum over ranks."""
        return funcol.reduce_scatter_single(x, "sum", 0, self.group)


def collectives(group: str | Collectives) -> Collectives:
    return group if isinstance(group, Collectives) else Collectives(group)


def _wait(x: torch.Tensor) -> torch.Tensor:
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


def _back(y: torch.Tensor, c: Collectives, k: int, t: int, width: int) -> torch.Tensor:
    """[k*t, W/k] (my output columns of every rank's tokens) -> [t, width] (all output
    columns of my tokens): all_to_all, sources side by side, padding cut."""
    mine = c.all_to_all(y)  # [k (source: its column block), t, W/k]
    return mine.reshape(k, t, -1).transpose(0, 1).reshape(t, -1)[:, :width]


def rows_dp(
    x: torch.Tensor,
    w_j: torch.Tensor | None,
    group: str | Collectives,
    k: int,
    width: int,
    mm: Local | None = None,
) -> torch.Tensor:
    """x[T, in] @ W.T with W sharded by output rows: w_j = rows chunk j of W padded to a
    multiple of k ([width/k, in]); o_proj and lm_head. Gather every rank's tokens, compute
    my output columns for all of them, all_to_all back so each rank has every column of
    its own tokens. `mm`: the local product by a layer's own kernel (vLLM: a prepacked or
    quantized shard), instead of `linear(X, w_j)`."""
    c = collectives(group)
    y = _local(mm, w_j)(c.all_gather(x))  # [kT, width/k]
    return _back(y, c, k, x.shape[0], width)


def embedding_dp(
    ids: torch.Tensor,
    w_j: torch.Tensor,
    j: int,
    group: str | Collectives,
    k: int,
    lookup: Local | None = None,
) -> torch.Tensor:
    """W[ids] with W sharded by rows: w_j = rows [j*V/k, (j+1)*V/k) (vocab padded to k).
    Each row is found on one rank and zeros elsewhere, so the sum is exact.
    `lookup`: the local lookup by a layer's own kernel, instead of `F.embedding(., w_j)`."""
    c = collectives(group)
    all_ids = c.all_gather(ids.reshape(-1))
    rows = w_j.shape[0]
    local = all_ids - j * rows
    outside = (local < 0) | (local >= rows)
    found = (lookup or (lambda i: F.embedding(i, w_j)))(local.masked_fill(outside, 0))
    return c.reduce_scatter(found.masked_fill(outside.unsqueeze(-1), 0.0))


@torch.library.custom_op("tp_passes::row_positions", mutates_args=())
def row_positions(ids: torch.Tensor) -> torch.Tensor:
    """0, 1, ... in the shape of `ids`, as int32 (token counts fit): opaque to Inductor,
    which must load them as it loads token ids (see `as_lookup`)."""
    return torch.arange(ids.numel(), dtype=torch.int32, device=ids.device).view(ids.shape)


@row_positions.register_fake
def _(ids: torch.Tensor) -> torch.Tensor:
    return ids.new_empty(ids.shape, dtype=torch.int32)


def as_lookup(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The exchanged embedding rows, [n, H] for the n ids, written as a lookup in the shape
    of `ids`. Compiled, the unsharded model's lookup is fused into the kernels that read it
    (the first norm, every later residual add), and Inductor picks their vectorization, and
    so the order of the norm's sum, by the loads it makes; behind a buffer those kernels
    change and bf16 greedy tokens drift. A lookup by positions keeps the same kernels, and
    the same bits."""
    return F.embedding(row_positions(ids).long(), rows.reshape(ids.numel(), -1))


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
    group: str | Collectives,
    k: int,
    width: int,
    act: str = "silu",
    local: tuple[Local, Local] | None = None,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)), every weight sharded by output rows (a merged gate_up
    weight half by half, see `shard_halves`): gather the tokens, my slice of the
    intermediate for all of them, gather the intermediate's slices (each rank needs all of
    it for its rows of down), my output columns, all_to_all back. `local`: (up part, down
    part) by a module's own layers (vLLM), instead of the three products."""
    c = collectives(group)
    xs = c.all_gather(x)  # [kT, H]
    if local is None:
        up = lambda v: ACTIVATIONS[act](linear(v, gate_j)) * linear(v, up_j)  # noqa: E731
        down = lambda v: linear(v[:, : down_j.shape[1]], down_j)  # noqa: E731 (pad cut)
    else:
        up, down = local
    h = up(xs)  # [kT, I/k]
    n = xs.shape[0]
    full = c.all_gather(h).reshape(k, n, -1).transpose(0, 1).reshape(n, -1)  # [kT, I]
    return _back(down(full), c, k, x.shape[0], width)


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


def group_rows(rows: int, key: str, group: str | Collectives, k: int) -> list[int]:
    """Every rank's row count, by one small all_gather that also carries the module's
    `key`: ranks that entered different modules raise together instead of exchanging
    mismatched rows.

    Module TP over DP exchanges tokens between ranks that serve different requests, so
    their T may differ; padding to the largest instead of assuming equal T is what keeps
    them from hanging (vllm-ascend #10586).
    """
    mine = torch.tensor([rows, zlib.crc32(key.encode())], dtype=torch.int64)
    every = _wait(collectives(group).all_gather(mine)).reshape(k, 2).tolist()
    if len({code for _, code in every}) > 1:
        raise RuntimeError(
            f"tp_passes: ranks of a module TP group entered different modules ({key} here; "
            f"module codes {[code for _, code in every]}): the DP ranks are not in lockstep"
        )
    return [r for r, _ in every]


def pad_to(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended to dim 0 up to `rows`."""
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


def pad_to_group_max(x: torch.Tensor, group: str, k: int, key: str) -> tuple[torch.Tensor, int]:
    """Pad dim 0 to the largest T in the group (`group_rows`); return (x, max T)."""
    t_max = max(group_rows(x.shape[0], key, group, k))
    return pad_to(x, t_max), t_max
