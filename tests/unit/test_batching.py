"""``train.global_batch_size`` as the invariant: the layout derived for each world size."""

from __future__ import annotations

import logging

import pytest

from ltscale.batching import BatchLayout, batch_layout, resolve_batch
from ltscale.config import ConfigError, TrainConfig
from ltscale.run_config import load_config
from ltscale.run_setup import Sampler, stage_steps


@pytest.mark.parametrize(
    ("world", "want"),
    [
        (4, (8, 2)),  # the official layout, kept as configured
        (1, (8, 8)),
        (8, (8, 1)),
        (16, (4, 1)),  # micro-batch capped by what one rank gets
        (32, (2, 1)),
        (64, (1, 1)),
    ],
)
def test_paper_batch_on_any_world_size(world, want):
    layout = batch_layout(TrainConfig(micro_batch_size=8, grad_accum=2, global_batch_size=64), world)
    assert (layout.micro, layout.accum) == want and layout.global_batch == 64


def test_micro_batch_is_the_largest_divisor_under_the_cap():
    # 96 over 8 ranks = 12 per rank; divisors <= 8 of 12: 6 -> 6 x 2
    assert batch_layout(TrainConfig(micro_batch_size=8, global_batch_size=96), 8) == BatchLayout(6, 2, 8)
    # 7 per rank is prime: 7 > cap 4 -> 1 x 7
    assert batch_layout(TrainConfig(micro_batch_size=4, global_batch_size=56), 8) == BatchLayout(1, 7, 8)


def test_without_global_batch_the_configured_layout_scales_with_world():
    assert batch_layout(TrainConfig(micro_batch_size=8, grad_accum=2), 8) == BatchLayout(8, 2, 8)


@pytest.mark.parametrize(("global_batch", "world"), [(64, 3), (64, 128), (10, 4)])
def test_impossible_world_size_is_a_config_error_naming_the_numbers(global_batch, world):
    with pytest.raises(ConfigError, match=rf"train\.global_batch_size: {global_batch} .* {world} ranks"):
        batch_layout(TrainConfig(micro_batch_size=8, global_batch_size=global_batch), world)


def test_resolve_batch_feeds_steps_and_sampler_and_logs(caplog):
    cfg = load_config(None, ["train.micro_batch_size=8", "train.global_batch_size=64"])
    with caplog.at_level(logging.INFO, logger="ltscale.batching"):
        on8 = resolve_batch(cfg, 8)
    assert "64 samples per step = micro-batch 8 x accumulation 1 x 8 ranks" in caplog.text
    on4 = resolve_batch(cfg, 4)
    assert (on4.train.micro_batch_size, on4.train.grad_accum) == (8, 2)
    assert resolve_batch(on4, 4) is on4  # idempotent: the resolved config reloads to itself
    assert stage_steps(on8, 6400, 8) == stage_steps(on4, 6400, 4)
    # the same samples make up each optimizer step whatever the world size
    for step in (0, 3):
        seen = {}
        for world, c in ((8, on8), (4, on4)):
            t = c.train
            samplers = [Sampler(6400, seed=1, micro=t.micro_batch_size, accum=t.grad_accum, world=world, rank=r)
                        for r in range(world)]  # fmt: skip
            seen[world] = sorted(
                i for s in samplers for a in range(t.grad_accum) for i in s.indices(1, 10, step, a)
            )
        assert seen[8] == seen[4] and len(seen[4]) == 64
