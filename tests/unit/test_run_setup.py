"""LR schedule across stages and the resumable sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ltscale.run_config import load_config
from ltscale.run_setup import Sampler, Schedule, stage_steps


def test_continue_is_one_schedule_and_reset_restarts_per_stage():
    cont = Schedule([10, 20, 30], warmup_ratio=0.1, kind="cosine", strategy="continue")
    reset = Schedule([10, 20, 30], warmup_ratio=0.1, kind="cosine", strategy="reset")
    assert cont.start == [0, 10, 30, 60]
    lr_cont = [cont.multiplier(s) for s in range(60)]
    assert max(lr_cont) == pytest.approx(1.0, abs=0.02) and lr_cont[-1] < 0.01
    assert all(a >= b - 1e-12 for a, b in zip(lr_cont[6:], lr_cont[7:]))  # monotone after warmup
    # reset: each stage warms up again from its own start
    assert reset.multiplier(10) == pytest.approx(reset.multiplier(0) * 0 + 1 / 3)
    assert reset.multiplier(30) < 0.5 and reset.multiplier(33) == pytest.approx(1.0)
    assert reset.multiplier(29) < 0.05


def test_linear_and_constant():
    lin = Schedule([100], warmup_ratio=0.0, kind="linear", strategy="continue")
    assert lin.multiplier(0) == 1.0 and lin.multiplier(50) == pytest.approx(0.5)
    const = Schedule([100], warmup_ratio=0.0, kind="constant", strategy="continue")
    assert const.multiplier(77) == 1.0
    cos = Schedule([100], warmup_ratio=0.0, kind="cosine", strategy="continue")
    assert cos.multiplier(50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_stage_steps_and_too_small_dataset():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2"])
    steps = stage_steps(cfg, 100, world_size=2)
    assert steps == [max(1, int(st.epochs * 100) // 16) for st in cfg.stages]
    with pytest.raises(ValueError, match="global batch"):
        stage_steps(cfg, 10, world_size=2)


def test_sampler_partitions_each_global_batch_and_is_world_size_invariant():
    n, steps = 50, 7
    one = Sampler(n, seed=3, micro=4, accum=2, world=1, rank=0)
    two = [Sampler(n, seed=3, micro=2, accum=2, world=2, rank=r) for r in range(2)]
    for step in range(steps):
        a = sorted(i for m in range(2) for i in one.indices(2, steps, step, m))
        b = sorted(i for s in two for m in range(2) for i in s.indices(2, steps, step, m))
        assert a == b and len(a) == 8
    # deterministic and stage-dependent
    again = Sampler(n, seed=3, micro=4, accum=2, world=1, rank=0)
    assert np.array_equal(one.order(2, steps), again.order(2, steps))
    assert not np.array_equal(one.order(2, steps)[:n], one.order(3, steps)[:n])
    # every example once per epoch
    assert sorted(one.order(1, steps)[:n].tolist()) == list(range(n))


def test_lr_scale_per_stage():
    sched = Schedule([10, 10], warmup_ratio=0.0, kind="constant", strategy="reset", lr_scales=[1.0, 0.25])
    assert sched.multiplier(3) == 1.0 and sched.multiplier(12) == 0.25 and sched.stage_of(19) == 1


def test_used_indices_cover_exactly_what_the_stage_draws():
    s = Sampler(100, seed=1, micro=4, accum=1, world=2, rank=0)
    used = s.used_indices(stage=2, n_steps=3)
    drawn = {i for r in range(2) for step in range(3)
             for i in Sampler(100, seed=1, micro=4, accum=1, world=2, rank=r).indices(2, 3, step, 0)}
    assert used.tolist() == sorted(drawn) and len(used) == 24
    assert Sampler(10, seed=1, micro=4, accum=1, world=2, rank=0).used_indices(1, 5).tolist() == list(range(10))
