"""Rank program for tests/dist/test_latent_zero3.py: the latent rollout under ZeRO-3 on 2 ranks.

Rank 0's batch has no latent slot, rank 1's has five (two of them consecutive), so the ranks need
1 and 6 passes: the model runs ``max`` over ranks (empty passes on rank 0), which must neither
hang nor change the result. Gradients (gathered with ``safe_get_full_grad``) must equal a
single-process, non-DeepSpeed computation of the mean of the two ranks' losses, with gradient
checkpointing off and on. Rank 0 writes the comparison to ``--out`` as JSON.
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
from tests.helpers import make_tiny_llama, max_rel_error, zero3_latent_step  # noqa: E402

VOCAB, THINK = 64, 63


def base_model() -> torch.nn.Module:
    return make_tiny_llama(
        VOCAB, kv_heads=2, dtype=torch.float32, max_positions=2048, isolated_rng=False, record_dtype=False
    )


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for rank in range(2):
        ids = torch.randint(1, 60, (2, 14), generator=g)
        if rank == 1:
            ids[0, 4] = THINK
            ids[0, 5] = THINK
            ids[0, 9] = THINK
            ids[1, 6] = THINK
            ids[1, 11] = THINK
        labels = ids.clone()
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def reference_grads(gc: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    lm = LatentLM(base_model(), THINK, mode="fusion", gradient_checkpointing=gc).train()
    losses = [lm(**b, return_logits=False).loss for b in batches()]
    (sum(losses) / 2).backward()  # DeepSpeed averages gradients over ranks
    return [float(x) for x in losses], {n: p.grad.clone() for n, p in lm.named_parameters()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    info = init_distributed(timeout_s=120)
    result: dict[str, object] = {}
    for gc in (False, True):
        lm = LatentLM(base_model(), THINK, mode="fusion", gradient_checkpointing=gc)
        engine, out, grads, local, passes = zero3_latent_step(lm, batches()[info.rank], info.world_size)
        sharded = sum(1 for prm in lm.parameters() if prm.numel() == 0)  # ZeRO-3 leaves an empty placeholder
        if info.is_main:
            ref_losses, ref = reference_grads(gc)
            worst = max_rel_error(grads, ref)
            result[f"gc={gc}"] = {
                "local_passes": local,
                "passes": passes,
                "out_passes": out.n_passes,
                "loss": float(out.loss),
                "ref_loss_rank0": ref_losses[0],
                "max_rel_grad_err": worst,
                "sharded_params": sharded,
                "embedding_grad_norm": float(grads["base.model.embed_tokens.weight"].norm()),
            }
        engine.destroy()
    if info.is_main:
        Path(args.out).write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
