"""Process for tests/e2e/test_bf16_curriculum.py: two shrunk 3-stage curricula through the real
``Trainer`` in one process (ZeRO-3 on one CPU rank), written as JSON to ``--out``.

* ``fp32``: the engine is wrapped to claim the device ``meta`` (a stand-in for a GPU: any device
  other than the batches' CPU), and ``ltscale.trainer.to_device`` is spied on. Every tensor the
  training step hands to the engine and every tensor the confidence-scoring forward hands to the
  base model is checked to be one that came out of ``to_device(..., engine.device)``. The spy
  returns CPU copies (a ``meta`` tensor holds no data to compute with), so the run goes on.
* ``bf16``: the same curriculum with ``engine.precision=bf16`` (the model built, trained, exported
  and evaluated in bf16), plain engine, evaluation after each stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import ltscale.trainer as trainer_mod  # noqa: E402
from ltscale.engine import dist  # noqa: E402
from ltscale.monitor import read_scalars  # noqa: E402
from ltscale.run_config import load_config  # noqa: E402

SMALL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.tokenizer_vocab_size=120", "data.synthetic.n_train=32", "data.synthetic.n_test=4",
    "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1", "train.micro_batch_size=8",
    "train.log_every=1", "train.save_every=1000", "train.keep_last_n=1", "train.scoring_batch_size=8",
    "eval.max_new_tokens=16", "eval.batch_size=4", "eval.analysis_samples=2", "eval.probe_steps=2",
]  # fmt: skip
FAKE_DEVICE = torch.device("meta")


def leaves(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in leaves(v)]
    return []


class Record:
    def __init__(self) -> None:
        self.moved: set[int] = set()  # ids of tensors that to_device returned
        self.keep: list[torch.Tensor] = []  # keeps them alive, so their ids stay unique
        self.devices: list[str] = []
        self.engine: list[bool] = []  # per tensor handed to the engine: did it come from to_device?
        self.score: list[bool] = []  # same for the scoring forward's tensors
        self.in_engine = False

    def to_device(self, batch, device):
        self.devices.append(str(device))

        def copy(obj):
            if isinstance(obj, torch.Tensor):
                out = obj.clone()
                self.moved.add(id(out))
                self.keep.append(out)
                return out
            if isinstance(obj, dict):
                return type(obj)({k: copy(v) for k, v in obj.items()})
            if isinstance(obj, (list, tuple)):
                return type(obj)(copy(v) for v in obj)
            return obj

        return copy(batch)


class OnAnotherDevice:
    """The real DeepSpeed engine, except that it says it computes on ``FAKE_DEVICE``."""

    device = FAKE_DEVICE

    def __init__(self, real, record: Record):
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_record", record)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        setattr(self._real, name, value)

    def __call__(self, *args, **kwargs):
        rec = self._record
        rec.engine += [id(t) in rec.moved for t in leaves((args, kwargs))]
        rec.in_engine = True
        try:
            return self._real(*args, **kwargs)
        finally:
            rec.in_engine = False


def run(precision: str, workdir: Path, record: Record | None) -> dict:
    run_dir = workdir / precision
    extra = [f"run_dir={run_dir}", f"engine.precision={precision}"]
    if record is not None:  # the engine's fake device cannot hold the evaluation model
        extra.append("eval.after_each_stage=false")
    cfg = load_config(None, SMALL + extra)
    real_build, real_to_device = trainer_mod.build_engine, trainer_mod.to_device
    if record is not None:
        trainer_mod.build_engine = lambda *a, **k: OnAnotherDevice(real_build(*a, **k), record)
        trainer_mod.to_device = record.to_device
    try:
        trainer = trainer_mod.Trainer(cfg)
        if record is not None:

            def scoring_inputs(module, args, kwargs):
                if not record.in_engine:  # the scoring forward calls the base model directly
                    record.score += [id(t) in record.moved for t in leaves((args, kwargs))]

            trainer.engine.module.base.register_forward_pre_hook(scoring_inputs, with_kwargs=True)
        trainer.train([1, 2, 3])
    finally:
        trainer_mod.build_engine, trainer_mod.to_device = real_build, real_to_device
    out = {"losses": [v for _, v in read_scalars(run_dir / "tb")["train/loss"]], "run_dir": str(run_dir)}
    if record is not None:
        out.update(devices=sorted(set(record.devices)), engine=record.engine, score=record.score,
                   engine_device=str(FAKE_DEVICE))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    dist.init_distributed()
    result = {
        "fp32": run("fp32", Path(args.workdir), Record()),
        "bf16": run("bf16", Path(args.workdir), None),
    }
    Path(args.out).write_text(json.dumps(result))
    dist.shutdown_distributed()


if __name__ == "__main__":
    main()
