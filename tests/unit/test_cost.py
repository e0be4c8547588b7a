"""The cost model: its arithmetic on known link figures, its choices for known shapes, and
the choice every site's report entry carries (graphs on the fake process group, with
figures registered for it)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.fx.experimental.proxy_tensor import make_fx

from tp_passes import cost
from tp_passes.backend import rewrite_graph
from tp_passes.config import TPConfig
from tp_passes.wire import collective_counts

# every op: 10 us + bytes / 1 GB/s (1000 bytes per us); memory 1 GB/s
FLAT = cost.Link("flat", cost._same(10.0, 1.0), 1.0, 1.0, False, "test")


def test_alpha_beta_arithmetic():
    s = cost.SiteShape(n=2, hidden=4, itemsize=4, rowwise_bytes_per_token=0)
    # all-reduce of 100 x 4 fp32 = 1600 bytes: ring sends 2(n-1)/n of it
    assert cost.keep_us(s, 100, FLAT) == pytest.approx(10 + 1600 / 1000)
    # reduce-scatter + all-gather: (n-1)/n each, two latencies, nothing saved (R = 0)
    assert cost.sequence_parallel_us(s, 100, FLAT) == pytest.approx(2 * (10 + 800 / 1000))
    # odd T is padded to a multiple of n
    assert cost.sequence_parallel_us(s, 99, FLAT) == cost.sequence_parallel_us(s, 100, FLAT)
    # saved: (n-1)/n of T * R bytes at 1000 bytes per us
    s2 = cost.SiteShape(n=2, hidden=4, itemsize=4, rowwise_bytes_per_token=400)
    assert cost.sequence_parallel_us(s2, 100, FLAT) == pytest.approx(21.6 - 0.5 * 100 * 400 / 1000)


def test_break_even_token_count():
    # SP - keep = alpha - (n-1)/n * T * R / mu  =>  T* = 10 * 2 * 1000 / 400 = 50 (even T)
    s = cost.SiteShape(n=2, hidden=4, itemsize=4, rowwise_bytes_per_token=400)
    assert cost.keep_us(s, 50, FLAT) == pytest.approx(cost.sequence_parallel_us(s, 50, FLAT))
    at_52 = cost.choose_sequence_parallel(s, (52, 52), FLAT, FLAT, "auto")
    at_48 = cost.choose_sequence_parallel(s, (48, 48), FLAT, FLAT, "auto")
    assert at_52.chosen == "sequence_parallel" and at_48.chosen == "all_reduce"
    assert at_52.pays_from_tokens == at_48.pays_from_tokens == 51  # 50 ties, 51 pays (padded)
    assert "pays only from T >= 51" in at_48.why and at_48.tokens == "48"


def test_dynamic_token_count_keeps_unless_every_size_pays():
    s = cost.SiteShape(n=2, hidden=4, itemsize=4, rowwise_bytes_per_token=400)
    wide = cost.choose_sequence_parallel(s, (1, cost.MAX_TOKENS), FLAT, FLAT, "auto")
    assert wide.chosen == "all_reduce" and wide.tokens == "dynamic [1, inf]"
    assert "pays only from T >= 51" in wide.why
    large = cost.choose_sequence_parallel(s, (64, 8192), FLAT, FLAT, "auto")
    assert large.chosen == "sequence_parallel" and large.tokens == "dynamic [64, 8192]"


def test_settings_override_and_still_report_costs():
    s = cost.SiteShape(n=2, hidden=4, itemsize=4, rowwise_bytes_per_token=0)
    forced = cost.choose_sequence_parallel(s, (8, 8), FLAT, FLAT, True)
    assert forced.chosen == "sequence_parallel" and forced.why == "sequence_parallel=True"
    assert forced.predicted_us["sequence_parallel"] > forced.predicted_us["all_reduce"]
    off = cost.choose_sequence_parallel(s, (10**5, 10**5), FLAT, FLAT, False)
    assert off.chosen == "all_reduce" and off.why == "sequence_parallel=False"
    never = cost.choose_sequence_parallel(s, (8, 8), FLAT, FLAT, "auto")
    assert never.chosen == "all_reduce" and never.pays_from_tokens is None
    assert "predicted slower at every T" in never.why


# the vLLM CPU model: hidden 1024 bf16, TP 2; add + RMSNorm read ~4 rows per token
LLAMA_CPU = cost.SiteShape(n=2, hidden=1024, itemsize=2, rowwise_bytes_per_token=5 * 2048)


@pytest.mark.parametrize("tokens", [16, 256, 4096])
def test_vllm_cpu_shared_memory_all_reduce_is_kept(tokens):
    """vLLM on CPU reduces through shared memory; the rewrite's collectives run on gloo."""
    shm, gloo = cost.LINKS["shm"], cost.LINKS["gloo"]
    c = cost.choose_sequence_parallel(LLAMA_CPU, (tokens, tokens), shm, gloo, "auto")
    assert c.chosen == "all_reduce", c
    assert c.links == {"all_reduce": "shm", "sequence_parallel": "gloo"}


def test_forced_on_another_transport_says_so():
    shm, gloo = cost.LINKS["shm"], cost.LINKS["gloo"]
    c = cost.choose_sequence_parallel(LLAMA_CPU, (16, 16), shm, gloo, True)
    assert c.chosen == "sequence_parallel"
    assert c.why == (
        "sequence_parallel=True (its collectives run on gloo, the original all-reduce on shm)"
    )


def test_gloo_decode_sizes_keep_the_all_reduce():
    gloo = cost.LINKS["gloo"]
    for t in (1, 8, 16, 64):
        c = cost.choose_sequence_parallel(LLAMA_CPU, (t, t), gloo, gloo, "auto")
        assert c.chosen == "all_reduce", (t, c)


def test_nccl_prefill_pays_decode_does_not():
    """Large hidden size on NVLink with the fused mm + reduce-scatter: the overlap pays at
    prefill sizes; a decode step of 8 tokens pays two latencies for nothing."""
    s = cost.SiteShape(
        n=8,
        hidden=7168,
        itemsize=2,
        rowwise_bytes_per_token=5 * 14336,
        mm_flops_per_token=2 * 2048 * 7168,
    )
    nccl = cost.LINKS["nccl"]
    assert cost.choose_sequence_parallel(s, (8192, 8192), nccl, nccl, "auto").chosen == (
        "sequence_parallel"
    )
    assert cost.choose_sequence_parallel(s, (8, 8), nccl, nccl, "auto").chosen == "all_reduce"


def test_every_link_cites_its_source():
    for name, link in cost.LINKS.items():
        assert link.name == name and link.source
        assert set(link.ops) == set(cost.OPS)


def test_shared_memory_dialect_is_its_own_transport():
    assert cost.transport("_C.shm_allreduce", "gloo") == "shm"
    assert cost.transport("c10d_functional", "gloo") == "gloo"
    assert cost.transport("vllm.all_reduce", "nccl") == "nccl"


# -- on graphs: the choice each site's report entry carries ---------------------------------


def _block(x, w_o, res, w_norm, w_q):
    y = funcol.all_reduce(torch.mm(x, w_o.t()), "sum", dist.group.WORLD)
    h = y + res
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w_norm
    return torch.mm(n, w_q.t())


NAMES = ["x", "layers.0.o_proj.weight", "residual", "layers.0.norm.weight", "layers.1.q.weight"]


def _graph(n: int, tokens: int, hidden: int = 64):
    inputs = [
        torch.randn(tokens, 32 // n),
        torch.randn(hidden, 32 // n),
        torch.randn(tokens, hidden),
        torch.randn(hidden),
        torch.randn(32, hidden),
    ]
    return make_fx(_block, tracing_mode="fake")(*inputs), inputs


@pytest.fixture
def fake_link(monkeypatch):
    """Figures for the fake group's backend: 10 us per collective, 1 GB/s memory."""
    monkeypatch.setitem(
        cost.LINKS, "fake", cost.Link("fake", cost._same(10.0, 1.0), 1.0, 1.0, False, "test")
    )


@pytest.mark.parametrize("tokens, chosen", [(8, "all_reduce"), (4096, "sequence_parallel")])
def test_auto_on_a_graph_follows_the_model(fake_world, fake_link, tokens, chosen):
    gm, inputs = _graph(fake_world, tokens)
    done = rewrite_graph(gm, TPConfig(), inputs, NAMES)
    (e,) = [e for e in done.entries if e.rewrite == "sequence_parallel"]
    c = e.details["cost"]
    assert c["chosen"] == chosen and e.applied == (chosen == "sequence_parallel")
    assert set(c["predicted_us"]) == {"all_reduce", "sequence_parallel"}
    assert c["links"] == {"all_reduce": "fake", "sequence_parallel": "fake"}
    assert c["tokens"] == str(tokens)
    # the region after the reduce: y and residual read, h and the normed value written
    # (+ the broadcast weight, not token-sized); fp32 rows of 64
    s = cost.SiteShape(fake_world, 64, 4, 0)
    assert c["predicted_us"]["all_reduce"] == pytest.approx(
        cost.keep_us(s, tokens, cost.LINKS["fake"]), abs=0.01
    )
    counts = collective_counts(gm)
    if chosen == "all_reduce":
        assert counts == {"all_reduce": 1} and e.reason.startswith("auto:")
    else:
        assert counts == {"reduce_scatter_tensor": 1, "all_gather_into_tensor": 1}


def test_rowwise_bytes_measured_from_the_graph(fake_world, fake_link):
    from tp_passes.patterns import find_sites
    from tp_passes.patterns.sequence_parallel import rowwise_bytes_per_token

    gm, _ = _graph(fake_world, 16)
    (site,) = find_sites(gm, NAMES)
    # reads: the reduced y and the residual (64 fp32 each); writes: the normed rows that the
    # next matmul reads (h itself only feeds the region)
    assert rowwise_bytes_per_token(site, set()) == 3 * 64 * 4


def test_without_figures_auto_keeps_and_says_why(fake_world):
    gm, inputs = _graph(fake_world, 4096)
    done = rewrite_graph(gm, TPConfig(), inputs, NAMES)
    (e,) = [e for e in done.entries if e.rewrite == "sequence_parallel"]
    assert not e.applied and "no cost figures for transport 'fake'" in e.reason
    assert collective_counts(gm) == {"all_reduce": 1}


def _two_sites(x, w_o, res, w_norm, w_down):
    y = funcol.all_reduce(torch.mm(x, w_o.t()), "sum", dist.group.WORLD)
    h = y + res
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w_norm
    z = funcol.all_reduce(torch.mm(n, w_down.t()), "sum", dist.group.WORLD)
    return z, h


def test_sites_that_disagree_get_one_choice_for_the_graph(fake_world, fake_link):
    """o_proj's reduce is followed by add + norm (pays early), down_proj's goes straight to
    the output (pays late): at T = 32 they disagree, and the graph takes one choice."""
    from tp_passes.patterns import find_sites
    from tp_passes.patterns.sequence_parallel import rowwise_bytes_per_token

    t, n = 32, fake_world
    inputs = [
        torch.randn(t, 32 // n),
        torch.randn(64, 32 // n),
        torch.randn(t, 64),
        torch.randn(64),
        torch.randn(64, 64),
    ]
    names = ["x", "layers.0.o_proj.weight", "res", "layers.0.norm.weight", "layers.0.down.weight"]
    gm = make_fx(_two_sites, tracing_mode="fake")(*inputs)
    a, b = find_sites(gm, names)
    others = {a.ar.result, b.ar.result}
    ra, rb = (rowwise_bytes_per_token(s, others - {s.ar.result}) for s in (a, b))
    link = cost.LINKS["fake"]
    alone = [
        cost.choose_sequence_parallel(cost.SiteShape(n, 64, 4, r), (t, t), link, link, "auto")
        for r in (ra, rb)
    ]
    assert [c.chosen for c in alone] == ["sequence_parallel", "all_reduce"]
    done = rewrite_graph(gm, TPConfig(), inputs, names)
    sp = [e for e in done.entries if e.rewrite == "sequence_parallel"]
    assert len(sp) == 2 and len({e.details["cost"]["chosen"] for e in sp}) == 1
    totals = {
        alt: sum(c.predicted_us[alt] for c in alone) for alt in ("all_reduce", "sequence_parallel")
    }
    assert sp[0].details["cost"]["chosen"] == min(totals, key=totals.get)
    assert "one choice for the graph" in (
        sp[0].details["cost"]["why"] + sp[1].details["cost"]["why"]
    )
