"""P4: ZeRO-3 all-gather bytes per optimizer step vs the number of sequential latent passes.

A step of LT-Tuning runs 1 + max-latents forward passes over the same layers. With
``stage3_max_reuse_distance`` large (ds_configs/zero3.json) and a fixed pass count per stage,
DeepSpeed keeps each parameter gathered from its first forward use to its last backward use, so
a step with n passes should all-gather about as much as a single-pass step. Goal: <= 1.2x.

Run (2 CPU ranks):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run \\
        --nproc_per_node 2 bench/allgather_passes.py [--reuse-distance 1e10]
Rank 0 prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltscale.engine import (  # noqa: E402
    build_engine,
    comm_stats,  # noqa: E402
    init_distributed,
    render_ds_config,
    shutdown_distributed,
)
from ltscale.model import LatentLM  # noqa: E402

VOCAB, THINK = 512, 511


def model() -> LatentLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    return LatentLM(LlamaForCausalLM(cfg), THINK, mode="fusion")


def batch(n_latents: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, THINK, (4, 64), generator=torch.Generator().manual_seed(1))
    if n_latents:
        ids[:, 20:20 + n_latents] = THINK  # consecutive slots: n_latents + 1 passes
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reuse-distance", type=float, default=None, help="override stage3_max_reuse_distance (and cap live parameters / prefetch to it)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    info = init_distributed()
    counter = comm_stats.install()
    over = {"zero_optimization.stage3_param_persistence_threshold": 0}
    if args.reuse_distance is not None:
        over["zero_optimization.stage3_max_reuse_distance"] = args.reuse_distance
        over["zero_optimization.stage3_max_live_parameters"] = args.reuse_distance
        over["zero_optimization.stage3_prefetch_bucket_size"] = min(args.reuse_distance, 5e7)
    rows = []
    for n in (0, 4, 8, 16):
        lm = model()
        n_params = sum(prm.numel() * prm.element_size() for prm in lm.parameters())
        ds = render_ds_config("zero3", micro_batch=4, grad_accum=1, world_size=info.world_size, grad_clip=1.0,
                              precision="fp32", overrides=over)
        engine = build_engine(lm, ds_config=ds, lr=1e-4, weight_decay=0.0,
                              external_parameters=lm.zero3_external_parameters())
        b = batch(n)
        per_step = []
        for step in range(2 + args.steps):  # 2 warm-up steps record DeepSpeed's trace
            before = counter.bytes
            out = engine(**b, min_passes=n + 1, return_logits=False)
            engine.backward(out.loss)
            engine.step()
            if step >= 2:
                per_step.append(counter.bytes - before)
        rows.append((n, out.n_passes, sum(per_step) / len(per_step), n_params))
        engine.destroy()
    if info.is_main:
        base = rows[0][2]
        print("| latent slots | passes | all-gather bytes / step | x model bytes | ratio to 1 pass |")
        print("|---:|---:|---:|---:|---:|")
        for n, passes, b, size in rows:
            print(f"| {n} | {passes} | {b:,.0f} | {b / size:.2f} | {b / base:.2f} |")
        out = os.environ.get("LTSCALE_BENCH_JSON")  # bench/run_all.py collects it
        if out:
            Path(out).write_text(json.dumps({
                "bench": "P4 all-gather bytes", "max_ratio": max(r[2] for r in rows) / base,
                "rows": [{"latents": n, "passes": ps, "bytes": b} for n, ps, b, _ in rows]}))
    shutdown_distributed()


if __name__ == "__main__":
    main()
