"""Slow file-system work does not trip the collective timeout; a hung rank 0 still ends the job.

2 ranks on gloo, ``engine.collective_timeout_s=3``, and injected slow writes (``slow<s>`` faults,
ltscale/faults.py): rank 0 sleeps 6 s while committing a checkpoint, before writing the stage
export and before its analyses; rank 1 sleeps 6 s before hashing its checkpoint share. Each of
those waits used to be a barrier under the 3 s collective timeout (with NCCL, the watchdog's abort)
and now is an I/O wait bounded by ``engine.io_timeout_s`` (ltscale/engine/io_wait.py). On a GPU
the waiting ranks would sit in the same gloo barrier, with no NCCL collective in flight: what this
cannot show on CPU is NCCL's watchdog itself.
"""

from __future__ import annotations

import re
import time

import pytest

from ltscale.engine.checkpoint import verify_checkpoint

from .launch import launch, run

pytestmark = [pytest.mark.dist, pytest.mark.slow]

EVAL = ["eval.after_each_stage=true", "eval.max_new_tokens=8", "eval.batch_size=4", "eval.analysis_samples=1",
        "eval.probe_steps=1"]  # fmt: skip


def test_slow_rank0_export_analysis_and_checkpoint_io_outlast_the_collective_timeout(tmp_path):
    run_dir = tmp_path / "slow"
    fault = "slow6:ckpt_before_commit:1@0,slow6:ckpt_written:2@1,slow6:export:1@0,slow6:analysis:1@0"
    codes, job = run(run_dir, ["engine.collective_timeout_s=3", *EVAL], fault=fault, args=["--stage", "1"])
    assert codes == [0, 0], job.output()
    for point in ("ckpt_before_commit", "export", "analysis"):
        assert f"slow6 at {point}" in job.output(0), point
    assert "slow6 at ckpt_written" in job.output(1)
    assert (run_dir / "stage1" / "COMPLETE").is_file() and (run_dir / "stage1" / "eval.json").is_file()
    assert verify_checkpoint(run_dir / "stage1" / "ckpt" / "final") == []


def test_a_hung_rank0_export_ends_the_wait_with_an_error_naming_rank0_and_the_stage(tmp_path):
    run_dir = tmp_path / "hung"
    job = launch(run_dir, ["engine.collective_timeout_s=3", "engine.io_timeout_s=8"], fault="hang:export:1@0",
                 args=["--stage", "1"])  # fmt: skip
    try:
        while "hang at export" not in job.logs[0].read_text(errors="replace"):
            assert job.procs[0].poll() is None, job.output()
            time.sleep(0.05)
        t0 = time.monotonic()
        job.procs[1].wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        job.kill()  # the hung rank stays stuck until killed (what the launcher/scheduler does)
    out = job.output(1)
    assert job.procs[1].returncode == 4, out
    assert re.search(r"rank 1: waited \d+ s for rank 0, which did not finish stage 1 export", out), out
    assert "engine.io_timeout_s=8" in out and "Traceback" not in out
    assert 7 < waited < 30, f"rank 1 gave up after {waited:.1f}s"
