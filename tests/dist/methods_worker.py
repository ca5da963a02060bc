"""Rank program for tests/dist/test_methods_dist.py: every trainable method through the same
trainer and 2-rank ZeRO-3 engine, one launch looping over the methods.

Each method runs a shrunk curriculum on the tiny default (tiny model, 64 synthetic problems, a few
steps per stage, loss logged every step, no eval). Rank 0 writes, per method, the logged losses,
the engine's module class and how many parameters ZeRO-3 partitioned to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ltscale.engine import dist  # noqa: E402
from ltscale.monitor import read_scalars  # noqa: E402
from ltscale.run_config import load_config  # noqa: E402
from ltscale.trainer import Trainer  # noqa: E402

SMALL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.tokenizer_vocab_size=120", "data.synthetic.n_train=64", "data.synthetic.n_test=4",
    "train.micro_batch_size=4", "train.log_every=1", "train.save_every=1000", "train.keep_last_n=1",
    "eval.after_each_stage=false", "optim.warmup_ratio=0.0", "optim.stage_strategy=continue",
    "optim.schedule=constant",
]  # fmt: skip
LT = ["stages.0.epochs=0.5", "stages.1.epochs=0.5", "stages.2.epochs=0.5", "stages.1.lr_scale=1.0",
      "stages.2.lr_scale=1.0"]  # fmt: skip
METHODS = {
    "pause": LT,
    "no_stage3": LT,
    "adapter": LT + ["model.adapter_hidden=16"],
    "coconut": ["coconut.max_latent_stage=2", "coconut.c_thought=1", "stages.0.epochs=0.5",
                "stages.1.epochs=0.5", "stages.2.epochs=0.5", "stages.1.lr_scale=1.0", "stages.2.lr_scale=1.0"],
    "softcot": ["softcot.assistant=configs/tiny-assistant.yaml", "softcot.n_thoughts=2", "optim.lr=0.03",
                "stages.0.epochs=0.5", "stages.1.epochs=0.1", "stages.2.epochs=0.2"],
}  # fmt: skip
# Every stage's epochs are given here, so the budget configs/tiny.yaml ships (docs/study.md) does not
# change what this test trains: SoftCoT's projection alone barely moves a random model's loss, so
# its later stages stay a step or two and the overall decrease is what is checked for it.


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    info = dist.init_distributed()
    # the shipped ZeRO-3 template with every parameter partitioned (tiny matrices included)
    ds = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_file = Path(args.workdir) / "zero3_test.json"
    if info.is_main:
        ds_file.write_text(json.dumps(ds))
    dist.barrier()
    result: dict[str, dict] = {}
    for method, extra in METHODS.items():
        run_dir = Path(args.workdir) / method
        # coconut: only its stages 0-2 (2 stages with latents); the others: the configured stages
        t0 = time.perf_counter()
        cfg = load_config(
            None, SMALL + [f"method={method}", f"run_dir={run_dir}", f"engine.ds_config={ds_file}"] + extra
        )
        trainer = Trainer(cfg)
        trainer.train(list(range(1, len(cfg.stages) + 1)))
        sharded = sum(1 for prm in trainer.engine.module.parameters() if prm.numel() == 0)
        if info.is_main:
            losses = read_scalars(run_dir / "tb")["train/loss"]
            stage = read_scalars(run_dir / "tb")["train/stage"]
            result[method] = {
                "losses": [v for _, v in losses],
                "stages": [int(v) for _, v in stage],
                "modes": [st.mode for st in cfg.stages],
                "module": type(trainer.engine.module).__name__,
                "sharded_params": sharded,
                "world": info.world_size,
                "seconds": time.perf_counter() - t0,
            }
        trainer.engine.destroy()
        dist.barrier()
    if info.is_main:
        Path(args.out).write_text(json.dumps(result))
    dist.shutdown_distributed()


if __name__ == "__main__":
    main()
