"""The reference model: a small Llama-style tensor-parallel decoder (functional collectives).

Class names start with `Ref` so they cannot be mistaken for vLLM's layers.

Vocab-parallel embedding, column-parallel q/k/v and merged gate_up, row-parallel o_proj
and down_proj (bias on TP rank 0 only, as vLLM and Megatron write it), GQA, RMSNorm.
Every rank builds the same full weights from `seed` and keeps its TP shard, so the
original model is the reference the rewrites are tested against.
Activations are vLLM-style `[T]` token ids or HF-style `[B, S]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 96
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 8
    intermediate: int = 96
    layers: int = 2
    eps: float = 1e-6
    o_proj_bias: bool = False
    seed: int = 0
    inplace_all_reduce: bool = False  # dist.all_reduce(x) instead of funcol.all_reduce
    tie_embeddings: bool = False  # lm_head.weight is embed_tokens.weight
    merged_gate_up: bool = True  # gate_up_proj, or separate gate_proj and up_proj
    lm_head_bias: bool = False
    mlp_bias: bool = False  # down_proj bias (TP rank 0 only, like o_proj's)
    act: str = "silu"  # the gated MLP's activation: "silu" or "gelu"
    scalar_all_reduce: bool = False  # also all-reduce a 0-dim statistic (a token count)
    # o_proj a plain nn.Linear (bias on every rank), its all-reduce in the attention's forward
    reduce_in_parent: bool = False


def _shard(full: torch.Tensor, dim: int, n: int, j: int) -> torch.Tensor:
    return full.chunk(n, dim=dim)[j].clone()


class RefTP:
    def __init__(self, group: dist.ProcessGroup | None, inplace: bool = False) -> None:
        self.group = group
        self.inplace = inplace
        self.n = dist.get_world_size(group) if group is not None else 1
        self.j = dist.get_rank(group) if group is not None else 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return x
        if self.inplace:
            dist.all_reduce(x, group=self.group)
            return x
        return funcol.all_reduce(x, "sum", self.group)


class RefRowLinear(nn.Module):
    """y = all_reduce(x_j @ W_j.T) (+ bias on rank 0, before the reduce)."""

    def __init__(self, full_w: torch.Tensor, full_b: torch.Tensor | None, tp: RefTP) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(_shard(full_w, 1, tp.n, tp.j), requires_grad=False)
        self.bias = (
            nn.Parameter(full_b.clone(), requires_grad=False) if full_b is not None else None
        )
        self.reduce_results = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.j == 0 else None
        return self.tp.all_reduce(F.linear(x, self.weight, bias))


class RefColumnLinear(nn.Module):
    def __init__(self, full_w: torch.Tensor, tp: RefTP, parts: int = 1) -> None:
        super().__init__()
        # a merged weight (gate_up) is sharded part by part
        chunks = [_shard(p, 0, tp.n, tp.j) for p in full_w.chunk(parts, dim=0)]
        self.weight = nn.Parameter(torch.cat(chunks), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RefVocabEmbedding(nn.Module):
    def __init__(self, full_w: torch.Tensor, tp: RefTP) -> None:
        super().__init__()
        self.tp = tp
        self.per = full_w.shape[0] // tp.n
        self.start = tp.j * self.per
        self.weight = nn.Parameter(_shard(full_w, 0, tp.n, tp.j), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mask = (local < 0) | (local >= self.per)
        e = F.embedding(local.masked_fill(mask, 0), self.weight)
        return self.tp.all_reduce(e.masked_fill(mask.unsqueeze(-1), 0.0))


class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float, g: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(h, generator=g), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, tp: RefTP, g: torch.Generator) -> None:
        super().__init__()
        self.h, self.kv, self.d = c.heads // tp.n, c.kv_heads // tp.n, c.head_dim
        s = c.hidden**-0.5
        self.q_proj = RefColumnLinear(
            s * torch.randn(c.heads * c.head_dim, c.hidden, generator=g), tp
        )
        self.k_proj = RefColumnLinear(
            s * torch.randn(c.kv_heads * c.head_dim, c.hidden, generator=g), tp
        )
        self.v_proj = RefColumnLinear(
            s * torch.randn(c.kv_heads * c.head_dim, c.hidden, generator=g), tp
        )
        a = c.heads * c.head_dim
        wo = a**-0.5 * torch.randn(c.hidden, a, generator=g)
        bo = 0.1 * torch.randn(c.hidden, generator=g) if c.o_proj_bias else None
        if c.reduce_in_parent:
            self.o_proj = nn.Linear(a // tp.n, c.hidden, bias=bo is not None)
            with torch.no_grad():
                self.o_proj.weight.copy_(_shard(wo, 1, tp.n, tp.j))
                if bo is not None:
                    self.o_proj.bias.copy_(bo / tp.n)  # added on every rank before the reduce
            self.o_proj.requires_grad_(False)
        else:
            self.o_proj = RefRowLinear(wo, bo, tp)
        self.tp = tp
        self.reduce_in_parent = c.reduce_in_parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q = self.q_proj(x).unflatten(-1, (self.h, self.d)).transpose(-3, -2)
        k = self.k_proj(x).unflatten(-1, (self.kv, self.d)).transpose(-3, -2)
        v = self.v_proj(x).unflatten(-1, (self.kv, self.d)).transpose(-3, -2)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.o_proj(o.transpose(-3, -2).reshape(*lead, self.h * self.d))
        return self.tp.all_reduce(y) if self.reduce_in_parent else y


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, tp: RefTP, g: torch.Generator) -> None:
        super().__init__()
        s = c.hidden**-0.5
        gate_up = s * torch.randn(2 * c.intermediate, c.hidden, generator=g)
        if c.merged_gate_up:
            self.gate_up_proj = RefColumnLinear(gate_up, tp, parts=2)
        else:
            self.gate_proj = RefColumnLinear(gate_up[: c.intermediate], tp)
            self.up_proj = RefColumnLinear(gate_up[c.intermediate :], tp)
        wd = c.intermediate**-0.5 * torch.randn(c.hidden, c.intermediate, generator=g)
        self.down_proj = RefRowLinear(
            wd, 0.1 * torch.randn(c.hidden, generator=g) if c.mlp_bias else None, tp
        )
        self.act = F.silu if c.act == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, tp: RefTP, g: torch.Generator) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps, g)
        self.self_attn = Attention(c, tp, g)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps, g)
        self.mlp = MLP(c, tp, g)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class RefLlama(nn.Module):
    """Returns final hidden states and logits (lm_head replicated)."""

    def __init__(self, c: ModelConfig, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        tp = RefTP(group, c.inplace_all_reduce)
        g = torch.Generator().manual_seed(c.seed)
        self.embed_tokens = RefVocabEmbedding(torch.randn(c.vocab, c.hidden, generator=g), tp)
        self.layers = nn.ModuleList(DecoderLayer(c, tp, g) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps, g)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=c.lm_head_bias)
        with torch.no_grad():
            self.lm_head.weight.copy_(c.hidden**-0.5 * torch.randn(c.vocab, c.hidden, generator=g))
            if c.lm_head_bias:
                self.lm_head.bias.copy_(0.1 * torch.randn(c.vocab, generator=g))
        self.lm_head.requires_grad_(False)
        self.tp = tp
        self.scalar_all_reduce = c.scalar_all_reduce
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h))
        if self.scalar_all_reduce:  # a global statistic: every rank's mean logit, summed
            logits = logits + self.tp.all_reduce(logits.mean()) * 0
        return logits
