"""LT-Tuning's fusion stage trains the same with ``engine.fused: on`` (compiled ``ltscale._C``) and
``off`` (the torch path): the real launch line (torchrun, ZeRO-3 engine), a tiny model, one fusion
stage of a few steps, losses compared step by step.

``on`` cannot silently fall back (the op raises when the extension cannot take the inputs), so a
finished ``on`` run did go through the compiled kernel. Without the extension the test skips
locally and fails under ``CI=true``.
"""

from __future__ import annotations

import pytest
import yaml

from ltscale.monitor import read_scalars
from tests.helpers import require_fused

pytestmark = [pytest.mark.e2e]

CONFIG = {
    "method": "lt_tuning",
    "model": {
        "tokenizer": "sentencepiece",
        "tokenizer_vocab_size": 120,
        "init": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True},
    },
    "data": {"train": "synthetic", "eval": "synthetic", "max_length": 256,
             "synthetic": {"n_train": 24, "n_test": 4, "seed": 3, "min_steps": 1, "max_steps": 3}},
    # only the fusion stage: the random model is unsure everywhere, so tau=0.2 inserts latents
    "stages": [{"mode": "fusion", "epochs": 1, "tau": 0.2, "max_sites": 8, "insert_prob": 0.95,
                "double_insert_prob": 0.2, "alpha": 0.6, "temperature": 1.0, "top_p": 0.9}],
    "optim": {"lr": 3.0e-3, "warmup_ratio": 0.0},
    "train": {"micro_batch_size": 8, "log_every": 1, "max_steps_per_stage": 3, "seed": 7},
    "eval": {"after_each_stage": False, "analysis": False},
    "engine": {"ds_config": "zero3"},
}  # fmt: skip


def test_fusion_stage_losses_equal_with_fused_on_and_off(tmp_path, run_ranks, repo_root):
    require_fused()
    cfg = tmp_path / "fusion_only.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    # quoted: an unquoted YAML `on`/`off` is a boolean, which engine.fused rejects
    losses, latents = {}, {}
    for fused in ("on", "off"):
        run_dir = tmp_path / f"fused_{fused}"
        run_ranks(repo_root / "ltscale" / "train.py", nproc=1, timeout=300,
                  args=["--config", str(cfg), f"run_dir={run_dir}", f"engine.fused='{fused}'"])  # fmt: skip
        scalars = read_scalars(run_dir / "tb")
        losses[fused] = [v for _, v in sorted(scalars["train/loss"])]
        latents[fused] = [v for _, v in sorted(scalars["latent/tokens_per_sample"])]
    assert len(losses["on"]) == 3, losses
    assert min(latents["on"]) > 0, "no <thinking> slots: the fusion op never ran"
    assert latents["on"] == latents["off"]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5, abs=1e-6)
