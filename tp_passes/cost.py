"""The cost model behind "auto": predicted time of each alternative at an all-reduce site.

Every collective is priced with the alpha-beta model, per op and per transport::

    time(op, bytes) = latency_us[op] + bytes / (gbps[op] * 1e3)      # microseconds

`bytes` are the ring-algorithm bytes each rank sends (`tp_passes.wire`). What sequence
parallelism saves is memory traffic: the row-wise ops after the reduce (residual add,
norm, casts) run on T/n instead of T tokens, so (n-1)/n of their bytes are not touched::

    keep               = AR(2(n-1)/n * S)                                       S = T*H*b
    sequence_parallel  = RS((n-1)/n * Sp) + AG((n-1)/n * Sp) - (n-1)/n * T*R / mem_gbps
                         (- overlap of the matmul with the reduce-scatter where the
                          device has a fused kernel)                            Sp = ceil(T/n)*n*H*b

R is the row-wise bytes per token measured on the graph. The transports are priced from
`LINKS` (a table with the source of each figure); the transport of the original
all-reduce and of the rewritten collectives can differ (vLLM on CPU reduces through
shared memory, the rewrite's reduce-scatter runs on gloo), and each is priced as its own.
Everything here is pure arithmetic on inputs every rank agrees on (shapes, group sizes,
backend names), so every rank makes the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")


@dataclass(frozen=True)
class Op:
    """One collective on one transport: fixed cost per call and bytes per microsecond."""

    latency_us: float
    gbps: float  # GB/s of per-rank ring bytes

    def time_us(self, nbytes: float) -> float:
        return self.latency_us + nbytes / (self.gbps * 1e3)


@dataclass(frozen=True)
class Link:
    """A transport's collectives and the device's memory and matmul speed."""

    name: str
    ops: Mapping[str, Op]
    mem_gbps: float  # what a row-wise op streams per second
    matmul_tflops: float  # sustained, for the overlap a fused mm + reduce_scatter buys
    fused_mm_reduce_scatter: bool  # a kernel that overlaps the two exists
    source: str

    def time_us(self, op: str, nbytes: float) -> float:
        return self.ops[op].time_us(nbytes)


def _same(latency_us: float, gbps: float) -> dict[str, Op]:
    return {op: Op(latency_us, gbps) for op in OPS}


# Each figure says where it comes from. The "measured" ones come from
# `python bench/step_latency.py` (bench/out/step_latency.json, `calibration`).
LINKS: dict[str, Link] = {
    "gloo": Link(
        "gloo",
        {
            "all_reduce": Op(2680.0, 1.0),
            "reduce_scatter": Op(1640.0, 0.28),
            "all_gather": Op(1140.0, 0.58),
            "all_to_all": Op(690.0, 0.64),
        },
        mem_gbps=17.6,
        matmul_tflops=0.05,
        fused_mm_reduce_scatter=False,
        source="measured: gloo over loopback, 2 ranks on a 2-core AMD EPYC VM "
        "(bench/step_latency.py, `calibration`: medians at 4 KiB and 4 MiB; latencies "
        "varied 1.1-3.7 ms between runs, 4 ranks 3-14 ms)",
    ),
    "shm": Link(
        "shm",
        {
            "all_reduce": Op(5.0, 5.2),
            "all_gather": Op(4.0, 4.3),
            # vLLM's shm ops have neither: module TP builds them from the two above
            "reduce_scatter": Op(5.0, 5.2),
            "all_to_all": Op(4.0, 4.3),
        },
        mem_gbps=17.6,  # the same CPU as gloo's figures
        matmul_tflops=0.05,
        fused_mm_reduce_scatter=False,
        source="measured: vLLM's CPU shared-memory ops (_C.shm_all_gather, shm_allreduce), "
        "2 ranks on a 2-core AMD EPYC VM with AVX-512 BF16: [8, 512] bf16 all_gather 4.1 us, "
        "fp32 all_reduce 5.0 us; [16, 65536] 0.48 ms (bf16) and 0.77 ms (fp32)",
    ),
    "nccl": Link(
        "nccl",
        {
            "all_reduce": Op(12.0, 360.0),
            "reduce_scatter": Op(10.0, 360.0),
            "all_gather": Op(10.0, 360.0),
            "all_to_all": Op(15.0, 300.0),
        },
        mem_gbps=3000.0,
        matmul_tflops=600.0,
        fused_mm_reduce_scatter=True,
        source="approximate: NVIDIA nccl-tests bus bandwidth and small-message latency on "
        "8x H100 SXM (NVLink 4); H100 HBM3 and bf16 dense throughput",
    ),
    "hccl": Link(
        "hccl",
        _same(20.0, 100.0),
        mem_gbps=1500.0,
        matmul_tflops=280.0,
        fused_mm_reduce_scatter=True,
        source="approximate: Ascend 910B HCCS, per Huawei's published link figures",
    ),
}


def module_tp_us(ops: tuple[str, ...], wire_bytes: float, saved_bytes: float, link: Link) -> dict:
    """A module TP exchange per step (its `ops` in order, `wire_bytes` sent per rank)
    against the weight read it saves (memory-bound decode reads every weight byte once per
    step); both in microseconds."""
    rate = min(link.ops[o].gbps for o in ops)  # bytes priced at the slowest op's rate
    exchange = sum(link.ops[o].latency_us for o in ops) + wire_bytes / (rate * 1e3)
    saved = saved_bytes / (link.mem_gbps * 1e3)
    return {"transport": link.name, "exchange_us": round(exchange, 1),
            "weight_read_saved_us": round(saved, 1), "pays": saved > exchange}


def transport(dialect: str, backend: str) -> str:
    """The transport an all-reduce of `dialect` runs on, given its group's torch backend."""
    if dialect == "_C.shm_allreduce":
        return "shm"
    return backend


@dataclass(frozen=True)
class SiteShape:
    """What an all-reduce site moves and what runs after it, per rank."""

    n: int
    hidden: int  # features of the reduced value
    itemsize: int
    rowwise_bytes_per_token: int  # memory traffic of the row-wise ops SP would shard
    mm_flops_per_token: int = 0  # of the matmul feeding the reduce (overlap of fused kernels)


def keep_us(s: SiteShape, tokens: int, link: Link) -> float:
    return link.time_us("all_reduce", 2 * (s.n - 1) * tokens * s.hidden * s.itemsize / s.n)


def sequence_parallel_us(s: SiteShape, tokens: int, link: Link) -> float:
    padded = math.ceil(tokens / s.n) * s.n * s.hidden * s.itemsize
    wire = (s.n - 1) * padded / s.n
    comm = link.time_us("reduce_scatter", wire) + link.time_us("all_gather", wire)
    saved = (s.n - 1) / s.n * tokens * s.rowwise_bytes_per_token / (link.mem_gbps * 1e3)
    overlap = 0.0
    if link.fused_mm_reduce_scatter and s.mm_flops_per_token:
        mm = tokens * s.mm_flops_per_token / (link.matmul_tflops * 1e6)
        overlap = min(mm, link.time_us("reduce_scatter", wire))
    return comm - saved - overlap


def flashcomm2_us(s: SiteShape, tokens: int, link: Link, x_cols: int, m: int) -> float:
    """all_to_all of x ([T, A/n] per rank) over n/m ranks, reduce_scatter over m ranks of the
    full-width product, all_gather of the output (where SP does not keep it sharded)."""
    g = s.n // m
    tl = math.ceil(tokens / s.n)
    a2a = (g - 1) * tl * s.n * x_cols * s.itemsize / g
    out = link.time_us("all_gather", (s.n - 1) * tl * s.hidden * s.itemsize)
    rs = link.time_us("reduce_scatter", (m - 1) * tl * s.hidden * s.itemsize) if m > 1 else 0.0
    return link.time_us("all_to_all", a2a) + rs + out


@dataclass
class Choice:
    """The report's view of one site: predicted microseconds per alternative, the choice."""

    chosen: str
    predicted_us: dict[str, float]
    tokens: str  # "37" or "dynamic [2, 8192]"
    links: dict[str, str]  # alternative -> transport
    pays_from_tokens: int | None = None  # smallest T where the rewrite is predicted to pay
    why: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "predicted_us": {k: round(v, 2) for k, v in self.predicted_us.items()},
            "tokens": self.tokens,
            "links": self.links,
            "pays_from_tokens": self.pays_from_tokens,
            "why": self.why,
            "sources": self.sources,
        }


MAX_TOKENS = 1 << 20  # search bound for the break-even token count


def reference_tokens(lo: int, hi: int) -> int:
    """The T the report prices: the largest of a bounded range, else the smallest."""
    return hi if hi < MAX_TOKENS else lo


def tokens_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"dynamic [{lo}, {hi if hi < MAX_TOKENS else 'inf'}]"


def break_even(pays: Any, lo: int = 1, hi: int = MAX_TOKENS) -> int | None:
    """Smallest T in [lo, hi] with pays(T), for a `pays` that stays true once true; None if
    it never pays in the range."""
    if not pays(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if pays(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def choose_sequence_parallel(
    s: SiteShape,
    tokens: tuple[int, int],
    keep_link: Link,
    new_link: Link,
    setting: bool | str,
) -> Choice:
    """Keep the all-reduce or shard the tokens at one site.

    `tokens` is the (lo, hi) range of T (equal for a static graph). "auto" rewrites only if
    the rewrite is predicted to pay for every T in the range: one compiled graph serves them
    all, and a graph that pays at prefill sizes but costs at decode sizes is kept.
    """
    lo, hi = tokens

    def pays(t: int) -> bool:
        return sequence_parallel_us(s, t, new_link) < keep_us(s, t, keep_link)

    ref = reference_tokens(lo, hi)
    predicted = {
        "all_reduce": keep_us(s, ref, keep_link),
        "sequence_parallel": sequence_parallel_us(s, ref, new_link),
    }
    threshold = break_even(pays)
    label = tokens_label(lo, hi)
    choice = Choice(
        "all_reduce",
        predicted,
        label,
        {"all_reduce": keep_link.name, "sequence_parallel": new_link.name},
        threshold,
        sources={link.name: link.source for link in (keep_link, new_link)},
    )
    if setting is True:
        choice.chosen, choice.why = "sequence_parallel", "sequence_parallel=True"
        if new_link.name != keep_link.name:  # a slower transport than the original's, said so
            choice.why += (
                f" (its collectives run on {new_link.name}, the original all-reduce on "
                f"{keep_link.name})"
            )
    elif setting is False:
        choice.why = "sequence_parallel=False"
    elif threshold is not None and threshold <= lo:
        choice.chosen = "sequence_parallel"
        choice.why = f"auto: predicted to pay for every T >= {threshold}"
    elif threshold is None:
        choice.why = (
            f"auto: predicted slower at every T ({_fmt(predicted)} at T={ref}; reduce on "
            f"{keep_link.name}, rewrite on {new_link.name})"
        )
    else:
        choice.why = (
            f"auto: pays only from T >= {threshold}, and this graph serves T = {label}; "
            f"kept ({_fmt(predicted)} at T={ref})"
        )
    return choice


def _fmt(predicted: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} us" for k, v in predicted.items())
