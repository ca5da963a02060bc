"""The per-step batch layout of a run: samples per micro-batch, accumulation, ranks.

Why the global batch is the invariant: an effective batch that silently differs from the paper's
is the usual reason a reproduction misses its numbers, and the layout that gives it depends on the
world size the scheduler happened to grant. With ``train.global_batch_size`` set, the run trains
with that many samples per optimizer step on any world size that divides it.

The rule (:func:`batch_layout`), with ``G = train.global_batch_size`` and ``W`` ranks:

1. ``G`` must split evenly over the ranks (``G % W == 0``), else a ``ConfigError`` naming both.
2. When the configured ``micro_batch_size x grad_accum x W == G``, that layout is kept (the
   official 8 x 2 x 4 = 64 on 4 GPUs runs exactly as written).
3. Otherwise each rank takes ``G / W`` samples per step: the micro-batch is the largest divisor of
   ``G / W`` that is at most ``train.micro_batch_size`` (a memory cap, never exceeded), and
   accumulation makes up the rest. 64 on 8 GPUs: 8 x 1; on 16: 4 x 1; on 64: 1 x 1.

Without ``global_batch_size`` the configured micro-batch and accumulation are used as they are
and the global batch grows with the world size. Pure arithmetic on the config: no torch import,
so ``ltscale plan`` uses the same rule.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ltscale.config import ConfigError, RunConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLayout:
    micro: int  # samples per rank per forward
    accum: int  # micro-batches per optimizer step
    world: int  # data-parallel ranks

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """The layout a run on ``world_size`` ranks uses (rules in the module docstring)."""
    if world_size < 1:
        raise ValueError(f"world_size: {world_size} must be >= 1")
    g = train.global_batch_size
    if g is None:
        return BatchLayout(train.micro_batch_size, train.grad_accum, world_size)
    if g % world_size:
        raise ConfigError(
            f"train.global_batch_size: {g} samples per step do not split evenly over {world_size} ranks "
            f"({g} % {world_size} = {g % world_size}); use a world size that divides {g}, or change "
            "train.global_batch_size"
        )
    if train.micro_batch_size * train.grad_accum * world_size == g:
        return BatchLayout(train.micro_batch_size, train.grad_accum, world_size)
    per_rank = g // world_size
    micro = max(d for d in range(1, min(train.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    return BatchLayout(micro, per_rank // micro, world_size)


def resolve_batch(cfg: RunConfig, world_size: int, *, quiet: bool = False) -> RunConfig:
    """``cfg`` with ``train.micro_batch_size`` / ``train.grad_accum`` set to what runs on ``world_size``
    ranks, so everything downstream (DeepSpeed config, sampler, steps per stage) and the run dir's
    ``config.resolved.yaml`` use and record the same numbers. Logged unless ``quiet``."""
    t = cfg.train
    layout = batch_layout(t, world_size)
    (log.debug if quiet else log.info)(
        "batch: %d samples per step = micro-batch %d x accumulation %d x %d ranks%s",
        layout.global_batch, layout.micro, layout.accum, layout.world,
        "" if t.global_batch_size is None else
        f" (from train.global_batch_size={t.global_batch_size}, micro-batch cap {t.micro_batch_size})",
    )  # fmt: skip
    if (layout.micro, layout.accum) == (t.micro_batch_size, t.grad_accum):
        return cfg
    return dataclasses.replace(
        cfg, train=dataclasses.replace(t, micro_batch_size=layout.micro, grad_accum=layout.accum)
    )


def stage_steps(cfg: RunConfig, n_examples: int, world_size: int) -> list[int]:
    """Optimizer steps of each stage: ``epochs x examples // global batch`` (at least 1), capped by
    ``train.max_steps_per_stage``; ``cfg`` is the resolved config (:func:`resolve_batch`)."""
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    if n_examples < global_batch:
        raise ValueError(
            f"train: {n_examples} examples < one global batch ({global_batch} = micro_batch_size "
            f"{cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum} x world {world_size})"
        )
    out = []
    for st in cfg.stages:
        n = max(1, int(st.epochs * n_examples) // global_batch)
        if cfg.train.max_steps_per_stage is not None:
            n = min(n, cfg.train.max_steps_per_stage)
        out.append(n)
    return out
