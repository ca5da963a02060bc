"""CoT trained for LT-Tuning's total steps: the control that separates "the curriculum" from "more
training" (docs/study.md).

LT-Tuning's stages 2 and 3 train the stage-1 CoT model for more steps; any gain over the stage-1
checkpoint could come from those steps alone. This method keeps every stage of an LT-Tuning config
-- its epochs (hence its steps), LR scale, and the config's optimizer strategy, i.e. the same LR
schedule -- and trains each on the plain CoT sequences (mode ``cot``, no ``<thinking>`` insertion).
``method: cot_same_steps`` on ``configs/tiny.yaml`` is that run; ``ltscale compare`` continues it
from the stage-1 checkpoint like LT-Tuning (its stage 1 dropped), so both runs take exactly the
same steps on the same sample order from the same weights.
"""

from __future__ import annotations

from ltscale.config import RunConfig, StageConfig
from ltscale.methods.lt_tuning import LTTuning, rewrite_stages


class CoTSameSteps(LTTuning):
    name = "cot_same_steps"
    tiny_config = "tiny.yaml"
    confidence_insertion = False  # no stage inserts <thinking>: the latent-stage rules do not apply

    def resolve(self, cfg: RunConfig) -> RunConfig:
        stages = [StageConfig(mode="cot", epochs=st.epochs, lr_scale=st.lr_scale) for st in cfg.stages]
        return rewrite_stages(
            cfg, stages, "every stage trains on the CoT sequences (same epochs and LR scales)"
        )
