"""``ltscale compare --seeds`` for real, shrunk: CoT and LT-Tuning trained per seed
(one rank each, a tiny model, 2 steps per stage), scored on an enlarged held-out set with the
collapse/difficulty analyses, and ``ltscale report`` re-rendering the report from the result JSON
files alone (the run dirs deleted). About a minute on a quiet 2-core box."""

from __future__ import annotations

import json
import shutil

import pytest

from ltscale.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.tokenizer_vocab_size=120", "data.synthetic.n_train=64", "data.synthetic.n_test=6",
    "train.micro_batch_size=8", "train.max_steps_per_stage=2", "train.save_every=null",
    "eval.max_new_tokens=24", "eval.batch_size=8",
]  # fmt: skip
METHODS = ["cot", "lt_tuning"]


def test_compare_two_seeds_then_report_from_results_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--methods", ",".join(METHODS), "--seeds", "1", "2", "--heldout", "10",
            "--stage-epochs", "1,1,1", "--analysis-samples", "4", "--nproc", "1", *SMALL]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = {
        (s, m): json.loads((out / "results" / f"seed{s}" / f"{m}.json").read_text()) for s in (1, 2) for m in METHODS
    }
    for (s, m), r in results.items():
        assert r["method"] == m
        assert r["seed"] == s and r["problems"]["id"] == results[(1, "cot")]["problems"]["id"]
        assert len(r["problems"]["correct"]) == r["summary"]["n"] == 10
        assert r["provenance"]["command"].startswith("ltscale compare --out ")
    lt = results[(1, "lt_tuning")]
    assert lt["analysis"]["probe_collapse"] and lt["analysis"]["difficulty"]["n"] == 10
    # each seed trained its own CoT model (train.seed: init, order, tokenizer)
    cot1, cot2 = (out / f"seed{s}" / "cot" / "config.resolved.yaml" for s in (1, 2))
    assert "seed: 1" in cot1.read_text() and "seed: 2" in cot2.read_text()
    assert (out / "seed2" / "lt_tuning" / "config.resolved.yaml").read_text().count(
        str(out / "seed2" / "cot" / "stage1" / "hf")
    ) == 1
    report = (out / "compare.md").read_text()
    assert printed.startswith(report) and "| method − lt_tuning |" in report
    # the tables come back from the JSON files alone
    kept = tmp_path / "kept"
    shutil.copytree(out / "results", kept)
    shutil.rmtree(out)
    assert main(["report", str(kept)]) == 0
    assert capsys.readouterr().out == report
