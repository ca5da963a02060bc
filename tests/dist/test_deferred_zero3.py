"""Deferred vocabulary-matrix gradients under 2-rank ZeRO-3 with a tied head: exact gradients
against a single-process step with deferral off, one ``V x d`` gradient per step. One launch."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def result(tmp_path_factory, repo_root, run_ranks):
    out = tmp_path_factory.mktemp("deferred") / "result.json"
    run_ranks(
        repo_root / "tests" / "dist" / "deferred_worker.py", nproc=2, args=["--out", str(out)], timeout=240
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("temperature", ["0.03", "1.0"])
def test_tied_head_deferred_grads_are_exact_under_zero3(result, temperature):
    r = result[f"T={temperature}"]
    assert r["sharded_params"] > 0, "nothing was partitioned: the test would not exercise ZeRO-3"
    assert r["external"] == 1  # tied: the embedding is registered once
    assert r["vocab_builds"] == 1  # one V x d gradient for the step on rank 0
    assert r["max_rel_grad_err"] < 1e-5
    assert r["embedding_grad_norm"] > 0
