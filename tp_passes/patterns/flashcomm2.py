"""FlashComm2 on o_proj: all_to_all before the matmul instead of all_reduce after it.

Before (per TP rank t of n; x is sharded by heads)::

    p = mm(x[T, A/n], t(w_t[H, A/n]))
    y = wait_tensor(all_reduce(p, "sum", tp))          # [T, H]

After (m = flashcomm2, G = n/m; see `comm.flashcomm2_rows` for the piece order)::

    s = all_to_all_single(reorder(pad(x)), odp)        # my tokens, A/m columns
    p = mm(s, t(w_block[H, A/m]))                      # w_block gathered once over ODP
    ys = reduce_scatter(p, "sum", otp)                 # m > 1 only; [T/n, H]
    y  = all_gather(ys, tp)[:T]                        # or stays sharded under SP

The o_proj modules are those `module_tp.selects(config, "oproj_tp", path)` picks.
A bias added before the reduce (rank 0 only) becomes one bias, summed over the TP group
once at compile time, added to every rank's token piece.
"""

from __future__ import annotations

from dataclasses import dataclass

def flashcomm2_size_error(m: int, n: int) -> str:
    """Why flashcomm2=m cannot run on a TP group of n ranks ('' if it can)."""
    if n % m or (m >= n and m != 1):
        return f"flashcomm2={m} must divide the TP size n={n} and be smaller than it"
    return ""


@dataclass(frozen=True)
class FlashComm2Groups:
    otp: str  # group names for functional collectives
    odp: str
    m: int
    G: int
