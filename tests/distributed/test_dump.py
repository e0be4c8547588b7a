"""TP_PASSES_DUMP=1 writes per-rank graphs and report.json."""

import json

import torch
import torch.distributed as dist

from tp_passes.backend import tp_passes_backend
from tp_passes.testing.models import ModelConfig, RefLlama
from tp_passes.testing import run_ranks


def _compile_with_dump(rank, world):
    torch._dynamo.reset()
    model = RefLlama(ModelConfig(layers=2), dist.group.WORLD)
    with torch.no_grad():
        torch.compile(
            model,
            backend=tp_passes_backend,
            options={"inner": "eager", "flashcomm2": 1, "sequence_parallel": True},
        )(torch.arange(9))
    return rank


def test_dump_writes_graphs_and_report(tmp_path):
    env = {"TP_PASSES_DUMP": "1", "TP_PASSES_DUMP_DIR": str(tmp_path)}
    assert run_ranks(_compile_with_dump, 2, env=env) == [0, 1]
    for rank in range(2):
        graph_dir = tmp_path / f"rank{rank}" / "graph000"
        files = sorted(p.name for p in graph_dir.iterdir())
        assert files == [
            "00_aten.py",
            "01_after_flashcomm2.py",
            "02_after_reduce_scatter.py",
            "03_after_sequence_parallel.py",
            "04_final.py",
            "report.json",
        ]
        before = (graph_dir / "00_aten.py").read_text()
        after = (graph_dir / "04_final.py").read_text()
        assert (
            "_c10d_functional.all_reduce" in before and "_c10d_functional.all_reduce" not in after
        )
        assert "all_to_all_single" in after
        report = json.loads((graph_dir / "report.json").read_text())
        assert report["rank"] == rank
        applied = [e for e in report["entries"] if e["applied"]]
        fc2 = [e for e in applied if e["rewrite"] == "flashcomm2"]
        assert [e["module"] for e in fc2] == [
            "layers.0.self_attn.o_proj",
            "layers.1.self_attn.o_proj",
        ]
        assert {e["module"] for e in applied if e["rewrite"] == "mm_reduce_scatter"} == {
            "layers.0.mlp.down_proj",
            "layers.1.mlp.down_proj",
        }
        assert report["collectives"] == {
            "all_to_all_single": 2,
            "reduce_scatter_tensor": 3,
            "all_gather_into_tensor": 5,
        }
