"""Where a model runs: the device every batch is moved to, and the one precision rule.

Why one module: DeepSpeed does not move a forward's inputs to the engine's device, and Hugging Face
models do not either, so a CPU batch handed to a CUDA model fails at the first embedding lookup.
Every batch (training, confidence scoring, evaluation, generation, analyses) therefore passes
through :func:`to_device`. Likewise the model's dtype (``model.dtype``) and DeepSpeed's mixed
precision (``engine.precision``, the ``bf16``/``fp16`` sections of the DeepSpeed config) are decided
by :func:`resolve_precision` alone, so the weights are built, trained, exported and evaluated in
the same precision (docs/GPU.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from ltscale.precision import precision_names

__all__ = [
    "DTYPES",
    "auto_is_bf16",
    "model_device",
    "resolve_precision",
    "to_device",
]

T = TypeVar("T")

#: ``model.dtype`` names (``auto`` aside) -> torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


# ----------------------------------------------------------------------------------------- device


def model_device(model: Any) -> torch.device:
    """The device a model (or DeepSpeed engine) computes on.

    A DeepSpeed engine says it (``engine.device``); a module's parameters say it otherwise. Under
    ZeRO-3 a parameter is an empty partition, but it lives on the compute device all the same.
    """
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: T, device: torch.device | str) -> T:
    """``batch`` with every tensor in it on ``device``: the one way a batch reaches a model.

    ``batch`` is a tensor, or a dict / list / tuple / dataclass of them (nested); anything else is
    returned as is. Tensors already on ``device`` are returned unchanged, so on CPU this costs
    nothing and returns the very same tensors. For a CUDA target a CPU tensor is first pinned
    (page-locked), which lets the copy run asynchronously (``non_blocking``) on the current stream:
    later kernels on that stream are ordered after it, and PyTorch keeps the pinned buffer alive
    until the copy has finished.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return _move(batch, device)


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if device.type == "cuda" and obj.device.type == "cpu":
            return obj.pin_memory().to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)({k: _move(v, device) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_move(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _move(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


# -------------------------------------------------------------------------------------- precision


def auto_is_bf16() -> bool:
    """What ``auto`` means: bf16 on a CUDA device that supports it, fp32 otherwise.

    ``DS_ACCELERATOR=cpu`` is a CPU run even on a machine that has a GPU.
    """
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(model_dtype: str = "auto", engine_precision: str = "auto") -> tuple[torch.dtype, str]:
    """``(dtype the model is built, trained, exported and evaluated in, DeepSpeed precision)``.

    The rule is :func:`ltscale.precision.precision_names` (``model.dtype`` and ``engine.precision``
    name one precision; a contradiction is a ``ValueError`` naming both keys); both ``auto`` means
    :func:`auto_is_bf16`.
    """
    name, engine = precision_names(
        model_dtype, engine_precision, lambda: "bf16" if auto_is_bf16() else "fp32"
    )
    return DTYPES[name], engine
