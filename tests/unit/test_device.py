"""``ltscale.model.device``: the one way batches reach a model's device, and the one precision rule.

On CPU the CUDA branch of ``to_device`` (pin, then an asynchronous copy) cannot run; what is
checked here is that it is the branch taken for a CUDA target (``pin_memory`` and the
``non_blocking`` copy are called, recorded by a tensor subclass), and that every other move is a
plain ``.to`` that leaves tensors already in place untouched. tests/gpu runs the real copy.

Decoding paths (generate, eval, the analyses' instrumented decoder; the lm-eval backend's scoring
in tests/unit/test_lmeval.py): ``to_device`` is replaced by a spy that records the device it was
asked for and hands out fresh tensors, and a forward hook checks that the prompt batches the
model's embedding receives are those tensors; ``tests.helpers.HostToDevice`` checks that no other
call in ltscale copies host data to a device on the way. On CPU the device asked for is the CPU
and what these tests cannot show is a real transfer: that the copies overlap with compute, and that
nothing outside ltscale (transformers' own modules) moves data per step (tests/gpu runs a decode
on a GPU).
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from ltscale.config import ConfigError
from ltscale.model.device import model_device, resolve_precision, to_device
from ltscale.precision import precision_names
from ltscale.run_config import load_config
from tests.helpers import HostToDevice


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


# -------------------------------------------------------------------------------- decoding paths


class Spy:
    """Stands in for ``to_device`` in one module: records the device and what it was given, and
    returns fresh copies whose ids it keeps (the tensors that came through it)."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.given: list[object] = []
        self.moved: dict[int, torch.Tensor] = {}

    def __call__(self, batch, device):
        self.devices.append(torch.device(device))
        self.given.append(batch)
        return self._fresh(batch)

    def _fresh(self, obj):
        if isinstance(obj, torch.Tensor):
            out = obj.clone()
            self.moved[id(out)] = out
            return out
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._fresh(v) for v in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(
                obj, **{f.name: self._fresh(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            )
        return obj


def watch_embedding(lm) -> list[bool]:
    """Per call of ``lm``'s input embedding with a batch of prompts (2-D ids): whether the ids
    came out of the spy (set ``watch_embedding.spy``) -- filled in as the model runs."""
    seen: list[bool] = []

    def hook(module, args):
        if args[0].dim() == 2:
            seen.append(id(args[0]) in watch_embedding.spy.moved)

    lm.base.get_input_embeddings().register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("forced", [False, True])
def test_generate_moves_each_prefill_and_the_rule_through_to_device(monkeypatch, forced):
    from ltscale.model import generation
    from tests.unit.test_generation import EOS, THINK, many_prompts, model

    lm = model("fusion", think_bias=0.35)
    spy = watch_embedding.spy = Spy()
    monkeypatch.setattr(generation, "to_device", spy)
    prefills = watch_embedding(lm)
    rule = generation.Greedy(forced=torch.tensor([THINK, THINK, 7]) if forced else None)
    with HostToDevice() as moves:
        out = generation.generate_many(lm, many_prompts(7), 12, slots=3, eos_token_id=EOS, rule=rule)
    assert moves.found == []
    assert set(spy.devices) == {model_device(lm)}
    assert len(prefills) >= 3 and all(prefills), "a prompt batch reached the model without to_device"
    assert any(isinstance(g, generation.Greedy) for g in spy.given), "the rule's tensors did not move"
    if forced:
        assert torch.equal(out.sequences[:, :3], torch.tensor([THINK, THINK, 7]).expand(7, 3))


def test_eval_and_the_analysis_decoder_reach_the_device_through_to_device(monkeypatch):
    from ltscale.eval import analysis
    from ltscale.eval.evaluate import evaluate
    from ltscale.inference import inference_for
    from ltscale.model import generation
    from tests.unit.test_evaluate import make_records, make_tokenizer, real_lm

    lm = real_lm()
    spy = watch_embedding.spy = Spy()
    monkeypatch.setattr(generation, "to_device", spy)
    prefills = watch_embedding(lm)
    with HostToDevice() as moves:
        _, examples = evaluate(inference_for(lm, make_tokenizer()), make_records(5), batch_size=2,
                               max_new_tokens=6, progress=False)  # fmt: skip
    assert moves.found == [] and len(examples) == 5
    assert set(spy.devices) == {model_device(lm)} and len(prefills) >= 3 and all(prefills)

    spy = Spy()
    monkeypatch.setattr(analysis, "to_device", spy)
    fed: list[bool] = []
    lm.base.get_input_embeddings().register_forward_pre_hook(
        lambda m, args: fed.append(id(args[0]) in spy.moved)
    )
    with HostToDevice() as moves:
        trace = analysis.trace_generation(lm, [4, 8, 9, 10], 6, attention=True)
    assert moves.found == []
    assert set(spy.devices) == {model_device(lm)}
    assert len(fed) == len(trace.tokens) and all(fed), "every step's ids came through to_device"
