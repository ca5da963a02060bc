"""Every CPU benchmark's core function at a trivial size, so bench/ cannot rot between `make bench`
runs. No timing is asserted (timings belong in bench/RESULTS.md); what is asserted is that each
benchmark runs, returns its result dict, and that the bench-only re-implementations of the paper's
and Coconut's schedules still compute ltscale's loss (P1 relies on it to compare fairly).

The multi-process benchmarks (P4 all-gather bytes, P6 scaling, which launch DeepSpeed ranks) are
covered by the dist tier's engine tests; here only their result plumbing is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import paper_schedules  # noqa: E402


def test_schedules_match_ours_in_fp64_values_and_grads():
    ms = common.spec("micro")
    lm = common.build_lm(ms, "fusion", dtype=torch.float64)
    b = common.make_batch(ms, 3, 20, 4, seed=2)
    params = [p for p in lm.parameters() if p.requires_grad]
    ours = lm(**b, return_logits=False).loss
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    for name, fn in paper_schedules.SCHEDULES.items():
        loss = fn(lm, **b)
        assert abs(float(loss) - float(ours)) < 1e-10, name
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, c in zip(g_ours, grads):
            if a is not None:
                assert torch.allclose(a, c, atol=1e-7, rtol=1e-6), name
    assert paper_schedules.per_column_calls(
        b["input_ids"], b["attention_mask"], ms.thinking_id
    ) >= lm.count_passes(b["input_ids"], b["attention_mask"])


def test_paper_like_sites_count_and_range():
    g = torch.Generator().manual_seed(0)
    sites = common.paper_like_sites(8, 5, 40, g)
    assert len(sites) == 8 and all(5 <= s < 40 for s in sites) and sites == sorted(sites)
    toks = list(range(40))
    assert common.insert_latents(toks, sites, 99).count(99) == 8


def test_interleaved_and_paired_ratio():
    calls = []
    t = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2, warmup=0)
    assert calls == ["a", "b", "b", "a"] and len(t["a"]) == 2
    assert common.paired_ratio({"x": [2.0, 4.0], "y": [1.0, 1.0]}, "x", "y") == 3.0


@pytest.mark.parametrize(
    "name", ["train_overhead", "forward_calls", "decoding", "lockstep_passes", "host_syncs"]
)
def test_bench_runs_at_smoke_size(name):
    mod = __import__(name)
    res = mod.run("smoke")
    assert res["table"].startswith("|") and res["headline"]


def test_memory_bench_smoke():
    """The RSS numbers are reported, not asserted (the allocator reuses freed pages, so a peak can
    show no growth); what is asserted is the exact count of bytes saved for backward: present, and
    smaller with gradient checkpointing."""
    import memory

    plain = memory.child("micro", "fusion", False, 2, 16, 2)
    ckpt = memory.child("micro", "fusion", True, 2, 16, 2)
    assert plain["saved_mb"] > 2 * ckpt["saved_mb"] > 0, (plain, ckpt)
    assert ckpt["step_mb"] == ckpt["peak_mb"] - ckpt["rss_before_mb"]


def test_activation_formula_matches_the_measured_bytes_per_layer():
    """ltscale/model/memory.py's per-layer formula against the bytes a step saves (micro shape,
    stage 1 and stage 3, checkpointing off and on): within 1%."""
    import activation_memory

    res = activation_memory.run("smoke")
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        assert r["per_layer"] > 0 or (r["ckpt"] and r["mode"] == "cot"), r
        assert r["per_layer"] == pytest.approx(r["formula_per_layer"], rel=0.01, abs=1.0), r


def test_run_all_headline_formatting():
    import run_all

    assert run_all.headline("scaling.py", {"ratio_2_over_1": 1.5}) == "1.50x"
    assert run_all.headline("train_overhead.py", {}) == "(see output)"
    scripts = [s for s, _ in run_all.BENCHES]
    assert all((BENCH / s).is_file() for s in scripts)
