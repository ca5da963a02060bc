"""``ltscale.model.device``: the one way batches reach a model's device, and the one precision rule.

On CPU the CUDA branch of ``to_device`` (pin, then an asynchronous copy) cannot run; what is
checked here is that it is the branch taken for a CUDA target (``pin_memory`` and the
``non_blocking`` copy are called, recorded by a tensor subclass), and that every other move is a
plain ``.to`` that leaves tensors already in place untouched. tests/gpu runs the real copy.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from ltscale.config import ConfigError
from ltscale.model.device import model_device, resolve_precision, to_device
from ltscale.precision import precision_names
from ltscale.run_config import load_config


@dataclass
class Plan:
    starts: torch.Tensor
    n_passes: int


Pair = namedtuple("Pair", "ids mask")


def test_nested_batch_moves_to_the_target_device_and_keeps_its_structure():
    batch = {
        "input_ids": torch.arange(6).view(2, 3),
        "extra": [torch.ones(2), (torch.zeros(1), "keep")],
        "plan": Plan(torch.tensor([0, 2]), 3),
        "pair": Pair(torch.ones(1), torch.zeros(1)),
        "n": 4,
    }
    out = to_device(batch, "meta")
    assert out["input_ids"].device.type == "meta" and out["input_ids"].shape == (2, 3)
    assert out["extra"][0].is_meta and out["extra"][1][0].is_meta and out["extra"][1][1] == "keep"
    assert isinstance(out["plan"], Plan) and out["plan"].starts.is_meta and out["plan"].n_passes == 3
    assert isinstance(out["pair"], Pair) and out["pair"].ids.is_meta
    assert out["n"] == 4 and batch["input_ids"].device.type == "cpu"  # the input is not changed


def test_on_the_same_device_nothing_is_copied():
    batch = {"input_ids": torch.arange(4), "labels": torch.arange(4)}
    out = to_device(batch, torch.device("cpu"))
    assert out["input_ids"] is batch["input_ids"] and out["labels"] is batch["labels"]


class Recorder(torch.Tensor):
    """A CPU tensor that records ``pin_memory`` and the arguments of ``.to`` instead of doing them."""

    calls: list = []

    def pin_memory(self, *args, **kwargs):
        Recorder.calls.append(("pin_memory",))
        return self

    def to(self, *args, **kwargs):
        Recorder.calls.append(("to", args, kwargs))
        return self


def test_a_cuda_target_pins_then_copies_asynchronously(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no current-device lookup
    Recorder.calls = []
    t = torch.arange(3).as_subclass(Recorder)
    to_device({"ids": t}, "cuda:0")
    assert Recorder.calls == [("pin_memory",), ("to", (torch.device("cuda", 0),), {"non_blocking": True})]


def test_model_device_of_an_engine_and_of_a_module():
    class Engine:
        device = torch.device("meta")

    assert model_device(Engine()) == torch.device("meta")
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")


@pytest.mark.parametrize(
    ("model_dtype", "precision", "want"),
    [
        ("auto", "auto", (torch.float32, "fp32")),  # DS_ACCELERATOR=cpu in tests
        ("bf16", "auto", (torch.bfloat16, "bf16")),
        ("auto", "bf16", (torch.bfloat16, "bf16")),
        ("fp16", "fp16", (torch.float16, "fp16")),
        ("fp64", "auto", (torch.float64, "fp32")),
        ("fp64", "fp32", (torch.float64, "fp32")),
    ],
)
def test_one_rule_for_model_dtype_and_engine_precision(model_dtype, precision, want):
    assert resolve_precision(model_dtype, precision) == want


def test_auto_is_bf16_on_a_cuda_device_with_bf16(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision() == (torch.bfloat16, "bf16")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a CPU run on a machine that has a GPU
    assert resolve_precision() == (torch.float32, "fp32")


@pytest.mark.parametrize(("model_dtype", "precision"), [("fp32", "bf16"), ("bf16", "fp32"), ("fp64", "bf16")])
def test_a_contradiction_is_a_config_error_naming_both_keys(model_dtype, precision):
    with pytest.raises(
        ValueError, match=f"model.dtype={model_dtype} contradicts engine.precision={precision}"
    ):
        precision_names(model_dtype, precision)
    with pytest.raises(ConfigError, match="contradicts engine.precision"):
        load_config(None, [f"model.dtype={model_dtype}", f"engine.precision={precision}"])


def test_unknown_dtype_names_the_key():
    with pytest.raises(ConfigError, match="model.dtype: 'float32' not in auto"):
        load_config(None, ["model.dtype=float32"])
