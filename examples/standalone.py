"""README's standalone example: a hand-written Megatron-style TP block compiled with tp_passes.

    torchrun --nproc-per-node 2 examples/standalone.py
"""

import torch
import torch.distributed as dist
import torch.nn as nn

import tp_passes

dist.init_process_group("gloo")
n, rank = dist.get_world_size(), dist.get_rank()
torch.manual_seed(0)  # the same weights and tokens on every rank


class Block(nn.Module):
    def __init__(self, hidden: int = 64, inner: int = 128) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.up = nn.Linear(hidden, inner // n, bias=False)  # column-parallel
        self.o_proj = nn.Linear(inner // n, hidden, bias=False)  # row-parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.o_proj(torch.relu(self.up(self.norm(x))))
        dist.all_reduce(y)
        return x + y


model, x = nn.Sequential(Block(), Block()), torch.randn(37, 64)  # 37 tokens: uneven
with torch.no_grad():
    ref = model(x)
    out = torch.compile(model, backend="tp_passes", options={"flashcomm2": 1})(x)
applied = [f"{e['rewrite']} at {e['module']}" for e in tp_passes.last_report() if e["applied"]]
print(f"rank {rank}: max |diff| {(out - ref).abs().max().item():.2e}; applied: {applied}")
dist.destroy_process_group()
