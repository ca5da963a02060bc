"""Kill anywhere: SIGKILL a 2-rank ZeRO-3 run at seeded points, resume, and get the same weights.

One uninterrupted reference run; then one chain of runs on a second run dir, each killed (both
ranks, SIGKILL: a node loss, no handler runs) at the next kill point of a seeded schedule and
relaunched, until an unkilled run finishes all three stages. The schedule covers a training
step, each phase of a checkpoint write (shards written / manifest written / renamed before
``latest``), the confidence-scoring pass of stages 2 and 3 and the stage boundaries. After
every kill the newest complete checkpoint of every stage must verify against its checksums
and consolidate (DeepSpeed's zero_to_fp32); at the end the final weights and the whole loss
trajectory must equal the reference run's (CPU fp32: bitwise in practice, <= 1e-6 asserted).

``LTSCALE_KILL_SEED`` picks another schedule (same points, other hit counts) for exploration.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from ltscale.engine.checkpoint import verify_checkpoint
from ltscale.engine.checkpoint_dir import latest_tag
from ltscale.monitor import read_scalars

from .launch import final_weights, launch, max_diff, run, zero_weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# (point, lowest hit, highest hit): each is reachable from wherever the previous kill left the run
# (launch.TINY: 3 stages x 6 steps, a save every 2 steps, 3 scoring batches per rank per latent
# stage; a kill at a save point fires at the first save of that process, so progress is bounded).
SCHEDULE = [
    ("step.s1", 2, 5),  # inside a training step (after backward, before the optimizer step)
    ("ckpt_written", 1, 1),  # every rank's shard files written, no manifest yet
    ("ckpt_before_commit", 1, 1),  # manifest (completion marker) written, not yet renamed
    ("stage_end.s1", 1, 1),  # stage 1's final checkpoint saved, before its export
    ("score.s2", 1, 3),  # during stage 2's confidence-scoring pass
    ("ckpt_before_latest", 1, 1),  # renamed, `latest` still names the previous checkpoint
    ("stage_end.s2", 1, 1),
    ("score.s3", 1, 3),
    ("ckpt_written", 1, 2),
    ("step.s3", 1, 3),
]


def kill_schedule(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"kill:{point}:{rng.randint(lo, hi)}" for point, lo, hi in SCHEDULE]


def check_checkpoints_load(run_dir) -> list[str]:
    """The newest complete checkpoint of every stage verifies and consolidates; returns their tags."""
    seen = []
    for k in (1, 2, 3):
        root = run_dir / f"stage{k}" / "ckpt"
        tag = latest_tag(root) if root.is_dir() else None
        if tag is None:
            continue
        assert verify_checkpoint(root / tag) == [], f"{root / tag} does not verify"
        assert zero_weights(root, tag), f"{root / tag} does not load"
        seen.append(f"stage{k}/{tag}")
    return seen


def test_sigkill_at_seeded_points_then_resume_gives_identical_weights(tmp_path):
    seed = int(os.environ.get("LTSCALE_KILL_SEED", "9"))
    ref = tmp_path / "ref"
    codes, job = run(ref)
    assert codes == [0, 0], job.output()

    run_dir = tmp_path / "killed"
    schedule = kill_schedule(seed)
    assert len(schedule) >= 10
    history = []
    for i, fault in enumerate(schedule):
        job = launch(run_dir, fault=fault, tag=f".{i}")
        codes = job.wait(240, kill_all_on_sigkill=True)
        assert -signal.SIGKILL in codes, f"seed {seed}: kill point {fault} was never reached\n{job.output()}"
        history.append((fault, check_checkpoints_load(run_dir)))
    codes, job = run(run_dir, tag=".final")
    assert codes == [0, 0], f"seed {seed}: {history}\n{job.output()}"

    assert all((run_dir / f"stage{k}" / "COMPLETE").is_file() for k in (1, 2, 3))
    diff = max_diff(final_weights(run_dir), final_weights(ref))
    assert diff <= 1e-6, f"seed {seed}: final weights differ by {diff} after kills {history}"
    got, want = (dict(read_scalars(d / "tb")["train/loss"]) for d in (run_dir, ref))
    assert sorted(got) == sorted(want)
    for step, value in want.items():
        assert abs(got[step] - value) <= 1e-6 * abs(value), (
            f"seed {seed}: step {step}: {got[step]} vs {value}"
        )
