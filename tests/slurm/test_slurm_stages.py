"""The Slurm stage scripts on a real (one-host, two-node) Slurm cluster.

Every training job runs the tiny curriculum (tests/e2e SMALL overrides, stages 1 and 2 stretched
to 48 and 32 steps so a signal reliably lands mid-stage) on 2 simulated nodes x 1 rank, DeepSpeed
--no_ssh, gloo on CPU:

* pipeline.sh chains stage1 -> stage2 -> stage3 with afterok; all complete with checkpoints,
  markers and eval JSON. Its stages 1 and 2 are the uninterrupted references for the next two.
* stop signal: ``scancel --signal=USR1 --batch`` mid-stage delivers SIGUSR1 to the batch shell
  exactly as ``--signal=B:USR1@lead`` does when the time limit nears; the job checkpoints,
  requeues itself, resumes, completes, and its train/loss curve equals the reference to 1e-6
  relative with no duplicated steps.
* real time limit: the same with ``--time=3 --signal=B:USR1@60`` and no signal from the test
  (Slurm's timer ticks every ~30 s, so the first start is slowed to keep the point mid-stage);
  and a lead that leaves no time to progress fails after one restart instead of looping.
* preemption: ``scontrol requeue`` of a running stage 2 (SIGTERM to everything) -> same result,
  and the restart reuses the stage's confidence scoring.
* stage 3 submitted while stage 2 has not finished -> FAILED within seconds, exit 2, the path of
  the missing marker in its log; a finished stage resubmitted -> no-op.
* bad input: no LTSCALE_CONFIG / LTSCALE_RUN_DIR, no ranks per node on a CPU partition, GPUs
  requested from a partition without GPUs, a checkpoint from another node count, a crashing
  trainer -> a clear error and a failed job, never a hang or a requeue loop.
* a lost rank: one rank SIGKILLed mid-stage (the others exit 4) -> the job requeues and resumes.

What the local cluster cannot show: core binding and memory limits (task/none, no cgroups, so
the step's --cpus-per-task and --mem=0 change nothing here; the tests only see that srun gets them)
and a site's MpiDefault=pmi2 (tests/unit/test_launch_env.py has ranks' environments recorded with
srun --mpi=pmi2 on this cluster).

The jobs of the first tests overlap (the pipeline runs while the signal tests do) to keep the
tier within its CI budget.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from ltscale.monitor import read_scalars
from tests.e2e.test_tiny_curriculum import SMALL

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Later overrides win. 128 examples / 16 per step: stage 1 x 6 epochs = 48 steps, stage 2 x 4 = 32
# (so a signal sent after the step-2 checkpoint lands mid-stage), stage 3 x 1 = 8.
STEPS = {1: 48, 2: 32, 3: 8}
ARGS = [*SMALL, "stages.0.epochs=6", "stages.1.epochs=4"]
# The lead must be well under the time limit: the scripts' default --signal=B:USR1@600 with a
# 10-minute limit would signal every (re)start at once and requeue it again and again.
NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--signal=B:USR1@30"]


def job_env(slurm, run_dir: Path | None, *, eval_: bool = True, **extra: str) -> dict[str, str]:
    args = ARGS + ([] if eval_ else ["eval.after_each_stage=false"])
    env = slurm.env(LTSCALE_CONFIG="configs/tiny.yaml", LTSCALE_ARGS=" ".join(args), **extra)
    if run_dir is not None:
        env["LTSCALE_RUN_DIR"] = str(run_dir)
    return env


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return read_scalars(run_dir / "tb")["train/loss"]


def assert_same_losses(got: list[tuple[int, float]], want: dict[int, float], rel: float = 1e-6) -> None:
    steps = [s for s, _ in got]
    assert steps == sorted(set(steps)), f"duplicated or unordered TensorBoard steps: {steps}"
    assert steps == sorted(want), f"steps differ: {sorted(set(steps) ^ set(want))}"
    for step, value in got:
        assert abs(value - want[step]) <= rel * abs(want[step]), f"step {step}: {value} vs {want[step]}"


def wait_for(path: Path, job: str, slurm, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def pipeline(slurm, work):
    """pipeline.sh on run dir P, and right behind it a stray stage 3 for P with no dependency."""
    run_dir = work / "pipeline"
    env = job_env(slurm, run_dir)
    out = slurm.run([Path(__file__).parents[2] / "slurm" / "pipeline.sh", *NODES], env=env, cwd=work)
    ids = dict(line.split() for line in out.stdout.splitlines())
    assert list(ids) == ["stage1", "stage2", "stage3"], out.stdout
    stray = slurm.sbatch("stage3.sh", env=env, cwd=work, sbatch_args=NODES)
    return {"run_dir": run_dir, "ids": ids, "stray": stray}


def reference(slurm, pipeline, stage: int) -> dict[int, float]:
    """train/loss of ``stage`` in the uninterrupted pipeline run (same config, same 2 x 1 ranks),
    keyed by global step. Called by the signal tests only after their own job ended, so their
    jobs run while the pipeline does."""
    info = slurm.wait(pipeline["ids"][f"stage{stage}"], timeout=420)
    assert info["JobState"] == "COMPLETED", info
    first = sum(STEPS[k] for k in range(1, stage))
    ref = {s: v for s, v in losses(pipeline["run_dir"]) if first < s <= first + STEPS[stage]}
    assert sorted(ref) == list(range(first + 1, first + STEPS[stage] + 1))
    return ref


def interrupted_stage(
    slurm, work: Path, name: str, stage: int, interrupt
) -> tuple[Path, dict[str, str], str]:
    """Submit ``stage``, call ``interrupt(job)`` once its step-2 checkpoint exists, wait for the end."""
    run_dir = work / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    job = slurm.sbatch(f"stage{stage}.sh", env=job_env(slurm, run_dir, eval_=False), cwd=work,
                       sbatch_args=[*NODES, f"--output={run_dir}/logs/%x-%j.out"])  # fmt: skip
    wait_for(run_dir / f"stage{stage}" / "ckpt" / "step-000002", job, slurm)
    interrupt(job)
    info = slurm.wait(job)
    log = Path(info["StdOut"]).read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    return run_dir, info, log


# ------------------------------------------------------------------------------------ tests


def test_stage3_before_stage2_fails_fast_with_the_marker_path(slurm, pipeline, work):
    info = slurm.wait(pipeline["stray"], timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    h, m, s = (int(x) for x in info["RunTime"].split(":")[-3:])
    assert h * 3600 + m * 60 + s <= 20, f"took {info['RunTime']} to fail"
    missing = pipeline["run_dir"] / "stage2" / "COMPLETE"
    # Slurm's own output file (no --output: slurm-<id>.out in the submit dir) and the copy in the run dir.
    for log in (work / f"slurm-{pipeline['stray']}.out",
                pipeline["run_dir"] / "logs" / f"ltscale-stage3-{pipeline['stray']}.out"):  # fmt: skip
        text = log.read_text()
        assert f"{missing} does not exist" in text and "run --stage 2 first" in text, text
    assert not (pipeline["run_dir"] / "stage2" / "COMPLETE").exists()  # it really ran before stage 2 ended


def test_real_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm, work, pipeline):
    """Nobody sends a signal: ``--time=3 --signal=B:USR1@60`` makes Slurm's own timer send SIGUSR1
    60-120 s into the job (its timer ticks every ~30 s and may fire up to 60 s early; shorter
    limits leave ranks on a loaded 2-core box, which can take 40 s to start, no time to train,
    and the guard then rightly refuses to requeue). The first start is slowed to 3 s per optimizer
    step (a test-only sitecustomize; the numbers are unchanged), so 48 steps cannot finish before
    the signal. Early in the file: its job overlaps the pipeline's."""
    run_dir = work / "time-limit"
    (run_dir / "logs").mkdir(parents=True)
    hook = Path(__file__).parent / "first_start"
    env = job_env(slurm, run_dir, eval_=False, LTSCALE_TEST_STEP_SLEEP="3", LTSCALE_RESIGNAL_S="2",
                  PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))  # fmt: skip
    args = [a for a in NODES if not a.startswith(("--time", "--signal"))]
    job = slurm.sbatch("stage1.sh", env=env, cwd=work,
                       sbatch_args=[*args, "--time=3", "--signal=B:USR1@60", f"--output={run_dir}/logs/%x-%j.out"])  # fmt: skip
    info = slurm.wait(job, timeout=300)
    log = (run_dir / "logs" / f"ltscale-stage1-{job}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    assert "time limit 3:00" in log and "received SIGUSR1" in log, log[-6000:]
    stopped = re.search(r"stopped by signal at stage 1 step (\d+)", log)
    assert stopped and 0 < int(stopped[1]) < STEPS[1], log[-6000:]
    assert f"resuming stage 1 at step {stopped[1]}" in log
    assert int(info["Restarts"]) == 1
    assert_same_losses(losses(run_dir), reference(slurm, pipeline, 1))


def test_usr1_lead_signal_checkpoints_requeues_and_resumes_exactly(slurm, work, pipeline):
    def interrupt(job):
        slurm.run(["scancel", "--signal=USR1", "--batch", job])

    run_dir, info, log = interrupted_stage(slurm, work, "usr1", 1, interrupt)
    stopped = re.search(r"stopped by signal at stage 1 step (\d+)", log)
    assert "received SIGUSR1" in log and stopped, log[-6000:]
    step = int(stopped[1])
    assert step < STEPS[1], "the signal arrived after the last step: nothing was interrupted"
    assert f"requeueing job {info['JobId']}" in log
    assert f"resuming stage 1 at step {step}" in log
    assert int(info["Restarts"]) >= 1
    assert (run_dir / "stage1" / "COMPLETE").is_file() and (run_dir / "stage1" / "ckpt" / "final").is_dir()
    assert_same_losses(losses(run_dir), reference(slurm, pipeline, 1))


def test_scontrol_requeue_preemption_of_stage2_resumes_exactly(slurm, work, pipeline):
    """Stage 2 on a copy of the pipeline's finished stage 1: requeued mid-stage from outside, it
    checkpoints on SIGTERM, Slurm restarts it, it reuses its confidence scoring and resumes."""
    info = slurm.wait(pipeline["ids"]["stage1"], timeout=420)
    assert info["JobState"] == "COMPLETED", info
    run_dir = work / "requeue"
    for part in ("stage1", "tokenizer"):
        shutil.copytree(pipeline["run_dir"] / part, run_dir / part)

    def interrupt(job):
        slurm.run(["scontrol", "requeue", job])

    run_dir, info, log = interrupted_stage(slurm, work, "requeue", 2, interrupt)
    stopped = re.search(r"stopped by signal at stage 2 step (\d+)", log)
    assert "received SIGTERM" in log and stopped, log[-6000:]
    assert "Slurm is requeueing job" in log
    assert f"resuming stage 2 at step {stopped[1]}" in log
    assert "stage 2: reusing insertion sites" in log, "the requeued job scored the examples again"
    assert int(info["Restarts"]) == 1
    assert (run_dir / "stage2" / "COMPLETE").is_file()
    assert_same_losses(losses(run_dir), reference(slurm, pipeline, 2))


def test_a_stop_signal_before_any_progress_is_not_requeued_forever(slurm, work):
    """A lead at or above the time limit signals every start at once: the first start saves
    step 0 and requeues, the second gains nothing, so it fails instead of requeueing again."""
    run_dir = work / "no-progress"
    (run_dir / "logs").mkdir(parents=True)
    # No re-send within the test: each start is signalled while its ranks import (the signal is
    # ignored until the trainer's handler exists), so only the stop-requested file can stop it at
    # step 0. A re-send that landed later would let a fast machine train past step 0 first.
    env = job_env(slurm, run_dir, eval_=False, LTSCALE_RESIGNAL_S="600")
    job = slurm.sbatch(
        "stage1.sh", env=env, cwd=work, sbatch_args=[*NODES, f"--output={run_dir}/logs/%x-%j.out"]
    )
    log = run_dir / "logs" / f"ltscale-stage1-{job}.out"
    for start in (1, 2):
        deadline = time.monotonic() + 180
        # "node 0 command" is logged right before srun starts the ranks: they are still importing.
        while not log.is_file() or log.read_text(errors="replace").count("node 0 command") < start:
            assert time.monotonic() < deadline, f"start {start} of job {job} did not launch"
            time.sleep(0.1)
        slurm.run(["scancel", "--signal=USR1", "--batch", job])
    info = slurm.wait(job, timeout=180)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "143:0" and info["Restarts"] == "1", (
        f"{info}\n{text[-6000:]}"
    )
    rank0_stops = text.count("0: ltscale: stopped by signal at stage 1 step 0;")
    assert rank0_stops == 2, text[-6000:]
    assert "before this job got past its last checkpoint (step-000000): not requeueing" in text, text[-6000:]
    assert "time limit 10:00, left" in text, text[-6000:]


def test_pipeline_runs_all_three_stages(slurm, pipeline):
    run_dir, ids = pipeline["run_dir"], pipeline["ids"]
    for k in (1, 2, 3):
        info = slurm.wait(ids[f"stage{k}"], timeout=420)
        log = run_dir / "logs" / f"ltscale-stage{k}-{ids[f'stage{k}']}.out"
        assert info["JobState"] == "COMPLETED", f"{info}\n{log.read_text()[-6000:] if log.is_file() else ''}"
        sdir = run_dir / f"stage{k}"
        assert (sdir / "COMPLETE").is_file() and (sdir / "ckpt" / "final" / "train_state.json").is_file()
        assert f"stage {k} complete" in log.read_text()
        assert "--mpi=none --mem=0 --cpus-per-task=1" in log.read_text()  # the srun defaults reach srun
        if k > 1:
            assert (sdir / "insertions" / "meta.json").is_file(), "confidence scoring did not run in the job"
    summary = json.loads((run_dir / "stage3" / "eval.json").read_text())
    assert summary["n"] == 16 and 0.0 <= summary["accuracy_official"] <= 1.0
    steps = [s for s, _ in losses(run_dir)]
    assert steps == sorted(set(steps)) and len(steps) == sum(STEPS.values())


def test_resubmitting_a_finished_stage_is_a_noop(slurm, pipeline, work):
    marker = pipeline["run_dir"] / "stage3" / "COMPLETE"
    before = marker.stat().st_mtime_ns
    job = slurm.sbatch("stage3.sh", env=job_env(slurm, pipeline["run_dir"]), cwd=work, sbatch_args=NODES)
    info = slurm.wait(job, timeout=120)
    assert info["JobState"] == "COMPLETED", info
    assert "stage 3 is already complete" in Path(info["StdOut"]).read_text()
    assert marker.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("unset", "message"),
    [("LTSCALE_CONFIG", "LTSCALE_CONFIG is not set"), ("LTSCALE_RUN_DIR", "LTSCALE_RUN_DIR is not set")],
)
def test_missing_input_fails_the_job_with_a_clear_error(slurm, work, unset, message):
    env = job_env(slurm, work / f"bad-{unset}")
    env.pop(unset)
    job = slurm.sbatch("stage1.sh", env=env, cwd=work, sbatch_args=[*NODES, f"--output={work}/%x-%j.out"])
    info = slurm.wait(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert message in Path(info["StdOut"]).read_text()


def test_cpu_partition_without_ranks_per_node_is_a_clear_error(slurm, work):
    env = job_env(slurm, work / "no-nproc")
    env.pop("LTSCALE_NPROC_PER_NODE")
    job = slurm.sbatch("stage1.sh", env=env, cwd=work, sbatch_args=NODES)
    info = slurm.wait(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    text = Path(info["StdOut"]).read_text()
    assert "no GPUs found" in text and "LTSCALE_NPROC_PER_NODE" in text, text


def test_gpus_on_a_partition_without_gpus_are_refused_at_submit(slurm, work):
    out = slurm.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=1", "--cpus-per-task=1",
                     Path(__file__).parents[2] / "slurm" / "stage1.sh"], env=job_env(slurm, work / "gpu"),
                    cwd=work, check=False)  # fmt: skip
    assert out.returncode != 0 and "generic resource" in out.stderr, out


def test_a_crashing_job_fails_without_requeue(slurm, work):
    env = job_env(slurm, work / "crash")
    env["LTSCALE_ARGS"] += " train.micro_batchsize=3"  # a typo: every rank exits 2
    job = slurm.sbatch("stage1.sh", env=env, cwd=work, sbatch_args=NODES)
    info = slurm.wait(job, timeout=180)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
    text = Path(info["StdOut"]).read_text()
    assert "train.micro_batchsize: unknown key" in text and "not requeueing" in text, text[-4000:]


def test_a_lost_rank_requeues_and_resumes(slurm, work):
    """Rank 1 (node 2) is SIGKILLed in step 5 of the first start, as the OOM killer would: its launcher
    exits 247, rank 0 loses contact and exits 4, the job requeues itself and resumes from step 4."""
    run_dir = work / "lost-rank"
    (run_dir / "logs").mkdir(parents=True)
    hook = Path(__file__).parent / "first_start"
    env = job_env(slurm, run_dir, eval_=False, LTSCALE_TEST_FIRST_FAULT="kill:step:5@1",
                  PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))  # fmt: skip
    env["LTSCALE_ARGS"] = env["LTSCALE_ARGS"].replace("stages.0.epochs=6", "stages.0.epochs=1")  # 8 steps
    job = slurm.sbatch(
        "stage1.sh", env=env, cwd=work, sbatch_args=[*NODES, f"--output={run_dir}/logs/%x-%j.out"]
    )
    info = slurm.wait(job, timeout=300)
    log = (run_dir / "logs" / f"ltscale-stage1-{job}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-6000:]}"
    assert (
        "fault injection: kill at step hit 5 (rank 1)" in log and "lost contact with another rank" in log
    ), log[-6000:]
    assert "a rank was lost (exit 4" in log and "resumable from checkpoint step-000004" in log, log[-6000:]
    assert f"requeueing job {job}" in log and "resuming stage 1 at step 4" in log, log[-6000:]
    assert (run_dir / "stage1" / "COMPLETE").is_file()
    assert [s for s, _ in losses(run_dir)] == list(range(1, 9))


def test_wrong_node_count_versus_checkpoint_is_a_clear_error(slurm, pipeline, work):
    """A stage checkpoint written by 2 ranks, resumed on 1 node x 1 rank: the optimizer state
    cannot be resharded, so the job fails naming both world sizes (and is not requeued)."""
    slurm.wait(pipeline["ids"]["stage1"])
    run_dir = work / "one-node"
    shutil.copytree(pipeline["run_dir"] / "stage1" / "ckpt", run_dir / "stage1" / "ckpt")  # no COMPLETE
    job = slurm.sbatch("stage1.sh", env=job_env(slurm, run_dir, eval_=False), cwd=work,
                       sbatch_args=["--nodes=1", *NODES[1:]])  # fmt: skip
    info = slurm.wait(job, timeout=180)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    text = Path(info["StdOut"]).read_text()
    assert "was written with world size 2, now 1" in text, text[-4000:]
