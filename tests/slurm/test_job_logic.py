"""slurm/common.sh's decisions as shell functions, without a cluster (fast; no ``slurm`` marker).

* ``ltscale_step_code``: how a step ended, from srun's code and each node launcher's own code.
  The cases are the ones met on the local cluster: srun reports 128 + the signal of a node it
  killed, deepspeed's launch.py exits 256 - 9 = 247 when its rank was SIGKILLed, the surviving
  ranks exit 4 (tests/slurm/test_slurm_stages.py runs the lost-rank case for real).
* ``ltscale_requeue_lost_rank``: after a 4 the job requeues, but not twice at the same checkpoint
  and not past LTSCALE_MAX_RESTARTS; ``scontrol`` is a stub that records its arguments.
* ``ltscale_check_stage_order``: the stage order as ``python -m ltscale.rundir`` (the trainer's
  rule) answers it: a complete stage is a no-op, a missing previous stage an exit 2 naming its
  marker.
* the stage scripts are thin: outside Slurm ``slurm/stage1.sh`` reaches common.sh's input checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "slurm" / "common.sh"


def sh(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` in bash after sourcing common.sh (which defines functions only), with this
    checkout and interpreter for its ``python -m ltscale.rundir`` questions."""
    env = {"LTSCALE_REPO": str(REPO), "PY": sys.executable, **(os.environ if env is None else env)}
    return subprocess.run(["bash", "-c", f'source "{COMMON}"\n{script}'], env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.mark.parametrize(
    ("srun_rc", "nodes", "want"),
    [
        (4, [4, 4], 4),  # every rank lost contact (a collective timed out everywhere)
        (143, [4], 4),  # srun's code is the SIGTERM of a node it ended; the node said 4
        (137, [247, 4], 4),  # a rank SIGKILLed (OOM killer), its peers lost contact
        (137, [4], 4),  # the node with the hung rank was killed after the grace: no code from it
        (137, [2, 4], 2),  # bad input on one rank, the others then lost contact: not transient
        (1, [1, 4], 1),  # a Python exception
        (137, [143, 137], 143),  # a stop; the slower node's wrapper was killed
        (143, [143, 143], 143),
        (0, [0, 0], 0),
        (137, [0], 137),  # every node that reported says 0: srun's code is all there is
        (137, [], 137),
        (0, [], 0),
    ],
)
def test_step_code(srun_rc: int, nodes: list[int], want: int) -> None:
    out = sh(f"ltscale_step_code {srun_rc} {' '.join(map(str, nodes))}")
    assert out.returncode == 0 and out.stdout.strip() == str(want), out


@pytest.fixture
def job(tmp_path: Path) -> dict[str, str]:
    """A run dir whose stage 1 has checkpoint step-000004, and a scontrol stub."""
    (tmp_path / "run" / "stage1" / "ckpt" / "step-000004").mkdir(parents=True)
    (tmp_path / "run" / "stage1" / "ckpt" / "latest").write_text("step-000004")
    (tmp_path / "run" / "logs" / "exit-codes").mkdir(parents=True)
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\nexit ${{SCONTROL_RC:-0}}\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path / "run"),
            "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0", "LTSCALE_MAX_RESTARTS": "3"}  # fmt: skip


def test_lost_rank_requeues_once_per_checkpoint(job: dict[str, str], tmp_path: Path) -> None:
    calls = tmp_path / "scontrol.calls"
    first = sh("ltscale_requeue_lost_rank 1", job)
    assert first.returncode == 0, first
    assert (
        "resumable from checkpoint step-000004" in first.stdout
        and "requeueing job 77 (restart 1" in first.stdout
    )
    assert calls.read_text() == "requeue 77\n"

    again = sh("ltscale_requeue_lost_rank 1", {**job, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 4, again
    assert "lost again before this job got past checkpoint step-000004: not requeueing" in again.stderr
    assert calls.read_text() == "requeue 77\n"  # no second requeue

    (tmp_path / "run" / "stage1" / "ckpt" / "step-000006").mkdir()  # progress since
    (tmp_path / "run" / "stage1" / "ckpt" / "latest").write_text("step-000006")
    assert sh("ltscale_requeue_lost_rank 1", {**job, "SLURM_RESTART_COUNT": "1"}).returncode == 0
    assert calls.read_text() == "requeue 77\nrequeue 77\n"


def test_lost_rank_respects_max_restarts_and_a_failing_scontrol(job: dict[str, str], tmp_path: Path) -> None:
    spent = sh("ltscale_requeue_lost_rank 1", {**job, "SLURM_RESTART_COUNT": "3"})
    assert spent.returncode == 4 and "already restarted 3 times (LTSCALE_MAX_RESTARTS=3)" in spent.stderr
    (tmp_path / "run" / "logs" / "exit-codes" / "77.lost-at").unlink()  # a fresh job
    refused = sh("ltscale_requeue_lost_rank 1", {**job, "SCONTROL_RC": "1"})
    assert refused.returncode == 4 and "scontrol requeue 77 failed" in refused.stderr
    stage = tmp_path / "run" / "stage1"
    touched = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    assert touched == ["ckpt", "ckpt/latest", "ckpt/step-000004"]  # nothing touched the run


def test_stage_order_is_the_trainers_rule(job: dict[str, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    ready = sh("ltscale_check_stage_order 1 && echo go", job)
    assert ready.returncode == 0 and ready.stdout.strip() == "go", ready
    early = sh("ltscale_check_stage_order 2", job)
    assert early.returncode == 2, early
    marker = run / "stage1" / "COMPLETE"
    want = f"{marker} does not exist; run --stage 1 first (sbatch slurm/stage1.sh"
    assert want in early.stderr, early.stderr
    marker.write_text("{}")
    done = sh("ltscale_check_stage_order 1; echo not reached", job)
    assert done.returncode == 0 and "not reached" not in done.stdout, done
    assert f"stage 1 is already complete ({marker}); nothing to do" in done.stdout
    assert sh("ltscale_check_stage_order 2 && echo go", job).stdout.strip() == "go"
    broken = sh("ltscale_check_stage_order 2", {**job, "PY": "/bin/false"})
    assert broken.returncode == 2 and "python -m ltscale.rundir check-stage" in broken.stderr, broken


def test_stage_script_is_a_thin_wrapper_of_common_sh(tmp_path: Path) -> None:
    """Outside a Slurm job the wrapper still finds common.sh and its input check answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LTSCALE_"))}
    out = subprocess.run(["bash", str(REPO / "slurm" / "stage1.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and "not inside a Slurm job: submit this script with sbatch" in out.stderr, out
    usage = subprocess.run(["bash", str(COMMON)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "bash slurm/common.sh stage N" in usage.stderr
