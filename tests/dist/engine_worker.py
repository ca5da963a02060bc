"""Rank program for tests/dist/test_engine_dist.py (launched by torchrun or plain python).

One launch does several checks, because on a 2-core CI box a launch costs ~10-15 s of imports.
Rank 0 writes a JSON result file; tensors for cross-run comparison go to ``.pt`` files.

Modes
  train   tiny Llama under ZeRO-3: N optimizer steps on a global batch drawn from the global torch
          RNG (so resuming needs the restored RNG), checkpoints after --save-at; plus, with
          --toy, the external-parameter gradient check; plus, with --expect-mismatch DIR, loading
          a checkpoint written at another world size must raise.
  resume  build a fresh engine, load the latest checkpoint, run the remaining steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ltscale.engine import (  # noqa: E402
    all_reduce_mean_tensor,
    all_reduce_sum,
    barrier,
    build_engine,
    full_grad,
    gather_state_dict,
    grad_norm,
    init_distributed,
    load_checkpoint,
    render_ds_config,
    save_checkpoint,
    shutdown_distributed,
)
from tests.helpers import make_tiny_llama  # noqa: E402

VOCAB, SEQ, GLOBAL_BATCH = 64, 16, 4
ZERO3_TEST = {"zero_optimization.stage3_param_persistence_threshold": 0}


def tiny_llama() -> nn.Module:
    return make_tiny_llama(
        VOCAB, attn="eager", dtype=torch.float32, max_positions=64, isolated_rng=False, record_dtype=False
    )


def schedule(step: int) -> float:
    """Warmup then decay: the LR differs at every step, so a resume with a wrong LR shows."""
    return min(1.0, (step + 1) / 2) / (1.0 + 0.5 * step)


def make_engine(micro: int, accum: int, world: int, model: nn.Module | None = None, **kw):
    cfg = render_ds_config(
        "zero3",
        micro_batch=micro,
        grad_accum=accum,
        world_size=world,
        grad_clip=1.0,
        precision="fp32",
        overrides=ZERO3_TEST,
    )
    return build_engine(
        model if model is not None else tiny_llama(),
        ds_config=cfg,
        lr=1e-2,
        weight_decay=0.1,
        scheduler=schedule,
        **kw,
    )


def run_steps(
    engine, first: int, last: int, rank: int, world: int, ckpt: Path | None, save_at: set[int]
) -> dict:
    """Optimizer steps first..last (1-based). Returns {step: (mean loss, grad norm, lr)}."""
    micro = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    out = {}
    for step in range(first, last + 1):
        batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ))  # same on every rank: global RNG
        lr = engine.optimizer.param_groups[0]["lr"]
        total = 0.0
        for j in range(accum):
            lo = (j * world + rank) * micro
            ids = batch[lo : lo + micro]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += float(all_reduce_mean_tensor(loss.detach()))
        out[step] = (total / accum, grad_norm(engine), lr)
        if ckpt is not None and step in save_at:
            save_checkpoint(engine, ckpt, f"step{step}", {"step": step}, keep_last_n=2)
    return out


# ----------------------------------------------------------------------------- toy external param


class Fusion(nn.Module):
    """Reads the embedding matrix it does not own, through a plain reference (not a submodule),
    like LT-Tuning's context-prediction fusion: only register_external_parameter can gather it."""

    def __init__(self, embed_weight: nn.Parameter, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self._ext = [embed_weight]

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        emb = self._ext[0]
        if emb.dim() != 2 or emb.shape[0] == 0:
            raise RuntimeError(f"embedding weight not gathered (shape {tuple(emb.shape)})")
        return 0.5 * self.proj(h) + 0.5 * (logits.softmax(-1) @ emb)


class Toy(nn.Module):
    def __init__(self, vocab: int = 16, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.fusion = Fusion(self.embed.weight, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(self.embed(ids)))
        e = self.fusion(h, self.head(h))
        return F.cross_entropy(self.out(e).flatten(0, 1), ids.roll(-1, 1).flatten())


def toy_check(rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 16, (2 * world, 6), generator=gen)
    torch.manual_seed(3)
    ref = Toy()
    # Reference: gradient of the mean of the per-rank losses, no DeepSpeed.
    sum(ref(ids[2 * r : 2 * r + 2]) for r in range(world)).div(world).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    torch.manual_seed(3)
    model = Toy()
    cfg = render_ds_config(
        "zero3",
        micro_batch=2,
        grad_accum=1,
        world_size=world,
        grad_clip=0.0,
        precision="fp32",
        overrides=ZERO3_TEST,
    )
    engine = build_engine(
        model,
        ds_config=cfg,
        lr=1e-3,
        weight_decay=0.0,
        external_parameters=[(model.fusion, model.embed.weight)],
    )
    sharded = sum(int(p.numel() == 0) for p in model.parameters())
    loss = engine(ids[2 * rank : 2 * rank + 2])
    engine.backward(loss)
    errs = {}
    for n, p in engine.module.named_parameters():
        g = full_grad(p)
        errs[n] = float((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12))
    engine.step()

    # Negative control: the same model without the registration cannot see the weight.
    torch.manual_seed(3)
    bad_model = Toy()
    bad = build_engine(bad_model, ds_config=cfg, lr=1e-3, weight_decay=0.0)
    try:
        bad(ids[2 * rank : 2 * rank + 2])
        control = "no error"
    except RuntimeError as e:
        control = str(e)
    return {"toy_rel_err": errs, "toy_sharded_params": sharded, "toy_control": control}


def weights_only_check(root: Path, tag: str, micro: int, accum: int, world: int) -> dict:
    """Weights-only load of a non-latest tag, possibly written at a larger world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = make_engine(micro, accum, world)
    state = load_checkpoint(engine, root, tag, load_optimizer=False)
    sd = gather_state_dict(engine)
    out: dict = {"weights_state": state, "weights_lr_step": engine.lr_scheduler.last_epoch}
    if sd is not None:
        want = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        latest = get_fp32_state_dict_from_zero_checkpoint(str(root))
        out["weights_err"] = max(float((sd[k] - want[k]).abs().max()) for k in want)
        out["weights_vs_latest"] = max(float((sd[k] - latest[k]).abs().max()) for k in want)
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "resume"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--save-at", default="", help="comma-separated steps to checkpoint after")
    ap.add_argument("--tag", help="resume: explicit tag instead of latest")
    ap.add_argument("--weights-from", type=Path, help="weights-only load of --tag from this root")
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--expect-mismatch", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    info = init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    res: dict = {"world": info.world_size}
    engine = make_engine(args.micro, args.accum, info.world_size)
    res["sharded"] = sum(int(p.numel() == 0) for p in engine.module.parameters())
    res["n_params"] = sum(1 for _ in engine.module.parameters())

    if args.mode == "train":
        torch.manual_seed(1234)
        save_at = {int(x) for x in args.save_at.split(",") if x}
        steps = run_steps(engine, 1, args.steps, info.rank, info.world_size, args.ckpt, save_at)
    else:
        state = load_checkpoint(engine, args.ckpt, args.tag)
        res["resumed_state"] = state
        steps = run_steps(engine, state["step"] + 1, args.steps, info.rank, info.world_size, None, set())
    res["steps"] = steps
    sd = gather_state_dict(engine)
    if info.is_main:
        res["sd_keys_match"] = sorted(sd) == sorted(engine.module.state_dict())
        torch.save(sd, args.out.with_suffix(".pt"))
    if args.toy:
        res.update(toy_check(info.rank, info.world_size))
    if args.weights_from is not None:
        res.update(weights_only_check(args.weights_from, args.tag, args.micro, args.accum, info.world_size))
    if args.expect_mismatch is not None:
        try:
            load_checkpoint(make_engine(args.micro, args.accum, info.world_size), args.expect_mismatch)
            res["mismatch"] = "no error"
        except RuntimeError as e:
            res["mismatch"] = str(e)
    res["allreduce_sum_ranks"] = all_reduce_sum(float(info.rank + 1))
    barrier()
    if info.is_main:
        args.out.write_text(json.dumps(res, indent=1))
    shutdown_distributed()  # without it a rank can abort at teardown ("terminate called ...")
    os._exit(0)  # skip the slow interpreter teardown of deepspeed/transformers


if __name__ == "__main__":
    main()
