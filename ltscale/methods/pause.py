"""Ablation "w/o latent (pause)" (docs/baselines.md §6): LT-Tuning's curriculum and
confidence-driven insertion, but every ``<thinking>`` slot keeps its learned token embedding (no
latent content, one forward pass). ``method: pause`` turns the latent stages (hidden, fusion) of an
LT-Tuning config into ``pause`` stages with the same insertion parameters.
"""

from __future__ import annotations

import dataclasses

from ltscale.config import ConfigError, RunConfig
from ltscale.methods.lt_tuning import LTTuning, rewrite_stages


class Pause(LTTuning):
    name = "pause"
    tiny_config = "tiny-pause.yaml"

    def resolve(self, cfg: RunConfig) -> RunConfig:
        stages = [
            dataclasses.replace(st, mode="pause") if st.mode in ("hidden", "fusion") else st
            for st in cfg.stages
        ]
        if not any(st.mode == "pause" for st in stages):
            raise ConfigError("stages: method 'pause' needs a latent stage (mode hidden, fusion or pause)")
        return rewrite_stages(cfg, stages, "latent stages use mode pause (learned <thinking> embedding)")
