"""Check the CUDA route of tp_passes on a GPU machine, failing loudly instead of skipping.

    python bench/cuda_route.py [--device cuda] [--out bench/out/cuda_route.json]

1. Inductor on the device with `tp_passes.TPPass` as its post-grad pass: a TP-sharded
   2-layer Llama (`tp_passes.testing.models.RefLlama`) on a fake process group of 2
   ranks (one GPU: compile only, the collectives trace but do not run). Checks the pass
   ran (every all-reduce turned into reduce_scatter + all_gather in the report) and that
   Inductor generated device code containing the collectives.
2. vLLM's config translation on the running platform: `compilation_config={"backend":
   "tp_passes"}` must become VLLM_COMPILE with our pass in vLLM's post-grad slot, graph
   partition on, CUDA graphs kept. Needs a CUDA build of vLLM; without one this step fails
   (say `--no-vllm` to leave it out, and the JSON says it was left out).

Any check that does not hold raises; the exit status is non-zero. `--device cpu` runs
step 1 on CPU (this is how the script itself is tested where there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def check_inductor_pass(device: str) -> dict:
    from torch._inductor.utils import run_and_get_code
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import tp_passes
    from tp_passes.report import last_report
    from tp_passes.testing.models import ModelConfig, RefLlama

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        torch.manual_seed(0)
        model = RefLlama(ModelConfig(layers=2), dist.group.WORLD).to(device)
        ids = torch.randint(0, 64, (13,), device=device)
        compiled = torch.compile(
            model,
            options={
                "post_grad_custom_post_pass": tp_passes.TPPass({"sequence_parallel": True}),
                "fx_graph_cache": False,  # the pass must run here, not a cached graph
            },
        )
        with torch.no_grad():
            _, codes = run_and_get_code(compiled, ids)
        entries = last_report()
    finally:
        dist.destroy_process_group()
    applied = sorted(e["module"] or e["rewrite"] for e in entries if e["applied"])
    sp = [e for e in entries if e["rewrite"] == "sequence_parallel"]
    code = "\n".join(codes)
    checks = {
        "sequence_parallel_sites": len(sp),
        "all_applied": bool(sp) and all(e["applied"] for e in sp),
        "reduce_scatter_in_code": "reduce_scatter" in code,
        "all_gather_in_code": "all_gather" in code,
        "device_kernels_in_code": ("triton" in code) if device == "cuda" else ("cpp" in code),
    }
    failed = [k for k, v in checks.items() if v is False or v == 0]
    if failed:
        raise SystemExit(f"cuda_route: Inductor pass checks failed on {device}: {failed} {checks}")
    return {"device": device, "checks": checks, "applied": applied}


def check_vllm_translation() -> dict:
    try:
        from vllm.config import CompilationConfig, CompilationMode, VllmConfig
        from vllm.platforms import current_platform
    except Exception as e:  # noqa: BLE001 - report what is missing, then fail
        raise SystemExit(f"cuda_route: vLLM is not importable here ({e}); pass --no-vllm") from e
    from tp_passes.vllm.config import select_compilation_mode
    from tp_passes.vllm.passes import PASS_KEY, VllmTPPass

    if not current_platform.is_cuda_alike():
        raise SystemExit(
            f"cuda_route: vLLM's platform here is {type(current_platform).__name__}, not CUDA"
        )
    cfg = VllmConfig.__new__(VllmConfig)
    cfg.compilation_config = CompilationConfig(backend="tp_passes")
    cfg.additional_config = {"tp_passes": {"sequence_parallel": True}}
    graphs = cfg.compilation_config.cudagraph_mode
    select_compilation_mode(cfg)
    cc = cfg.compilation_config
    checks = {
        "mode_vllm_compile": cc.mode == CompilationMode.VLLM_COMPILE,
        "pass_installed": isinstance(cc.inductor_compile_config.get(PASS_KEY), VllmTPPass),
        "graph_partition": cc.use_inductor_graph_partition is True,
        "cudagraph_mode_kept": cc.cudagraph_mode == graphs,
    }
    if not all(checks.values()):
        raise SystemExit(f"cuda_route: vLLM translation checks failed: {checks}")
    return {"platform": type(current_platform).__name__, "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--out", default="bench/out/cuda_route.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_route: no CUDA device here; this script checks the CUDA route")
    result = {
        "torch": torch.__version__,
        "inductor_pass": check_inductor_pass(args.device),
        "vllm": "left out (--no-vllm)" if args.no_vllm else check_vllm_translation(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
