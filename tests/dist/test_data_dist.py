"""The run's training data under 2 ranks (gloo, CPU): rank 0 alone reads and tokenizes it, both
ranks train on the same memory-mapped examples, a relaunch reuses them, and a data error on
rank 0 stops rank 1 with the same message instead of leaving it waiting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltscale.data import generate_problems

pytestmark = [pytest.mark.dist]

WORKER = Path(__file__).with_name("data_worker.py")


def _run(run_ranks, out: Path, data: Path, *more: str) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["--out", str(out), f"run_dir={out / 'run'}", f"data.train={data}", "data.train_split=null",
            "data.synthetic.n_test=4", "model.tokenizer_vocab_size=120", *more]  # fmt: skip
    run_ranks(WORKER, nproc=2, args=args, timeout=240)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def test_rank0_tokenizes_every_rank_maps_the_same_examples(run_ranks, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in generate_problems(300, seed=5)))
    first = _run(run_ranks, tmp_path / "a", data)
    assert "error" not in first[0] and "error" not in first[1], first
    assert first[0]["n"] == first[1]["n"] == 300
    assert first[0]["digest"] == first[1]["digest"] and first[0]["fingerprint"] == first[1]["fingerprint"]
    assert first[0]["opened"] and not first[1]["opened"]  # rank 1 never reads the training data
    table = tmp_path / "a" / "run" / "data" / "train" / "table.arrow"
    stamp = table.stat().st_mtime_ns
    again = _run(run_ranks, tmp_path / "a", data)  # a relaunch on the same run dir
    assert again[1]["digest"] == first[1]["digest"] and table.stat().st_mtime_ns == stamp


def test_a_data_error_on_rank0_stops_both_ranks(run_ranks, tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [r.to_dict() for r in generate_problems(20, seed=5)]
    rows[7]["answer"] = "seven"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _run(run_ranks, tmp_path / "b", data)
    assert "bad.jsonl:8: answer 'seven' is not a number" in got[0]["error"]
    assert got[1]["error"].startswith("DataError: rank 0 could not prepare the training data: DataError: ")
    assert "bad.jsonl:8" in got[1]["error"]
