"""Every trainable compared method through the same trainer and 2-rank ZeRO-3 engine (all
parameters partitioned): pause / no_stage3 / adapter / coconut / softcot each train a few steps on
the tiny default with finite, decreasing loss. One launch loops over the methods (about a minute)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.dist

MODES = {
    "pause": ["cot", "pause", "pause"],
    "no_stage3": ["cot", "hidden"],
    "adapter": ["cot", "hidden", "fusion"],
    "coconut": ["cot", "hidden", "hidden"],
    "softcot": ["cot", "cot", "cot"],
}


@pytest.fixture(scope="module")
def result(tmp_path_factory, repo_root, run_ranks):
    work = tmp_path_factory.mktemp("methods")
    out = work / "result.json"
    run_ranks(
        repo_root / "tests" / "dist" / "methods_worker.py",
        nproc=2,
        args=["--out", str(out), "--workdir", str(work)],
        timeout=300,
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", list(MODES))
def test_method_trains_under_zero3_with_decreasing_loss(result, method):
    r = result[method]
    assert r["world"] == 2 and r["sharded_params"] > 0, "ZeRO-3 did not partition the model"
    assert r["modes"] == MODES[method]
    assert r["module"] == ("SoftCoTLM" if method == "softcot" else "LatentLM")
    losses, stages = r["losses"], r["stages"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # the method's own (last) stage also lowers the loss, not only the CoT warm-up before it
    last = [v for v, s in zip(losses, stages) if s == stages[-1]]
    if len(last) > 1:
        assert last[-1] < last[0], (method, last)
