"""The embedded default's whole path on 2 CPU ranks: `deepspeed ltscale/train.py`, ZeRO-3, all three
LT-Tuning stages, per-stage checkpoints + HF export + eval, TensorBoard tags, `ltscale eval`.

Shrunk (tiny model, 128 examples, 4 steps per stage) so it runs in about a minute; the full-size
default is what `make run` trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ltscale.monitor import read_scalars

pytestmark = [pytest.mark.e2e, pytest.mark.dist]

SMALL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.tokenizer_vocab_size=120", "data.synthetic.n_train=128", "data.synthetic.n_test=16",
    "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1",
    "train.micro_batch_size=8", "train.log_every=1", "train.save_every=2", "train.keep_last_n=1",
    "eval.max_new_tokens=48", "eval.batch_size=8",
]  # fmt: skip

TAGS = {"train/loss", "train/lr", "train/grad_norm", "latent/tokens_per_sample", "perf/tokens_per_s", "eval/accuracy"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, repo_root):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return run_dir, SMALL + [f"run_dir={run_dir}"]


def train_cmd(run_ranks, repo_root, args, **kw):
    return run_ranks(repo_root / "ltscale" / "train.py", nproc=2, args=args, timeout=600, launcher="deepspeed", **kw)


def test_three_stages_two_ranks(tiny_run, run_ranks, repo_root):
    run_dir, args = tiny_run
    train_cmd(run_ranks, repo_root, args)
    for k, mode in ((1, "cot"), (2, "hidden"), (3, "fusion")):
        sdir = run_dir / f"stage{k}"
        assert (sdir / "ckpt" / "final" / "train_state.json").is_file()
        assert (sdir / "ckpt" / "latest").read_text().strip() == "final"
        assert (sdir / "hf" / "config.json").is_file() and (sdir / "hf" / "ltscale_latent.json").is_file()
        assert json.loads((sdir / "hf" / "ltscale_latent.json").read_text())["mode"] == mode
        marker = json.loads((sdir / "COMPLETE").read_text())
        assert marker["stage"] == k and marker["eval"]["n"] == 16
        summary = json.loads((sdir / "eval.json").read_text())
        assert 0.0 <= summary["accuracy_official"] <= 1.0
        n_examples = sum(1 for _ in (sdir / "eval.examples.jsonl").open())
        assert n_examples == 16
        if k > 1:
            assert marker["insertion"]["latent_tokens"] > 0, "no <thinking> inserted: the latent stage is vacuous"
            assert (sdir / "insertions" / "meta.json").is_file()
    scalars = read_scalars(run_dir / "tb")
    assert scalars.keys() >= TAGS, f"missing TensorBoard tags: {TAGS - scalars.keys()}"
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == sorted(set(steps)), "duplicated or unordered steps in train/loss"
    assert max(v for _, v in scalars["latent/tokens_per_sample"]) > 0
    assert (run_dir / "config.resolved.yaml").is_file() and (run_dir / "ds_config.json").is_file()
    assert (run_dir / "eval_table.md").read_text().count("|") > 10


def test_tensorboard_has_analysis_images_and_collapse_scalars(tiny_run):
    """The analyses after each stage's eval (rank 0): latent/... scalars, analysis/... images, json."""
    from ltscale.monitor import read_tags

    run_dir, _ = tiny_run
    tags = read_tags(run_dir / "tb")
    assert {"analysis/difficulty", "analysis/pca", "analysis/entropy_attention"} <= set(tags["images"])
    scalars = read_scalars(run_dir / "tb")
    for name in ("probe_collapse_cos", "probe_effective_rank", "probe_pc1_var"):
        series = scalars[f"latent/{name}_step1"]
        assert len(series) == 2, f"{name}: one point per latent stage (2 and 3), got {series}"
    assert -1.0 <= scalars["latent/probe_collapse_cos_step1"][-1][1] <= 1.0
    assert "latent/entropy_mean" in scalars
    for k in (1, 2, 3):
        analysis = json.loads((run_dir / f"stage{k}" / "analysis.json").read_text())
        assert analysis["stage"] == k and analysis["n_traced"] == 16
        assert bool(analysis["probe_collapse"]) == (k > 1), "probe only for hidden/fusion checkpoints"


def test_rerun_of_finished_stage_is_a_noop(tiny_run, run_ranks, repo_root):
    run_dir, args = tiny_run
    before = (run_dir / "stage3" / "COMPLETE").stat().st_mtime_ns
    out = train_cmd(run_ranks, repo_root, args + ["--stage", "3"])
    assert "already complete" in out.stdout + out.stderr
    assert (run_dir / "stage3" / "COMPLETE").stat().st_mtime_ns == before


def test_ltscale_eval_and_generate_on_the_run(tiny_run, tmp_path, repo_root):
    run_dir, _ = tiny_run
    data = tmp_path / "test.jsonl"
    ltscale = [sys.executable, "-m", "ltscale.cli"]
    subprocess.run([*ltscale, "data", "synth", "--n", "6", "--seed", "5", "--out", str(data)], check=True,
                   cwd=repo_root)
    out = tmp_path / "results.json"
    subprocess.run([*ltscale, "eval", "--checkpoint", str(run_dir), "--data", str(data), "--output", str(out),
                    "--max-new-tokens", "32"], check=True, cwd=repo_root, capture_output=True, text=True)
    summary = json.loads(out.read_text())
    assert summary["n"] == 6 and "mean_latent_tokens" in summary
    assert (tmp_path / "results.examples.jsonl").is_file()
    gen = subprocess.run([*ltscale, "generate", "--checkpoint", str(run_dir / "stage3"), "Tom has 3 apples.",
                          "--max-new-tokens", "16"], check=True, cwd=repo_root, capture_output=True, text=True)
    assert gen.stdout.strip()


def test_stage3_without_stage2_fails_fast_with_the_path(tmp_path, run_ranks, repo_root):
    run_dir = tmp_path / "fresh"
    out = train_cmd(run_ranks, repo_root, SMALL + [f"run_dir={run_dir}", "--stage", "3"], check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert str(run_dir / "stage2" / "COMPLETE") in text and "run --stage 2 first" in text
    assert not (run_dir / "stage3").exists()


def test_unknown_config_key_names_the_key(tmp_path, repo_root):
    out = subprocess.run([sys.executable, str(repo_root / "ltscale" / "train.py"), f"run_dir={tmp_path}",
                          "train.micro_batchsize=3"], capture_output=True, text=True, cwd=repo_root)
    assert out.returncode == 2
    assert "train.micro_batchsize: unknown key" in out.stderr
    assert not Path(tmp_path / "config.resolved.yaml").exists()
