"""Process for tests/e2e/test_bf16_curriculum.py: two shrunk 3-stage curricula through the real
``Trainer`` in one process (ZeRO-3 on one CPU rank), written as JSON to ``--out``.

* ``fp32``: the engine and the model claim the device ``meta`` (a stand-in for a GPU: any device
  other than the batches' CPU): the engine wrapped to say so, the rollout called with it as the
  model's device. ``to_device`` is spied on where the trainer (the confidence-scoring forward) and
  the rollout plan (``RolloutPlan.to``) call it; the spy records the device asked for and returns
  CPU copies (a ``meta`` tensor holds no data to compute with), so the run goes on. Recorded: whether
  every tensor the training step hands to the engine is one ``collate`` made (a host batch, not a
  moved one); whether every tensor of the rollout's plan, the ids the embedding reads and the
  positions the decoder reads share storage with a copy ``to_device`` returned; whether the
  scoring forward's inputs came out of ``to_device``; and every call in ltscale that puts data on
  a device some other way during a training forward (``tests.helpers.HostToDevice``).
* ``bf16``: the same curriculum with ``engine.precision=bf16`` (the model built, trained, exported
  and evaluated in bf16), plain engine, evaluation after each stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import ltscale.model.latent_lm as latent_lm_mod  # noqa: E402
import ltscale.model.rollout_plan as rollout_plan_mod  # noqa: E402
import ltscale.trainer as trainer_mod  # noqa: E402
from ltscale.engine import dist  # noqa: E402
from ltscale.monitor import read_scalars  # noqa: E402
from ltscale.run_config import load_config  # noqa: E402
from tests.helpers import HostToDevice  # noqa: E402

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


def plan_tensors(plan) -> list[torch.Tensor]:
    """Every tensor a ``RolloutPlan`` and its passes hold."""
    return [
        value
        for owner in (plan, *plan.passes)
        for f in dataclasses.fields(owner)
        if isinstance(value := getattr(owner, f.name), torch.Tensor)
    ]


class Record:
    def __init__(self) -> None:
        # storage address -> a tensor to_device returned (kept alive, so no other storage reuses it)
        self.moved: dict[int, torch.Tensor] = {}
        self.collated: dict[int, torch.Tensor] = {}  # id -> a tensor collate made (kept alive)
        self.devices: list[str] = []
        self.engine: list[bool] = []  # per tensor handed to the engine: one collate made on the host?
        self.plans: list[bool] = []  # per training forward: every plan tensor came out of to_device?
        self.embedded: list[bool] = []  # per ids the embedding read in a training forward: same
        self.positions: list[bool] = []  # per position ids the decoder read in a training forward: same
        self.score: list[bool] = []  # per tensor the scoring forward handed to the base model: same
        self.host_to_device: list[str] = []  # other calls that put data on a device in a training forward
        self.in_engine = False

    def came_through(self, t: torch.Tensor) -> bool:
        """``t`` is a copy ``to_device`` returned, or a view of one (a plan's index tensors are views of
        its one shipped buffer)."""
        return t.untyped_storage().data_ptr() in self.moved

    def to_device(self, batch, device):
        self.devices.append(str(device))

        def copy(obj):
            if isinstance(obj, torch.Tensor):
                out = obj.clone()
                self.moved[out.untyped_storage().data_ptr()] = out
                return out
            if isinstance(obj, dict):
                return type(obj)({k: copy(v) for k, v in obj.items()})
            if isinstance(obj, (list, tuple)):
                return type(obj)(copy(v) for v in obj)
            return obj

        return copy(batch)

    def collate(self, real):
        def collate(*args, **kwargs):
            batch = real(*args, **kwargs)
            self.collated.update({id(t): t for t in leaves(batch)})
            return batch

        return collate

    def rollout(self, real):
        """``latent_rollout`` as if the model's weights were on ``FAKE_DEVICE``."""

        def rollout(**kwargs):
            res = real(**{**kwargs, "device": FAKE_DEVICE})
            self.plans.append(all(self.came_through(t) for t in plan_tensors(res.plan)))
            return res

        return rollout


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
        rec.engine += [
            rec.collated.get(id(t)) is t and t.device.type == "cpu" and not rec.came_through(t)
            for t in leaves((args, kwargs))
        ]
        rec.in_engine = True
        try:
            with HostToDevice() as moves:
                return self._real(*args, **kwargs)
        finally:
            rec.in_engine = False
            rec.host_to_device += moves.found


def run(precision: str, workdir: Path, record: Record | None) -> dict:
    run_dir = workdir / precision
    extra = [f"run_dir={run_dir}", f"engine.precision={precision}"]
    if record is not None:  # the engine's fake device cannot hold the evaluation model
        extra.append("eval.after_each_stage=false")
    cfg = load_config(None, SMALL + extra)
    real = (trainer_mod.build_engine, trainer_mod.to_device, trainer_mod.collate, rollout_plan_mod.to_device,
            latent_lm_mod.latent_rollout)  # fmt: skip
    if record is not None:
        trainer_mod.build_engine = lambda *a, **k: OnAnotherDevice(real[0](*a, **k), record)
        trainer_mod.to_device = rollout_plan_mod.to_device = record.to_device
        trainer_mod.collate = record.collate(real[2])
        latent_lm_mod.latent_rollout = record.rollout(real[4])
    try:
        trainer = trainer_mod.Trainer(cfg)
        if record is not None:
            base = trainer.engine.module.base

            def base_inputs(module, args, kwargs):
                if not record.in_engine:  # the scoring forward calls the base model directly
                    record.score += [record.came_through(t) for t in leaves((args, kwargs))]

            def embedded(module, args):
                if record.in_engine:
                    record.embedded += [record.came_through(t) for t in leaves(args)]

            def positions(module, args, kwargs):
                if record.in_engine:
                    record.positions.append(record.came_through(kwargs["position_ids"]))

            base.register_forward_pre_hook(base_inputs, with_kwargs=True)
            base.get_input_embeddings().register_forward_pre_hook(embedded)
            base.get_decoder().register_forward_pre_hook(positions, with_kwargs=True)
        trainer.train([1, 2, 3])
    finally:
        (trainer_mod.build_engine, trainer_mod.to_device, trainer_mod.collate, rollout_plan_mod.to_device,
         latent_lm_mod.latent_rollout) = real  # fmt: skip
    out = {"losses": [v for _, v in read_scalars(run_dir / "tb")["train/loss"]], "run_dir": str(run_dir)}
    if record is not None:
        out.update(devices=sorted(set(record.devices)), engine_device=str(FAKE_DEVICE), engine=record.engine,
                   plans=record.plans, embedded=record.embedded, positions=record.positions, score=record.score,
                   host_to_device=record.host_to_device)  # fmt: skip
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
