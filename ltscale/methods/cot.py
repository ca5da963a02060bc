"""Explicit CoT-SFT (docs/baselines.md §2): LT-Tuning's stage 1 alone, its own run and checkpoint.

Same format, label mask (prompt -100; steps, answer and EOS supervised), engine and evaluator as
LT-Tuning, so its accuracy is the "no latents" reference of every comparison. ``method: cot`` on an
LT-Tuning config keeps only its ``cot`` stages.
"""

from __future__ import annotations

from ltscale.config import ConfigError, RunConfig
from ltscale.methods.lt_tuning import LTTuning, rewrite_stages


class CoT(LTTuning):
    name = "cot"
    tiny_config = "tiny-cot.yaml"

    def resolve(self, cfg: RunConfig) -> RunConfig:
        stages = [st for st in cfg.stages if st.mode == "cot"]
        if not stages:
            raise ConfigError("stages: method 'cot' needs at least one stage with mode: cot")
        return rewrite_stages(cfg, stages, f"kept the {len(stages)} cot stage(s) of {len(cfg.stages)}")
