"""``ltscale report``: the results table from hand-made eval JSONs (runs, seeds, benchmarks)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from ltscale.cli import main
from ltscale.eval.report import collect_run, render_report


def _summary(acc: float, num: float, latent: float, **meta) -> dict:
    return {
        "n": 10,
        "accuracy_official": acc,
        "accuracy_numeric": num,
        "mean_latent_tokens": latent,
        "meta": meta,
    }


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _lt_run(root, seed: int, gsm: float, svamp: float, cos: tuple[float, float], rank: float, rho: float):
    run = root / f"lt-seed{seed}"
    run.mkdir(parents=True)
    cfg = {"method": "lt_tuning", "train": {"seed": seed}, "data": {"eval": "../shared/data/gsm8k"}}
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    _write(run / "stage1" / "eval.json", _summary(0.99, 0.99, 0.0, stage=1))  # not the final stage: ignored
    _write(run / "stage3" / "eval.json", _summary(0.01, 0.02, 9.0, stage=3))  # overridden by the full eval
    _write(
        run / "stage3" / "analysis.json",
        {
            "probe_collapse": {
                "1": {"mean_cos": cos[0], "effective_rank": 9.0},
                "6": {"mean_cos": cos[1], "effective_rank": rank},
            },
            "difficulty": {"spearman": rho},
        },
    )
    suite = {
        "benchmarks": {"gsm8k": _summary(gsm, gsm + 0.1, 3.0), "svamp": _summary(svamp, svamp, 5.0)},
        "average": {},
    }
    _write(run / "eval" / "all.json", suite)
    (run / "eval" / "all.gsm8k.examples.jsonl").write_text("{}\n")
    return run


def test_report_mean_std_over_seeds_and_benchmarks(tmp_path) -> None:
    a = _lt_run(tmp_path, 1, 0.30, 0.50, (0.9, 0.5), 4.0, 0.2)
    b = _lt_run(tmp_path, 2, 0.40, 0.70, (0.7, 0.3), 6.0, 0.4)
    cot = tmp_path / "cot_s3"
    _write(cot / "gsm8k.json", _summary(0.25, 0.3, 0.0, benchmark="gsm8k"))
    runs = [collect_run(p) for p in (a, b, cot)]
    assert runs[0].accuracy == {"gsm8k": 0.30, "svamp": 0.50} and runs[0].seed == 1
    assert runs[2].label == "cot" and runs[2].accuracy == {"gsm8k": 0.25}
    text = render_report(runs)
    head, sep, lt_row, cot_row = text.splitlines()[:4]
    assert head == (
        "| method | runs | gsm8k | svamp | avg | mean latent tokens | collapse cos (first / last step) "
        "| eff. rank (last step) | difficulty ρ |"
    )
    assert sep.count("|") == head.count("|")
    cells = [c.strip() for c in lt_row.strip("|").split("|")]
    sd = math.sqrt(2) * 5  # two values 10 points apart -> sample std 7.07
    assert cells[:2] == ["lt_tuning", "2 (seeds 1, 2)"]
    assert cells[2] == f"35.00 ± {sd:.2f}"  # gsm8k 30 / 40
    assert cells[3] == f"60.00 ± {2 * sd:.2f}"  # svamp 50 / 70
    assert cells[4] == f"47.50 ± {1.5 * sd:.2f}"  # per-run avg 40 / 55
    assert cells[5] == "4.00 ± 0.00"  # (3 + 5) / 2 in both runs
    assert cells[6] == f"0.800 ± {math.sqrt(0.02):.3f} / 0.400 ± {math.sqrt(0.02):.3f}"
    assert cells[7] == f"5.00 ± {math.sqrt(2):.2f}"
    assert cells[8] == f"0.300 ± {math.sqrt(0.02):.3f}"
    cot_cells = [c.strip() for c in cot_row.strip("|").split("|")]
    assert cot_cells == ["cot", "1", "25.00", "-", "25.00", "0.00", "-", "-", "-"]
    numeric = render_report([collect_run(a, metric="numeric")], metric="numeric")
    assert "| lt_tuning | 1 | 40.00 | 50.00 |" in numeric and "numeric-tolerant" in numeric


def test_stage_eval_is_used_and_subset_is_named(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"method": "lt_tuning", "data": {"eval": "../shared/data/gsm8k"}, "eval": {"subset": 200}}
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    _write(run / "stage2" / "eval.json", _summary(0.2, 0.2, 1.0, stage=2))
    _write(run / "stage3" / "eval.json", _summary(0.3, 0.3, 2.0, stage=3))
    r = collect_run(run)
    assert r.accuracy == {"gsm8k[:10]": 0.3}  # highest stage only; a partial eval names its n


def test_ltscale_report_cli(tmp_path, capsys) -> None:
    a = _lt_run(tmp_path, 1, 0.30, 0.50, (0.9, 0.5), 4.0, 0.2)
    out = tmp_path / "report.md"
    assert main(["report", str(a), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() and "| lt_tuning | 1 | 30.00 | 50.00 | 40.00 |" in printed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "no eval results" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text("{not json")
    assert main(["report", str(bad)]) == 2
    assert "x.json: not readable JSON" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["m-seed7", "m_s7", "m"])
def test_label_without_config_strips_seed_suffix(tmp_path, name) -> None:
    _write(tmp_path / name / "r.json", _summary(0.5, 0.5, 0.0, benchmark="svamp"))
    assert collect_run(tmp_path / name).label == "m"
