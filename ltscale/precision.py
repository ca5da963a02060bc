"""The one rule tying ``model.dtype`` to ``engine.precision`` (by name; torch-free, so the config
can check it before a job is queued). ``ltscale.model.device.resolve_precision`` applies it with
the machine's answer for ``auto``; docs/GPU.md explains the choice.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["DTYPE_NAMES", "ENGINE_PRECISIONS", "precision_names"]

#: ``model.dtype`` names (``auto`` aside).
DTYPE_NAMES = ("fp32", "bf16", "fp16", "fp64")
#: ``engine.precision`` names (``auto`` aside): what DeepSpeed can train in.
ENGINE_PRECISIONS = ("fp32", "bf16", "fp16")


def precision_names(
    model_dtype: str, engine_precision: str, auto: Callable[[], str] = lambda: "fp32"
) -> tuple[str, str]:
    """``(model dtype, DeepSpeed precision)`` names; ``auto()`` says what both-``auto`` means here.

    ``model.dtype`` and ``engine.precision`` name the same precision; whichever is ``auto``
    follows the other. An fp64 model trains with ``engine.precision: fp32`` (no mixed precision;
    tests and parity runs). Any other pair is a contradiction (``ValueError`` naming both keys):
    DeepSpeed casts the module to its own precision (a bf16 engine trains a bf16 module), so a
    model built in another dtype only costs memory or is silently not what was asked for.
    """
    if model_dtype != "auto" and model_dtype not in DTYPE_NAMES:
        raise ValueError(f"model.dtype: {model_dtype!r} not in auto|{'|'.join(DTYPE_NAMES)}")
    if engine_precision != "auto" and engine_precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine.precision: {engine_precision!r} not in auto|{'|'.join(ENGINE_PRECISIONS)}")
    if model_dtype == "auto" and engine_precision == "auto":
        name = auto()
        return name, name
    if model_dtype == "auto":
        return engine_precision, engine_precision
    engine = "fp32" if model_dtype == "fp64" else model_dtype
    if engine_precision not in ("auto", engine):
        raise ValueError(
            f"model.dtype={model_dtype} contradicts engine.precision={engine_precision}: DeepSpeed trains "
            f"the module in {engine_precision}, so the weights would not be what model.dtype says; set one "
            "of them to auto or make them equal"
        )
    return model_dtype, engine
