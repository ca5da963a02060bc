"""Waiting for file-system work (rank 0's exports and analyses, checkpoint writes and hashes)
outside the timed collectives.

Why: the other ranks of a job wait while rank 0 exports a stage (16 GB for 8B in bf16), runs the
analyses, or commits and rotates checkpoints, and every rank hashes its share of a checkpoint
(~96 GB in all for 8B with optimizer state). Waiting for that in an ordinary barrier puts minutes
of I/O under ``engine.collective_timeout_s``, which exists to catch a dead or hung rank within
minutes: with NCCL, the watchdog aborts the waiting ranks and the job dies although nothing is
wrong. So these waits go through :func:`wait_for_io`: a barrier in a gloo group of its own, created
with the generous ``engine.io_timeout_s`` (sized to the model by :func:`io_timeout_for`), with no
collective of the training group in flight meanwhile, so no NCCL watchdog is involved. A rank 0
that dies or hangs still ends the wait, with an error that names rank 0 and what it was doing.
See docs/GPU.md.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import torch.distributed as tdist

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_IO_TIMEOUT_S", "IOWaitError", "io_timeout_for", "wait_for_io"]

#: Without a model to size it by: an hour.
DEFAULT_IO_TIMEOUT_S = 3600.0
#: Assumed worst sustained throughput of a (shared, network) file system for one rank's I/O.
SLOW_FS_BYTES_PER_S = 25e6
#: Rank 0's solo work that is not I/O: evaluation bookkeeping and the analyses after a stage.
SOLO_WORK_S = 1800.0
#: Bytes per parameter of a ZeRO checkpoint with Adam: 16-bit weights, fp32 masters, two fp32 moments.
CHECKPOINT_BYTES_PER_PARAM = 14

# One gloo group per timeout, created on first use by every rank at the same call (collective).
_GROUPS: dict[float, Any] = {}


class IOWaitError(RuntimeError):
    """A rank did not reach an I/O wait in time (hung) or left the job (died) during it."""


def io_timeout_for(
    n_params: int, world_size: int, *, export_bytes_per_param: int = 4, floor_s: float = 0.0
) -> float:
    """Seconds the I/O waits allow: rank 0's worst solo work for a model of ``n_params``.

    Rank 0 alone writes the export (``export_bytes_per_param``: 2 for bf16, 4 for fp32) and hashes
    and fsyncs its share of a checkpoint, all at :data:`SLOW_FS_BYTES_PER_S`, plus
    :data:`SOLO_WORK_S` for the analyses. Never below ``floor_s`` (the collective timeout): an I/O
    wait must not give up before an ordinary collective would. 8B on 8 ranks in bf16: ~1.5 hours.
    """
    solo_bytes = n_params * (export_bytes_per_param + CHECKPOINT_BYTES_PER_PARAM / max(world_size, 1))
    return max(float(floor_s), SOLO_WORK_S + solo_bytes / SLOW_FS_BYTES_PER_S)


def _group(timeout_s: float):
    group = _GROUPS.get(timeout_s)
    if group is None:
        group = tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        _GROUPS[timeout_s] = group
    return group


def wait_for_io(what: str, timeout_s: float | None = None, *, slow_rank: str = "rank 0") -> None:
    """Barrier of every rank after file-system work (``what``: "stage 2 export"), outside the timed
    collectives. Collective; a no-op without a process group or with one rank.

    ``slow_rank`` names who the others are usually waiting for, for the error message. Raises
    :class:`IOWaitError` when the wait fails: after ``timeout_s`` (a hung rank) or earlier when a
    rank left the job (its connection closed).
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return
    timeout_s = float(timeout_s or DEFAULT_IO_TIMEOUT_S)
    rank = tdist.get_rank()
    if rank == 0 and slow_rank == "rank 0":
        slow_rank = "the other ranks"
    t0 = time.monotonic()
    try:
        tdist.barrier(group=_group(timeout_s))
    except RuntimeError as err:
        waited = time.monotonic() - t0
        how = (
            f"did not finish {what} within engine.io_timeout_s={timeout_s:.0f} s (hung, or the file "
            "system is slower than that allows: raise engine.io_timeout_s)"
            if waited >= 0.9 * timeout_s
            else f"left the job during {what} (died or was killed: see its log)"
        )
        raise IOWaitError(f"rank {rank}: waited {waited:.0f} s for {slow_rank}, which {how}") from err
    waited = time.monotonic() - t0
    if waited > 60:
        log.info("waited %.0f s for %s to finish %s", waited, slow_rank, what)
