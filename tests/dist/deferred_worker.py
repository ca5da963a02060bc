"""Rank program for tests/dist/test_deferred_zero3.py: the fusion latent function's deferred
``V x d`` gradients (``ltscale/ops/deferred.py``) under 2-rank ZeRO-3 with a *tied* head.

The head logits and the fusion both read the tied embedding inside ``FusionHead.forward`` (an
external parameter there); the collector returns its one gradient after every pass's backward,
possibly when ZeRO-3 has already released the partition. Gradients (``safe_get_full_grad``) must
equal a single-process, non-DeepSpeed step with deferral off. Two temperatures: sharp (``E`` gets
kept rows) and flat (the dense pair). Rank 0 writes the comparison to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ltscale.engine import init_distributed, shutdown_distributed  # noqa: E402
from ltscale.model import LatentLM  # noqa: E402
from ltscale.ops import deferred as D  # noqa: E402
from tests.helpers import make_tiny_llama, max_rel_error, zero3_latent_step  # noqa: E402

VOCAB, THINK = 64, 63
TEMPERATURES = (0.03, 1.0)


def latent_lm(temperature: float) -> LatentLM:
    base = make_tiny_llama(
        VOCAB,
        kv_heads=2,
        tie=True,
        dtype=torch.float32,
        max_positions=256,
        isolated_rng=False,
        record_dtype=False,
    )
    return LatentLM(base, THINK, mode="fusion", temperature=temperature, top_p=0.9, fusion_impl="torch")


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    out = []
    for rank in range(2):
        ids = torch.randint(1, 60, (2, 12), generator=g)
        ids[0, 3:5] = THINK
        ids[1, 6] = THINK
        if rank == 1:
            ids[1, 9] = THINK
        labels = ids.clone()
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def reference_grads(temperature: float) -> dict[str, torch.Tensor]:
    lm = latent_lm(temperature).train()
    lm.defer_weight_grads = False
    losses = [lm(**b, return_logits=False).loss for b in batches()]
    (sum(losses) / 2).backward()  # DeepSpeed averages gradients over ranks
    return {n: p.grad.clone() for n, p in lm.named_parameters()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    info = init_distributed(timeout_s=120)
    built: list[int] = []  # id of the weight of every gradient an accumulator materialised
    real_init, real_build = D.WeightGradAccumulator.__init__, D.WeightGradAccumulator.build

    def tagged_init(self, weight):
        real_init(self, weight)
        self.test_tag = id(weight)

    def counted_build(self):
        out = real_build(self)
        if out is not None:
            built.append(self.test_tag)
        return out

    D.WeightGradAccumulator.__init__ = tagged_init
    D.WeightGradAccumulator.build = counted_build
    result: dict[str, object] = {}
    for temperature in TEMPERATURES:
        torch.manual_seed(0)
        lm = latent_lm(temperature)
        built.clear()
        engine, _, grads, _, _ = zero3_latent_step(lm, batches()[info.rank], info.world_size)
        vocab_builds = built.count(id(lm.base.get_input_embeddings().weight))
        if info.is_main:
            torch.manual_seed(0)
            ref = reference_grads(temperature)
            worst = max_rel_error(grads, ref)
            result[f"T={temperature}"] = {
                "max_rel_grad_err": worst,
                "vocab_builds": vocab_builds,
                "sharded_params": sum(1 for prm in lm.parameters() if prm.numel() == 0),
                "external": len(lm.zero3_external_parameters()),
                "embedding_grad_norm": float(grads["base.model.embed_tokens.weight"].norm()),
            }
        engine.destroy()
    if info.is_main:
        Path(args.out).write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
