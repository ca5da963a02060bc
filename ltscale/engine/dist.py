"""Process-group initialisation and small collectives.

Why this module exists: ltscale is started by several launchers (``deepspeed``, ``torchrun``,
``mpirun``, ``srun`` and plain ``python``) and each leaves a different environment behind
(``ltscale.launch_env`` reads them all). DeepSpeed's own fallback for a missing environment is MPI
discovery, which takes the first address of ``hostname -I`` as ``MASTER_ADDR`` (a non-loopback
interface on most machines) and, once mpi4py is installed, is taken even by a bare ``python
script.py``.  We therefore always build the ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT``
environment ourselves and call DeepSpeed with ``auto_mpi_discovery=False``.

The collectives at the bottom let the trainer reduce metrics and agree on per-step decisions
(e.g. the number of latent passes, which must be equal on every rank under ZeRO-3) without
importing ``torch.distributed`` itself. They all degrade to the identity when no process group
exists, so single-process code and unit tests need no special casing.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from ltscale.launch_env import LaunchEnvError, RankEnv, rank_env

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "init_distributed",
    "shutdown_distributed",
    "dist_info",
    "is_initialized",
    "all_reduce_max",
    "all_reduce_sum",
    "all_reduce_mean_tensor",
    "all_gather_object",
    "broadcast_object",
    "barrier",
    "any_rank",
    "is_collective_failure",
]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = "29500"

_LAUNCH: RankEnv | None = None  # what _prepare_env resolved for this process


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``is_main`` is global rank 0 (logging, file writes)."""

    rank: int
    world_size: int
    local_rank: int
    is_main: bool


def _free_port() -> int:
    """A currently free TCP port on loopback (for single-process runs, so parallel tests don't collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((DEFAULT_MASTER_ADDR, 0))
        return int(s.getsockname()[1])


def _prepare_env() -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the launcher; return its name.

    Which launcher and which rank: ``ltscale.launch_env.rank_env`` (the one reader of launch
    variables). MASTER_ADDR defaults to loopback only when every rank is on this node: an MPI/PMI/
    srun launch across nodes (or one that does not say) without MASTER_ADDR is an error, not a hang
    on 127.0.0.1. A single process gets a free port, so concurrent single-process runs don't clash.
    """
    global _LAUNCH
    env = os.environ
    launch = rank_env(env)
    if (
        launch.source in ("openmpi", "pmi", "srun")
        and launch.spans_nodes is not False
        and "MASTER_ADDR" not in env
    ):
        on_node = "an unknown number" if launch.local_world_size is None else launch.local_world_size
        raise LaunchEnvError(
            f"{launch.source} launch of {launch.world_size} ranks, {on_node} of them on this node, without "
            "MASTER_ADDR: export MASTER_ADDR (the first node's address) and MASTER_PORT; ltscale never guesses it"
        )
    env["RANK"] = str(launch.rank)
    env["WORLD_SIZE"] = str(launch.world_size)
    env["LOCAL_RANK"] = str(launch.local_rank)
    env.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    env.setdefault("MASTER_PORT", str(_free_port()) if launch.source == "single" else DEFAULT_MASTER_PORT)
    _LAUNCH = launch
    return launch.source


def _skip_shm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (70-90 s, 1.6 GB RAM).

    That op only accelerates inference all-reduce on CPU; training traffic goes through gloo.
    ``import deepspeed.comm.torch as m`` resolves to the real ``torch`` re-exported by
    ``deepspeed.comm``, hence importlib.
    """
    with contextlib.suppress(Exception):
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _info_from_pg() -> DistInfo:
    rank = tdist.get_rank()
    world = tdist.get_world_size()
    local = _LAUNCH.local_rank if _LAUNCH is not None else rank
    return DistInfo(rank=rank, world_size=world, local_rank=local, is_main=rank == 0)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def dist_info() -> DistInfo:
    """Current placement; world 1 when no process group exists (does not initialise one)."""
    if is_initialized():
        return _info_from_pg()
    return DistInfo(rank=0, world_size=1, local_rank=0, is_main=True)


def init_distributed(*, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group once (idempotent) and return this rank's placement.

    ``timeout_s`` becomes the collective timeout, so a rank that died or diverged turns into an
    error on the others after that many seconds instead of an endless hang.
    """
    if is_initialized():
        return _info_from_pg()
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # Without it DeepSpeed auto-detects the CPU accelerator anyway, but with a WARNING.
        os.environ["DS_ACCELERATOR"] = "cpu"
    how = _prepare_env()
    timeout = timedelta(seconds=float(timeout_s))
    try:
        import deepspeed
    except ImportError:  # e.g. a GPU box without deepspeed: plain torch.distributed is enough here
        deepspeed = None
    if deepspeed is not None:
        _skip_shm_build()
        deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timeout, verbose=False)
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend, timeout=timeout)
    info = _info_from_pg()
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda":
        torch.cuda.set_device(info.local_rank)
    log.info(
        "distributed: launcher=%s rank=%d/%d local_rank=%d backend=%s master=%s:%s",
        how,
        info.rank,
        info.world_size,
        info.local_rank,
        tdist.get_backend(),
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    )
    return info


def shutdown_distributed() -> None:
    """Tear the process group down at the end of a run (no-op when none exists).

    Why: leaving a gloo process group to interpreter teardown can abort a rank with
    "terminate called without an active exception" (seen under mpirun), turning a
    successful run into a non-zero exit. The barrier keeps a fast rank from destroying its
    group while a slow one still communicates.
    """
    if not is_initialized():
        return
    if sys.exc_info()[0] is None:  # called from a `finally` while an error propagates: no barrier,
        with contextlib.suppress(Exception):  # the peers may be dead or elsewhere (it would block)
            tdist.barrier()
    with contextlib.suppress(Exception):
        tdist.destroy_process_group()
    with contextlib.suppress(Exception):  # DeepSpeed's comm wrapper caches the group
        importlib.import_module("deepspeed.comm.comm").cdb = None


# What gloo / NCCL / the TCP store say when a peer died or a collective timed out (torch 2.x
# raises plain RuntimeError for gloo, DistError subclasses for NCCL and the store).
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting|"
    r"Socket Timeout|NCCL (error|communicator was aborted)|ProcessGroup\w* (is )?(aborted|terminated)|"
    r"remote worker crash|Watchdog caught collective operation timeout",
    re.IGNORECASE,
)


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) means another rank died, hung or became unreachable."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        dist_error = getattr(tdist, "DistError", None)
        if dist_error is not None and isinstance(err, dist_error):
            return True
        if isinstance(err, RuntimeError) and _PEER_FAILURE.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


# --------------------------------------------------------------------------- collectives


def _device() -> torch.device:
    """gloo reduces CPU tensors, nccl only CUDA tensors."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def _all_reduce_scalar(x: float, dtype: torch.dtype, op) -> float:
    if _world() == 1:
        return x
    t = torch.tensor([x], dtype=dtype, device=_device())
    tdist.all_reduce(t, op=op)
    return t.item()


def all_reduce_max(x: int) -> int:
    """Maximum of an int over ranks, e.g. the number of latent passes every rank must run."""
    return int(_all_reduce_scalar(int(x), torch.int64, tdist.ReduceOp.MAX))


def all_reduce_sum(x: float) -> float:
    """Sum of a float over ranks (float64 so token counts stay exact)."""
    return float(_all_reduce_scalar(float(x), torch.float64, tdist.ReduceOp.SUM))


def all_reduce_mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor: a detached copy on the input's device.

    Floating inputs keep their dtype; integer inputs come back as float64 (a mean is not an int).
    """
    dtype = t.dtype if t.is_floating_point() else torch.float64
    world = _world()
    if world == 1:
        return t.detach().to(dtype=dtype, copy=True)
    buf = t.detach().to(_device(), dtype=dtype, copy=True)
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    buf /= world
    return buf.to(t.device)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (e.g. a run dir name chosen by rank 0)."""
    if _world() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _world() > 1:
        tdist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on at least one (e.g. a preemption signal seen by one rank)."""
    return all_reduce_max(1 if flag else 0) > 0
