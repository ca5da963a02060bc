"""This process's RNG state as plain tensors, saved per rank inside a checkpoint.

Python's, numpy's legacy global and torch's (CPU, and CUDA when initialised) generators are what
data order, dropout and latent sampling draw from, so an exact resume restores all of them. The
state is stored as safetensors (tensors only): loading a checkpoint never unpickles RNG state.
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as plain tensors (stored as safetensors: no pickle)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if name != "MT19937":  # pragma: no cover - numpy's legacy global RNG is always MT19937
        raise RuntimeError(f"unexpected numpy global RNG {name!r}")
    state = {
        "python_version": torch.tensor([version], dtype=torch.int64),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "numpy_pos": torch.tensor([pos], dtype=torch.int64),
        "numpy_has_gauss": torch.tensor([has_gauss], dtype=torch.int64),
        "numpy_cached_gaussian": torch.tensor([cached], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    gauss = float(state["python_gauss"][0])
    random.setstate(
        (
            int(state["python_version"][0]),
            tuple(int(x) for x in state["python_mt"].tolist()),
            None if math.isnan(gauss) else gauss,
        )
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"][0]),
            int(state["numpy_has_gauss"][0]),
            float(state["numpy_cached_gaussian"][0]),
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["torch_cuda"].unbind(0))
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint has CUDA RNG for %d devices, this process sees %d: CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
