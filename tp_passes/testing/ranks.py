"""Run a function on N real gloo ranks in spawned CPU processes, with a deadline.

Used by the tests, the demo and the benchmarks. Processes come from a forkserver that
has imported torch, Dynamo and Inductor once, so a rank starts in a fraction of a second
instead of paying those imports each time. A rank that raises fails the whole run with its traceback;
a run that outlives `timeout` is killed and reported as a hang, never waited on forever.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    env: dict[str, str],
    timeout: float,
    pg_timeout: float | None,
) -> None:
    os.environ.update(env)
    # a hung rank prints where it is stuck before the parent kills it
    faulthandler.dump_traceback_later(max(timeout - 5, 1), exit=False)
    torch.set_num_threads(1)  # 2 cores shared by up to 8 ranks
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            **({"timeout": datetime.timedelta(seconds=pg_timeout)} if pg_timeout else {}),
        )
        out = fn(rank, world_size, *args)
        # rank 0 hosts the store: if it exited first, a rank still rendezvousing (new_group
        # of a group without rank 0) would lose its connection
        dist.barrier()
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))  # the parent raises it
        sys.exit(1)
    finally:
        try:
            from tp_passes.groups.registry import destroy_groups

            destroy_groups()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class RankFailure(RuntimeError):
    pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    pg_timeout: float | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on `world_size` gloo ranks; return per-rank results.

    `fn` must be importable (module level) and its results picklable. `pg_timeout` (s):
    gloo's own timeout per collective, so a rank stuck in one raises instead of waiting.
    """
    ctx = mp.get_context("forkserver")
    # imported once by the forkserver, not by every rank: Dynamo and Inductor take about
    # 2.7 s of CPU per process to import, and a test run starts hundreds of ranks
    ctx.set_forkserver_preload(
        ["torch", "torch.distributed", "torch._dynamo", "torch._inductor.compile_fx", "tp_passes"]
    )
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, fn, args, results, dict(env or {}), timeout, pg_timeout),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(collected) < world_size:
        if not results.empty():
            rank, status, payload = results.get()
            collected[rank] = (status, payload)
            if status == "error":
                break
            continue
        if time.monotonic() > deadline:
            break
        if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
            time.sleep(0.2)  # let a dying rank's traceback arrive
            if results.empty():
                break
        time.sleep(0.01)
    codes = {i: p.exitcode for i, p in enumerate(procs)}  # before any kill below
    errors = {r: payload for r, (status, payload) in collected.items() if status == "error"}
    for p in procs:
        p.join(timeout=5 if not errors and len(collected) == world_size else 0.1)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        rank, tb = next(iter(sorted(errors.items())))
        raise RankFailure(f"rank {rank} of {world_size} failed:\n{tb}")
    if len(collected) < world_size:
        missing = sorted(set(range(world_size)) - set(collected))
        if all(c is None for c in codes.values()):
            why = f"no result within {timeout:.0f}s: hang"
        else:
            why = "crashed before reporting (is fn importable from a module?)"
        raise RankFailure(f"ranks {missing} of {world_size}: {why}; exit codes {codes}")
    return [collected[r][1] for r in range(world_size)]
