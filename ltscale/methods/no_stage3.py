"""Ablation "w/o stage 3" (docs/baselines.md §7): stages 1-2 only, i.e. dynamically inserted
``<thinking>`` slots fed the raw last-layer hidden state, no Context-Prediction Fusion.
``method: no_stage3`` drops the fusion stages of an LT-Tuning config.
"""

from __future__ import annotations

from ltscale.config import ConfigError, RunConfig
from ltscale.methods.lt_tuning import LTTuning, rewrite_stages


class NoStage3(LTTuning):
    name = "no_stage3"
    tiny_config = "tiny-no-stage3.yaml"

    def resolve(self, cfg: RunConfig) -> RunConfig:
        stages = [st for st in cfg.stages if st.mode != "fusion"]
        if not any(st.mode == "hidden" for st in stages):
            raise ConfigError("stages: method 'no_stage3' needs a stage with mode: hidden (stage 2)")
        return rewrite_stages(cfg, stages, f"dropped {len(cfg.stages) - len(stages)} fusion stage(s)")
