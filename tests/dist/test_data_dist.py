"""The run's training data under 2 ranks (gloo, CPU): rank 0 alone reads it, both ranks tokenize a
share, both train on the same memory-mapped examples (the single-process build, row for row), a
relaunch reuses them, and a data error found on either rank stops both with the same message
instead of leaving one waiting."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from ltscale.run_config import load_config
from ltscale.data import generate_problems
from ltscale.run_setup import prepare_data

pytestmark = [pytest.mark.dist]

WORKER = Path(__file__).with_name("data_worker.py")


def _run(run_ranks, out: Path, data: Path, *more: str) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["--out", str(out), f"run_dir={out / 'run'}", f"data.train={data}", "data.train_split=null",
            "data.synthetic.n_test=4", "model.tokenizer_vocab_size=120", *more]  # fmt: skip
    run_ranks(WORKER, nproc=2, args=args, timeout=240)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def _digest(train) -> str:
    h = hashlib.sha256()
    for i in range(len(train)):
        e = train[i]
        h.update(repr((e.id, e.input_ids, e.labels, e.prompt_len)).encode())
    return h.hexdigest()


def test_two_ranks_build_the_single_process_table(run_ranks, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in generate_problems(301, seed=5)))
    first = _run(run_ranks, tmp_path / "a", data)
    assert "error" not in first[0] and "error" not in first[1], first
    assert first[0]["n"] == first[1]["n"] == 301
    assert first[0]["digest"] == first[1]["digest"] and first[0]["fingerprint"] == first[1]["fingerprint"]
    cfg = load_config(None, [f"run_dir={tmp_path / 'single'}", f"data.train={data}", "data.train_split=null",
                             "data.synthetic.n_test=4", "model.tokenizer_vocab_size=120"])  # fmt: skip
    single = prepare_data(cfg, tmp_path / "single")
    assert _digest(single.train) == first[0]["digest"]
    assert first[0]["opened"] and not first[1]["opened"]  # rank 1 never reads the training data
    table = tmp_path / "a" / "run" / "data" / "train" / "part-1" / "table.arrow"  # rank 1 tokenized it
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


def test_an_overlong_sequence_in_rank1s_share_stops_both_ranks(run_ranks, tmp_path):
    rows = [r.to_dict() for r in generate_problems(20, seed=5)]
    rows[15]["question"] = "How many? " * 200  # row 15: tokenized by rank 1 (rows 10-19)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _run(run_ranks, tmp_path / "c", data)
    for r in (0, 1):
        assert re.search(
            rf"DataError: {rows[15]['id']}: sequence of \d+ tokens exceeds max_length=256", got[r]["error"]
        )
    assert not (tmp_path / "c" / "run" / "data" / "train").exists()
    assert not list((tmp_path / "c" / "run" / "data").glob(".train.staging*"))
