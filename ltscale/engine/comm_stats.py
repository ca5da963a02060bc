"""Counts the bytes ZeRO-3 all-gathers, for ``perf/allgather_bytes`` and the bench.

DeepSpeed's own comms logger makes every collective blocking (it synchronises to time them); this
counter only reads tensor sizes. It wraps ``deepspeed.comm.comm.all_gather_into_tensor``, the one
function ZeRO-3's parameter fetch (``allgather_fn``, per-param and coalesced) ends in, and counts
the bytes each rank *receives* (the gathered output tensor).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


class AllGatherCounter:
    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def record(self, output_tensor: Any) -> None:
        self.bytes += int(output_tensor.numel()) * int(output_tensor.element_size())
        self.calls += 1


_COUNTER = AllGatherCounter()
_INSTALLED = False


def install() -> AllGatherCounter:
    """Patch DeepSpeed's all-gather entry point once per process; returns the shared counter."""
    global _INSTALLED
    if _INSTALLED:
        return _COUNTER
    comm = importlib.import_module("deepspeed.comm.comm")
    original = comm.all_gather_into_tensor

    @functools.wraps(original)
    def counted(output_tensor, tensor, *args, **kwargs):
        _COUNTER.record(output_tensor)
        return original(output_tensor, tensor, *args, **kwargs)

    comm.all_gather_into_tensor = counted  # allgather_fn looks the name up in this module at call time
    package = importlib.import_module("deepspeed.comm")
    if getattr(package, "all_gather_into_tensor", None) is original:
        package.all_gather_into_tensor = counted
    _INSTALLED = True
    return _COUNTER
