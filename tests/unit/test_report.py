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


# ------------------------------------------------------------------ paired statistics (hand-made)


def _ones(n: int, where) -> list[int]:
    return [1 if i in where else 0 for i in range(n)]


def test_paired_bootstrap_known_difference() -> None:
    from ltscale.eval.paired import paired_bootstrap

    n = 200
    ref = _ones(n, range(100))  # 50%
    method = _ones(n, range(120))  # 60%: 20 problems more, none fewer
    p = paired_bootstrap([method, method], [ref, ref])
    assert p.diff == pytest.approx(0.10, abs=1e-12) and p.per_seed == pytest.approx((0.10, 0.10))
    assert p.n_problems == n and p.resamples == 10_000 and p.seed == 0
    se = math.sqrt(0.1 * 0.9 / n)  # d_i in {0, 1} with mean 0.1: the mean's standard error
    assert p.ci_low < 0.10 < p.ci_high
    assert (p.ci_high - p.ci_low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.12)
    assert p.ci_low > 0.0  # 20 one-sided wins out of 200 are far from chance
    again = paired_bootstrap([method, method], [ref, ref])
    assert (again.ci_low, again.ci_high) == (p.ci_low, p.ci_high)  # fixed bootstrap seed


def test_paired_bootstrap_zero_difference_and_identical_runs() -> None:
    from ltscale.eval.paired import paired_bootstrap

    n = 200
    ref = _ones(n, range(100))
    swapped = _ones(n, range(50, 150))  # 50 problems won, 50 lost: same accuracy, different problems
    p = paired_bootstrap([swapped], [ref])
    assert p.diff == 0.0 and p.per_seed == (0.0,)
    se = math.sqrt(0.5 / n)  # d_i = ±1 on half the problems: variance 0.5
    assert p.ci_low < 0.0 < p.ci_high
    assert (p.ci_high - p.ci_low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.12)
    same = paired_bootstrap([ref, swapped], [ref, swapped])
    assert (same.diff, same.ci_low, same.ci_high, same.per_seed) == (0.0, 0.0, 0.0, (0.0, 0.0))


def test_paired_bootstrap_averages_seeds_and_refuses_unpaired_input() -> None:
    from ltscale.eval.paired import paired_bootstrap

    n = 100
    ref = _ones(n, range(50))
    p = paired_bootstrap([_ones(n, range(60)), _ones(n, range(45))], [ref, ref], resamples=500, seed=3)
    assert p.per_seed == pytest.approx((0.10, -0.05)) and p.diff == pytest.approx(0.025)
    assert p.resamples == 500 and p.ci_low < 0.025 < p.ci_high
    with pytest.raises(ValueError, match="differ"):
        paired_bootstrap([ref], [ref, ref])
    with pytest.raises(ValueError, match="different numbers of problems"):
        paired_bootstrap([ref, ref[:-1]], [ref, ref])
    with pytest.raises(ValueError, match="0/1"):
        paired_bootstrap([[0.5] * n], [ref])


# ------------------------------------------------------- compare results: rendered from JSON alone


def _compare_result(method: str, seed: int, correct: list[int], latent: float, pos: int) -> dict:
    from ltscale.eval.compare_results import make_result

    n = len(correct)
    per_example = [
        {
            "id": f"syn-test-{i:05d}",
            "difficulty": 1 + i % 2,
            "correct": bool(c),
            "correct_numeric": bool(c),
            "num_latent": int(latent) * (1 + i % 2),
            "num_generated": 10,
        }
        for i, c in enumerate(correct)
    ]
    by = {
        str(d): {
            "n": n // 2,
            "accuracy": sum(c for i, c in enumerate(correct) if 1 + i % 2 == d) / (n // 2),
            "mean_latent": float(int(latent) * d),
        }
        for d in (1, 2)
    }
    summary = {
        "n": n,
        "accuracy_official": sum(correct) / n,
        "accuracy_numeric": sum(correct) / n,
        "mean_latent_tokens": 1.5 * int(latent),
        "mean_generated_tokens": 10.0,
        "num_truncated": 0,
        "by_difficulty": by,
    }
    analysis = {"difficulty": {"spearman": 0.5 if latent else None}}
    if latent:
        analysis["probe_collapse"] = {
            "1": {"mean_cos": 0.9, "effective_rank": 2.0},
            "6": {"mean_cos": 0.5 + seed / 10, "effective_rank": 3.0},
        }
    return make_result(
        method=method, position=pos, seed=seed, starts_from="scratch" if method == "cot" else "CoT ckpt",
        train_seconds=100.0 * seed, stages=[{"mode": "cot", "epochs": 1.0, "lr_scale": 1.0}],
        summary=summary, per_example=per_example, analysis=analysis, fingerprint="f",
        provenance={"commit": "abc1234", "dirty": False, "command": "ltscale compare --seeds 1 2",
                    "cpu": "Test CPU", "cores": 2, "date": "2026-01-01 00:00 UTC"},
    )  # fmt: skip


def _write_compare_fixture(root) -> None:
    n = 40
    runs = {
        "cot": (0, {1: range(10), 2: range(12)}),
        "lt_tuning": (1, {1: range(20), 2: range(16)}),
        "pause": (2, {1: range(14), 2: range(10)}),
    }
    for method, (pos, by_seed) in runs.items():
        for seed, where in by_seed.items():
            r = _compare_result(method, seed, _ones(n, where), 0 if method == "cot" else 2, pos)
            _write(root / f"seed{seed}" / f"{method}.json", r)


def test_compare_report_renders_means_paired_differences_and_difficulty(tmp_path) -> None:
    from ltscale.eval.compare_results import is_compare_results, load_compare_results, render_compare_report

    _write_compare_fixture(tmp_path / "results")
    assert is_compare_results(tmp_path) and is_compare_results(tmp_path / "results")
    assert not is_compare_results(tmp_path / "results" / "seed1")
    text = render_compare_report(load_compare_results(tmp_path), resamples=2000)
    lines = text.splitlines()
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:5]}
    assert list(rows) == ["cot", "lt_tuning", "pause"]  # compare's order (position), not alphabetical
    sd = lambda a, b: abs(a - b) / math.sqrt(2)  # noqa: E731 - sample std of two values
    assert rows["lt_tuning"][:5] == ["lt_tuning", "CoT ckpt", "1, 2", f"45.00 ± {sd(50, 40):.2f}",
                                     f"45.00 ± {sd(50, 40):.2f}"]  # fmt: skip
    assert rows["lt_tuning"][7:] == ["0.900 ± 0.000 / 0.650 ± 0.071", "3.00 ± 0.00", "0.500 ± 0.000", "150 ± 71"]
    assert rows["cot"][7:10] == ["-", "-", "-"]  # no latents: no probe, no correlation
    paired = {ln.split("|")[1].strip(): ln for ln in lines if "| [" in ln}  # rows with an interval
    assert list(paired) == ["cot", "pause"]
    # cot − lt_tuning: seed 1 25 − 50, seed 2 30 − 40 -> mean −17.5
    assert "| cot | -17.50 | [" in paired["cot"] and paired["cot"].endswith("| 1: -25.0, 2: -10.0 |")
    assert "| pause | -15.00 | [" in paired["pause"] and paired["pause"].endswith("| 1: -15.0, 2: -15.0 |")
    assert "2000 paired bootstrap resamples" in text and "on 40 held-out problems" in text
    assert "| lt_tuning | 45.0 / 2.00 | 45.0 / 4.00 |" in text  # seeds' mean per difficulty
    assert "Problems per difficulty: 1 steps: 20, 2 steps: 20." in text
    assert "- commit abc1234, `ltscale compare --seeds 1 2`, Test CPU (2 cores), 2026-01-01 00:00 UTC" in text


def test_ltscale_report_rerenders_compare_results_without_checkpoints(tmp_path, capsys) -> None:
    from ltscale.eval.compare_results import load_compare_results, render_compare_report

    _write_compare_fixture(tmp_path / "a")
    out = tmp_path / "report.md"
    assert main(["report", str(tmp_path / "a"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() == render_compare_report(load_compare_results(tmp_path / "a"))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "a")]) == 0  # one section per path
    assert capsys.readouterr().out.count(f"## {tmp_path / 'a'}") == 2
    run = _lt_run(tmp_path, 1, 0.3, 0.5, (0.9, 0.5), 4.0, 0.2)
    assert main(["report", str(tmp_path / "a"), str(run)]) == 2
    assert "not both" in capsys.readouterr().err
    other = json.loads((tmp_path / "a" / "seed1" / "pause.json").read_text())
    other["problems"]["id"][0] = "syn-test-99999"
    _write(tmp_path / "a" / "seed1" / "pause.json", other)
    assert main(["report", str(tmp_path / "a")]) == 2
    assert "not scored on the same problems" in capsys.readouterr().err
