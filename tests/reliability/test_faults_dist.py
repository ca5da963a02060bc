"""Numerical faults and rank failure in a real 2-rank ZeRO-3 run (faults injected by LTSCALE_FAULT).

* NaN/inf loss or NaN gradient on rank 1 only: every rank skips that step (no weight change),
  the run continues; past ``train.max_skipped_steps`` it stops with exit 3 and a checkpoint, and
  a relaunch resumes from it.
* rank 1 exits (or hangs) mid-step: rank 0 exits with a one-line error within a bounded time
  (gloo sees the closed connection at once; a hung peer is caught by the collective timeout), and
  the last checkpoint is intact.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from ltscale.engine.checkpoint import verify_checkpoint
from ltscale.engine.checkpoint_dir import latest_tag
from ltscale.monitor import read_scalars

from .launch import STEPS_PER_STAGE, launch, max_diff, run, zero_weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _ckpt(run_dir, k=1):
    return run_dir / f"stage{k}" / "ckpt"


def test_nan_grad_and_inf_loss_on_one_rank_skip_the_step_everywhere(tmp_path):
    run_dir = tmp_path / "skip"
    # rank 1: a finite loss with a NaN gradient at step 2, an inf loss at step 4
    codes, job = run(run_dir, ["train.save_every=1", "train.keep_last_n=10"], fault="nan:grad.s1:2@1,inf:loss.s1:4@1",
                     args=["--stage", "1"])  # fmt: skip
    assert codes == [0, 0], job.output()
    out = job.output(0)
    assert "stage 1 step 2: non-finite loss or gradient on some rank; step skipped" in out
    assert "stage 1 step 4: non-finite" in out and "stage 1 step 3: non-finite" not in out
    skipped = dict(read_scalars(run_dir / "tb")["train/skipped_steps"])
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[STEPS_PER_STAGE] == 2
    losses = dict(read_scalars(run_dir / "tb")["train/loss"])
    assert math.isnan(losses[2]) and math.isnan(losses[4]), losses  # a skipped step logs no loss
    assert all(math.isfinite(v) and v < 100 for s, v in losses.items() if s not in (2, 4)), losses
    w = {s: zero_weights(_ckpt(run_dir), f"step-{s:06d}") for s in (1, 2, 3, 4)}
    assert max_diff(w[1], w[2]) == 0.0 and max_diff(w[3], w[4]) == 0.0  # skipped: bit-identical
    assert max_diff(w[2], w[3]) > 0.0  # a normal step does change them
    state = json.loads((_ckpt(run_dir) / "final" / "train_state.json").read_text())
    assert state["skipped_steps"] == 2


def test_too_many_skipped_steps_halt_with_checkpoint_then_resume(tmp_path):
    run_dir = tmp_path / "halt"
    extra = ["train.save_every=1", "train.keep_last_n=10", "train.max_skipped_steps=1"]
    codes, job = run(run_dir, extra, fault="nan:loss.s1:3-@1", args=["--stage", "1"])
    assert codes == [3, 3], job.output()
    assert (
        "2 steps skipped for a non-finite loss or gradient (train.max_skipped_steps=1); saved"
        in job.output(0)
    )
    assert "stage1/ckpt/step-000004" in job.output(0)
    assert (
        max_diff(zero_weights(_ckpt(run_dir), "step-000002"), zero_weights(_ckpt(run_dir), "step-000004"))
        == 0.0
    )

    # the halt checkpoint gets damaged (rank 1's optimizer shard): named on load, and with
    # resume_fallback=true the run resumes from the previous complete checkpoint instead
    shard = _ckpt(run_dir) / "step-000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    resume = [*extra[:2], "train.max_skipped_steps=5"]
    codes, job = run(run_dir, resume, args=["--stage", "1"], tag=".corrupt")
    assert codes == [2, 2], job.output()
    assert f"{shard}: contents changed (sha256 mismatch); set resume_fallback=true" in job.output(0)
    codes, job = run(run_dir, [*resume, "resume_fallback=true"], args=["--stage", "1"], tag=".resume")
    assert codes == [0, 0], job.output()
    assert "falling back to" in job.output(0) and "resuming stage 1 at step 3" in job.output(0)
    assert (run_dir / "stage1" / "COMPLETE").is_file()


@pytest.mark.parametrize(("fault", "bound"), [("exit", 15.0), ("hang", 25.0)])
def test_rank_failure_mid_step_is_a_clear_bounded_error_and_resumable(tmp_path, fault, bound):
    run_dir = tmp_path / fault
    job = launch(
        run_dir, ["engine.collective_timeout_s=8"], fault=f"{fault}:step.s1:3@1", args=["--stage", "1"]
    )
    try:
        while job.procs[0].poll() is None and f"{fault} at step" not in job.logs[1].read_text(
            errors="replace"
        ):
            assert job.procs[1].poll() is None or fault == "exit", job.output()
            time.sleep(0.05)
        t0 = time.monotonic()
        job.procs[0].wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        job.kill()  # the hung rank stays stuck until killed (what the launcher/scheduler does)
    out = job.output(0)
    assert job.procs[0].returncode == 4, out
    assert "lost contact with another rank" in out and "resumable from its latest checkpoint" in out
    assert "Traceback" not in out
    assert waited < bound, f"rank 0 needed {waited:.1f}s to give up"
    # resumable: the checkpoint before the failure is complete and intact (a relaunch from such a
    # checkpoint after an abrupt end is what test_kill_anywhere.py exercises ten times)
    assert latest_tag(_ckpt(run_dir)) == "step-000002"
    assert verify_checkpoint(_ckpt(run_dir) / "step-000002") == []
