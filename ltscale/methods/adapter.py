"""Variant "+ adapter" (docs/method.md §7, docs/baselines.md §8): LT-Tuning with the official
``thinking_mlp`` -- ``LayerNorm(W2 GELU(W1 v))``, d -> ``model.adapter_hidden`` -> d -- applied to
every latent input (after fusion in stage 3), trained jointly. ``method: adapter`` switches
``model.adapter`` on; the module itself is ``ltscale.model.latent_lm.LatentAdapter``.
"""

from __future__ import annotations

import dataclasses

from ltscale.config import ConfigError, RunConfig
from ltscale.methods.lt_tuning import LTTuning, rewrite_stages


class Adapter(LTTuning):
    name = "adapter"
    tiny_config = "tiny-adapter.yaml"

    def resolve(self, cfg: RunConfig) -> RunConfig:
        if not any(st.mode in ("hidden", "fusion") for st in cfg.stages):
            raise ConfigError("stages: method 'adapter' needs a latent stage (mode hidden or fusion)")
        return rewrite_stages(
            cfg,
            list(cfg.stages),
            "model.adapter switched on",
            model=dataclasses.replace(cfg.model, adapter=True),
        )
