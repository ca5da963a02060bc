"""``ltscale compare`` per seed: budgets mapped onto every method, the CoT-same-steps control, the
enlarged held-out set that leaves the training problems alone, and the seed loop's layout, resume
and report (training and scoring replaced by stand-ins: the real ones run in
tests/e2e/test_compare_seeds.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltscale import compare as cmp
from ltscale import rundir
from ltscale.compare import heldout_records, run_config
from ltscale.config import ConfigError
from ltscale.data.synthetic import synthetic_splits
from ltscale.run_config import load_config
from ltscale.run_setup import Schedule, load_split_records, stage_steps

SMALL_DATA = [
    "data.synthetic.n_train=400",
    "data.synthetic.n_test=20",
    "data.synthetic.max_steps=2",
]


@pytest.mark.parametrize("method, modes, epochs", [
    ("cot", ["cot"], [0.2]),
    ("lt_tuning", ["hidden", "fusion"], [0.4, 1.4]),
    ("cot_same_steps", ["cot", "cot"], [0.4, 1.4]),
    ("pause", ["pause", "pause"], [0.4, 1.4]),
    ("no_stage3", ["hidden"], [0.4]),
    ("adapter", ["hidden", "fusion"], [0.4, 1.4]),
    ("coconut", ["hidden"] * 4, [0.36, 0.36, 0.36, 0.72]),  # 1.8 latent epochs in tiny-coconut's 1:1:1:2
    ("softcot", ["cot"], [1.8]),  # its projection trains for the latent epochs
])  # fmt: skip
def test_stage_epochs_set_every_methods_budget(tmp_path, method, modes, epochs):
    cot_hf = tmp_path / "cot" / "stage1" / "hf"
    cfg = run_config(method, tmp_path, cot_hf, [], stage_epochs=[0.2, 0.4, 1.4])
    assert [st.mode for st in cfg.stages] == modes
    assert [st.epochs for st in cfg.stages] == pytest.approx(epochs)
    default = run_config(method, tmp_path, cot_hf, [])  # no --stage-epochs: the tiny configs' budgets
    assert len(default.stages) == len(cfg.stages)


def test_stage_epochs_must_cover_the_stages(tmp_path):
    with pytest.raises(ConfigError, match=r"--stage-epochs: 2 value\(s\) for the 3 stages of tiny.yaml"):
        run_config("lt_tuning", tmp_path, tmp_path, [], stage_epochs=[1.0, 0.5])


def test_cot_same_steps_trains_lt_tunings_steps_on_its_schedule(tmp_path):
    lt, same = load_config(None), load_config(None, ["method=cot_same_steps"])
    assert [st.mode for st in same.stages] == ["cot", "cot", "cot"]
    assert all(st.max_sites == 0 and st.tau == 0 for st in same.stages)
    n = lt.data.synthetic.n_train
    assert stage_steps(same, n, 2) == stage_steps(lt, n, 2)
    sched = [
        Schedule(stage_steps(c, n, 2), c.optim.warmup_ratio, c.optim.schedule, c.optim.stage_strategy,
                 [st.lr_scale for st in c.stages])
        for c in (lt, same)
    ]  # fmt: skip
    total = sum(stage_steps(lt, n, 2))
    assert [sched[0].multiplier(s) for s in range(total)] == [sched[1].multiplier(s) for s in range(total)]
    # in compare both continue the same CoT checkpoint with the same seed
    a = run_config("lt_tuning", tmp_path, tmp_path / "hf", ["train.seed=7"])
    b = run_config("cot_same_steps", tmp_path, tmp_path / "hf", ["train.seed=7"])
    assert b.method == "cot_same_steps" and b.run_dir == str(tmp_path / "cot_same_steps")
    assert [(s.epochs, s.lr_scale) for s in a.stages] == [(s.epochs, s.lr_scale) for s in b.stages]
    assert (a.model.name_or_path, a.train.seed, a.optim) == (b.model.name_or_path, b.train.seed, b.optim)


def test_heldout_grows_the_test_split_without_touching_training():
    cfg = load_config(None, SMALL_DATA)
    train = load_split_records(cfg, "train")
    base = load_split_records(cfg, "eval")
    held = heldout_records(cfg, 120)
    assert len(held) == 120 and held[:20] == base
    train_q = {r.question for r in train}
    assert not any(r.question in train_q for r in held)
    assert len({r.question for r in held}) == 120
    s = cfg.data.synthetic
    _, stream = synthetic_splits(0, 120, s.seed, min_steps=s.min_steps, max_steps=s.max_steps,
                                 max_value=s.max_value, max_operand=s.max_operand)  # fmt: skip
    assert sum(r.question in train_q for r in stream) > 0  # the stream's next problems hit training ones
    assert load_split_records(cfg, "train") == train
    # why not data.synthetic.n_test=120: that would change the training problems
    bigger = load_split_records(load_config(None, [*SMALL_DATA, "data.synthetic.n_test=120"]), "train")
    assert [r.question for r in bigger] != [r.question for r in train]
    assert heldout_records(cfg, 5) == base[:5] and heldout_records(cfg, None) == base


def test_heldout_beyond_the_split_needs_synthetic_data(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "q", "steps": ["1+1=2"], "answer": "2"}) + "\n")
    cfg = load_config(None, [f"data.eval={data}", "data.eval_split=null"])
    with pytest.raises(ValueError, match=r"--heldout 10: more than the 1 eval problems"):
        heldout_records(cfg, 10)


def _fake_training(calls: list):
    """Stand-in for ``train_run``: records the config, marks every stage complete, writes an HF file."""

    def train_run(config_file: Path, nproc: int, log_file: Path) -> float:
        cfg = load_config(config_file)
        calls.append(cfg)
        for k in range(1, len(cfg.stages) + 1):
            rundir.hf_dir(cfg.run_dir, k).mkdir(parents=True, exist_ok=True)
            (rundir.hf_dir(cfg.run_dir, k) / "model.safetensors").write_text(f"{cfg.method} {cfg.train.seed}")
            rundir.complete_file(cfg.run_dir, k).write_text("")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("trained\n")
        return 10.0 + len(calls)

    return train_run


def _fake_scoring(calls: list):
    """Stand-in for ``score``: a method/seed-dependent but deterministic pattern of right answers."""

    def score(hf, records, *, method, cfg, batch_size, max_new_tokens, analysis_samples):
        calls.append((method, cfg.train.seed, str(hf), len(records)))
        shift = {"cot": 0, "cot_same_steps": 1, "lt_tuning": 2}[method] + cfg.train.seed
        per = [
            {"index": i, "id": r.id, "difficulty": r.difficulty, "correct": (i + shift) % 3 == 0,
             "correct_numeric": (i + shift) % 3 == 0, "num_latent": 0, "num_generated": 5}
            for i, r in enumerate(records)
        ]  # fmt: skip
        from ltscale.eval.evaluate import summarize  # noqa: PLC0415

        return summarize(per).to_dict(), per, {"difficulty": {"spearman": None}}

    return score


def test_compare_seeds_train_each_seed_from_its_own_cot_and_resume(tmp_path, monkeypatch):
    trained, scored = [], []
    monkeypatch.setattr(cmp, "train_run", _fake_training(trained))
    monkeypatch.setattr(cmp, "score", _fake_scoring(scored))
    methods = ["cot", "cot_same_steps", "lt_tuning"]
    kw = dict(methods=methods, seeds=[3, 5], heldout=30, overrides=SMALL_DATA, command="ltscale compare x")
    report, rows = cmp.compare(tmp_path, **kw)
    assert [(c.method, c.train.seed) for c in trained] == [(m, s) for s in (3, 5) for m in methods]
    for c in trained:
        seed_dir = tmp_path / f"seed{c.train.seed}"
        assert c.run_dir == str(seed_dir / c.method)
        if c.method != "cot":  # fine-tuned from that seed's own CoT checkpoint
            assert c.model.name_or_path == str(rundir.hf_dir(seed_dir / "cot", 1))
    assert {(m, s, n) for m, s, _, n in scored} == {(m, s, 30) for s in (3, 5) for m in methods}
    for s in (3, 5):
        assert (tmp_path / f"seed{s}" / "compare.md").is_file()
        assert (tmp_path / f"seed{s}" / "logs" / "lt_tuning.log").read_text() == "trained\n"
        for m in methods:
            r = json.loads((tmp_path / "results" / f"seed{s}" / f"{m}.json").read_text())
            assert (r["method"], r["seed"], len(r["problems"]["id"])) == (m, s, 30)
            assert r["provenance"]["command"] == "ltscale compare x" and r["provenance"]["cpu"] is not None
    assert report == (tmp_path / "compare.md").read_text()
    assert "| cot_same_steps |" in report and "per-seed Δ" in report and len(rows) == 6
    # resumed: nothing trained or scored again; a bigger held-out set re-scores only
    cmp.compare(tmp_path, **kw)
    assert len(trained) == 6 and len(scored) == 6
    cmp.compare(tmp_path, **{**kw, "heldout": 40})
    assert len(trained) == 6 and len(scored) == 12


def test_compare_refuses_conflicting_seeds(tmp_path):
    with pytest.raises(ValueError, match="--seeds sets the seed"):
        cmp.compare(tmp_path, methods=["cot"], seeds=[1], overrides=["train.seed=2"])
    with pytest.raises(ValueError, match="repeats a seed"):
        cmp.compare(tmp_path, methods=["cot"], seeds=[1, 1])


def test_a_later_methods_run_adds_rows_after_the_earlier_ones(tmp_path, monkeypatch):
    """Rows keep the order methods were first compared in: a second ``--methods`` run (the study
    scored three methods after the first six) must not interleave its rows with the first run's."""
    monkeypatch.setattr(cmp, "train_run", _fake_training([]))
    monkeypatch.setattr(cmp, "score", _fake_scoring([]))
    dates = iter(["2026-01-01 10:00 UTC", "2026-01-01 11:00 UTC", "2026-01-01 12:00 UTC"])
    monkeypatch.setattr(cmp, "provenance", lambda command, root: {"command": command, "date": next(dates)})
    kw = dict(seeds=[3], heldout=12, overrides=SMALL_DATA)
    cmp.compare(tmp_path, methods=["cot", "cot_same_steps"], **kw)
    report, _ = cmp.compare(tmp_path, methods=["lt_tuning", "cot"], **kw)
    first_table = report.split("\n\n")[0]
    rows = [line.split("|")[1].strip() for line in first_table.splitlines()[2:]]
    assert rows == ["cot", "cot_same_steps", "lt_tuning"]
    positions = {
        m: json.loads((tmp_path / "results" / "seed3" / f"{m}.json").read_text())["position"]
        for m in ("cot", "cot_same_steps", "lt_tuning")
    }
    assert positions == {"cot": 0, "cot_same_steps": 1, "lt_tuning": 2}
    assert cmp.row_positions(tmp_path / "results", ["softcot", "cot"]) == {
        "cot": 0, "cot_same_steps": 1, "lt_tuning": 2, "softcot": 3
    }  # fmt: skip
