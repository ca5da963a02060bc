"""The training forward from a host batch: no device-to-host read on the way, one copy to the device.

The trainer hands the collated batch to the engine on CPU; ``LatentLM.forward`` plans the rollout
there and ``RolloutPlan.to`` ships every index tensor and the ids in one copy (``rollout_plan.py``).
Here each method's training forward (the LatentLM modes: ``cot`` for CoT and every first stage,
``pause``, ``hidden`` for LT-Tuning stage 2 and Coconut's latent stages, ``fusion`` with and without
the adapter; SoftCoT's wrapper) runs forward and backward on a model on ``meta`` (the stand-in for a
GPU) from CPU ids, mask and labels, under a dispatch mode that records every copy between the host
and a device and every op that needs a device tensor's value on the host (``SyncCounter``'s scalar
reads and data-shaped ops, applied to device tensors only; planning's reads of CPU tensors are no
syncs).

What this proves on CPU: no op of these forwards or backwards reads a device value on the host or
copies device data back; the host data reaches the device in the plan's one copy (plus SoftCoT's
soft thoughts, one more), and ``tests.helpers.HostToDevice`` finds no call in ltscale that makes
a copy other than through ``to_device``; a batch moved to the device first is read back for planning (counted
below), which is what the trainer's step did before it passed the host batch. On ``meta`` any such
read would also fail, as meta tensors hold no data. What it cannot prove: syncs inside a kernel or
the CUDA caching allocator, that the pinned copy really overlaps with compute, and what DeepSpeed's
engine does with the inputs on CUDA (tests/gpu runs the real training step on a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ltscale.methods.softcot import SoftCoTLM
from ltscale.model import LatentLM
from ltscale.model.device import to_device
from tests.helpers import HostToDevice, make_tiny_llama
from tests.unit.test_rollout import THINK, VOCAB, batch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from host_syncs import SyncCounter  # noqa: E402  (one list of syncing ops for the bench and the tests)

DEVICE = torch.device("meta")
_COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}


class DeviceTraffic(TorchDispatchMode):
    """``to_device``: copies host -> device; ``to_host``: copies device -> host; ``reads``: ops that
    need a device tensor's value on the host (``SyncCounter``'s, on a non-CPU input)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_device: list[str] = []
        self.to_host: list[str] = []
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _COPIES:
            if name == "_to_copy":
                src = args[0].device
                dst = torch.device(kwargs["device"]) if kwargs.get("device") is not None else src
            elif name == "copy_":
                dst, src = args[0].device, args[1].device
            else:  # _copy_from(self, dst)
                src, dst = args[0].device, args[1].device
            if src.type == "cpu" and dst.type != "cpu":
                self.to_device.append(name)
            elif src.type != "cpu" and dst.type == "cpu":
                self.to_host.append(name)
        on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in _flat(args))
        if on_device and _syncing(name, args, kwargs):
            self.reads.append(name)
        return func(*args, **kwargs)


def _syncing(name: str, args, kwargs) -> bool:
    """``SyncCounter``'s rule: a scalar read, a data-shaped op, a boolean-mask index, or
    ``repeat_interleave`` without ``output_size``."""
    if name in SyncCounter.SCALAR or name in SyncCounter.DATA_SHAPED:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    masks = [t for t in _flat(args[1:2]) if isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)]
    return name in ("index", "index_put", "index_put_") and bool(masks)


def _flat(args) -> list:
    out = []
    for a in args:
        out.extend(_flat(a) if isinstance(a, (list, tuple)) else [a])
    return out


def _base():
    return make_tiny_llama(VOCAB, kv_heads=2, dtype=torch.float32, max_positions=256)


def _softcot() -> SoftCoTLM:
    """A SoftCoT model whose training prompts' thoughts are cached on the host (as ``fill_cache``
    leaves them for training), its main model and projection on ``DEVICE``."""
    assistant = make_tiny_llama(VOCAB, 24, kv_heads=2, dtype=torch.float32, seed=1)
    lm = SoftCoTLM(_base(), THINK, assistant=assistant, placeholder_id=2, n_thoughts=2)
    ids, mask, _ = _softcot_batch()
    lm.fill_cache([lm.prompt_of(row[m.bool()]) for row, m in zip(ids, mask)])
    return lm.to(DEVICE)


def _softcot_batch():
    ids, mask, labels = batch("none")
    ids[:, 4:6] = THINK  # the prompt is the first 4 tokens of every row, then the N=2 slots
    return ids, mask, labels.masked_fill(ids == THINK, -100)


CASES = {
    "cot": dict(mode="cot"),
    "pause": dict(mode="pause"),
    "hidden": dict(mode="hidden"),
    "hidden-padded": dict(mode="hidden", packed_passes="off"),
    "fusion": dict(mode="fusion"),
    "fusion-adapter": dict(mode="fusion", adapter=True, adapter_hidden=16),
}


@pytest.mark.parametrize("case", [*CASES, "softcot"])
def test_training_forward_from_host_ids_reads_nothing_back(case):
    if case == "softcot":  # host data shipped: the soft thoughts and the plan
        lm, (ids, mask, labels), shipped = _softcot(), _softcot_batch(), 2
    else:
        lm, (ids, mask, labels), shipped = LatentLM(_base(), THINK, **CASES[case]).to(DEVICE), batch("mixed"), 1
    lm.train()
    with DeviceTraffic() as fwd, HostToDevice() as calls:
        out = lm(ids, mask, labels, min_passes=7, return_logits=False)
    with DeviceTraffic() as bwd:
        out.loss.backward()
    assert fwd.to_host == [] and fwd.reads == [], (fwd.to_host, fwd.reads)
    assert bwd.to_host == [] and bwd.reads == [] and bwd.to_device == [], vars(bwd)
    assert len(fwd.to_device) == shipped, fwd.to_device
    assert calls.found == [], f"copied to the device other than through to_device: {calls.found}"
    assert out.loss.device == DEVICE and out.n_passes == (7 if lm.uses_rollout else 1)
    assert ids.device.type == "cpu"


def test_a_batch_moved_to_the_device_first_is_read_back_for_planning():
    """What the trainer's step paid before it passed the host batch: planning copies the ids back
    (on ``meta`` that copy fails, having no data; on a GPU it is one sync per micro-step)."""
    lm = LatentLM(_base(), THINK, mode="hidden").to(DEVICE).train()
    moved = to_device(batch("mixed"), DEVICE)
    with DeviceTraffic() as traffic, pytest.raises(NotImplementedError, match="meta"):
        lm(*moved, min_passes=7)
    assert traffic.to_host == ["_to_copy"], vars(traffic)
