"""The run-dir layout's owner: ``--checkpoint`` resolution, stage state, the latent meta file and
the ``python -m ltscale.rundir`` queries the Slurm scripts ask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ltscale import rundir
from ltscale.rundir import resolve_checkpoint
from tests.helpers import launch_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def _hf(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolve_checkpoint_variants(tmp_path) -> None:
    hf = _hf(tmp_path / "direct")
    assert resolve_checkpoint(hf) == hf
    stage = tmp_path / "run" / "stage2"
    _hf(stage / "hf")
    assert resolve_checkpoint(stage) == stage / "hf"
    run = tmp_path / "run"
    _hf(run / "stage1" / "hf")
    _hf(run / "stage10" / "hf")  # numeric, not lexicographic, order
    (run / "stage11").mkdir()  # interrupted before its export: skipped
    (run / "tb").mkdir()
    assert resolve_checkpoint(run) == run / "stage10" / "hf"
    assert resolve_checkpoint(str(run)) == run / "stage10" / "hf"


def test_resolve_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty" / "stage1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint(tmp_path / "empty")
    msg = str(e.value)
    assert str(tmp_path / "empty" / "config.json") in msg
    assert str(tmp_path / "empty" / "hf" / "config.json") in msg
    assert str(tmp_path / "empty" / "stage1" / "hf" / "config.json") in msg


def _run(tmp_path: Path) -> Path:
    """stage1 complete, stage2 mid-training (checkpoint step-000004 named by ``latest``), stage10 empty."""
    run = tmp_path / "run"
    (run / "stage1" / "ckpt" / "final").mkdir(parents=True)
    (run / "stage1" / "COMPLETE").write_text("{}")
    (run / "stage2" / "ckpt" / "step-000004").mkdir(parents=True)
    (run / "stage2" / "ckpt" / "latest").write_text("step-000004\n")
    (run / "stage10").mkdir()
    (run / "stage3.txt").write_text("not a stage dir")
    return run


def test_stage_state(tmp_path) -> None:
    run = _run(tmp_path)
    assert rundir.stages(run) == [1, 2, 10] and rundir.finished_stages(run) == [1]
    assert rundir.latest_tag(run, 2) == "step-000004" and rundir.latest_tag(run, 1) is None
    assert rundir.check_stage_order(run, 1) is False  # complete: nothing to do
    assert rundir.check_stage_order(run, 2) is True
    with pytest.raises(rundir.StageOrderError, match=r"stage2/COMPLETE does not exist; run --stage 2 first"):
        rundir.check_stage_order(run, 3)
    (run / "stage2" / "ckpt" / "latest").write_text("step-000009")  # names no directory
    assert rundir.latest_tag(run, 2) is None


def test_shell_queries(tmp_path, capsys) -> None:
    run = _run(tmp_path)

    def ask(*args: str) -> tuple[int, str, str]:
        rc = rundir.main(list(args))
        out = capsys.readouterr()
        return rc, out.out.strip(), out.err.strip()

    assert ask("stage-dir", str(run), "2") == (0, str(run / "stage2"), "")
    assert ask("ckpt-dir", str(run), "2") == (0, str(run / "stage2" / "ckpt"), "")
    assert ask("hf-dir", str(run), "3") == (0, str(run / "stage3" / "hf"), "")
    assert ask("complete-file", str(run), "1") == (0, str(run / "stage1" / "COMPLETE"), "")
    assert ask("stage-complete", str(run), "1")[0] == 0 and ask("stage-complete", str(run), "2")[0] == 1
    assert ask("latest-tag", str(run), "2") == (0, "step-000004", "")
    assert ask("latest-tag", str(run), "1") == (0, "none", "")
    assert ask("check-stage", str(run), "1") == (0, "complete", "")
    assert ask("check-stage", str(run), "2") == (0, "ready", "")
    rc, out, err = ask("check-stage", str(run), "3")
    assert rc == 2 and out == "" and str(run / "stage2" / "COMPLETE") in err
    _hf(run / "stage1" / "hf")
    # the answer on stdout; stage10 has no export yet, which is logged
    assert ask("checkpoint", str(run))[:2] == (0, str(run / "stage1" / "hf"))
    rc, _, err = ask("checkpoint", str(tmp_path / "nowhere"))
    assert rc == 2 and err.startswith("ltscale: error: checkpoint not found")


def test_queries_run_as_a_module_without_torch(tmp_path) -> None:
    """What the shell runs: ``python -m ltscale.rundir``, pure Python (no torch import to pay for)."""
    run = _run(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "ltscale.rundir", "latest-tag", str(run), "2"],
        capture_output=True, text=True, timeout=60, env=launch_env(REPO_ROOT), cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout == "step-000004\n", out.stderr
    probe = "import sys, ltscale.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env=launch_env(REPO_ROOT))  # fmt: skip
    assert out.stdout.strip() == "False", out.stderr


def test_latent_meta_round_trip_and_export_merge(tmp_path) -> None:
    meta = rundir.latent_meta(mode="fusion", alpha=0.6, temperature=1, top_p=0.9, thinking_token_id=7, adapter=False,
                              adapter_hidden=None, method="coconut", coconut={"n_latent": 4})  # fmt: skip
    stage_hf = tmp_path / "run" / "stage3" / "hf"
    stage_hf.mkdir(parents=True)
    rundir.write_meta(stage_hf, meta)
    assert rundir.read_meta(stage_hf) == meta and json.loads((stage_hf / rundir.LATENT_META_FILE).read_text())
    assert isinstance(meta["temperature"], float)
    with pytest.raises(ValueError, match=r"lacks \['thinking_token_id'"):
        rundir.write_meta(tmp_path, {"mode": "cot", "alpha": 0.6, "temperature": 1.0, "top_p": 0.9})
    # an `ltscale export` of stage3/ckpt/<tag>: latent keys only, the method entries come from stage3/hf
    export = tmp_path / "export"
    export.mkdir()
    source = {"checkpoint": str(tmp_path / "run" / "stage3" / "ckpt" / "final")}
    own = {k: meta[k] for k in rundir.LATENT_KEYS} | {"mode": "hidden", "source": source}
    rundir.write_meta(export, own)
    merged = rundir.inference_meta(export)
    assert merged["method"] == "coconut" and merged["coconut"] == {"n_latent": 4}
    assert merged["mode"] == "hidden" and merged["source"] == source  # its own keys win
    assert rundir.inference_meta(tmp_path / "missing") == {}
