"""Where this process sits in a multi-process launch, read from the environment the launcher left.

Why one module: the trainer, the logging set-up, ``ltscale eval`` and the exit messages all need
"which rank am I, how many are there", and every launcher answers in its own variables. Read in
several places, the answers drift (a reader that knows torchrun but not ``srun``, or one that takes
the PMI variables an ``MpiDefault=pmi2`` site exports for stale ones). This module is the only
reader; it is pure (no torch, no side effects), so ``launcher/`` and fast unit tests use it too.

Launchers and what they export (innermost launcher first, which is the order of precedence):

* ``torchrun`` / ``deepspeed`` (and ltscale's own scripts): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  plus ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE`` (deepspeed's ``launch.py``);
* Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``;
* PMI / PMI2: ``PMI_RANK``, ``PMI_SIZE``, from MPICH/Intel MPI's ``mpiexec`` (with
  ``MPI_LOCALRANKID``/``MPI_LOCALNRANKS``) or from ``srun`` on a site with ``MpiDefault=pmi2``
  (then equal to ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``, and the local rank is ``SLURM_LOCALID``);
* an ``srun`` job step: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``,
  ``SLURM_NODEID``, ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``), ``SLURM_STEP_NUM_NODES``. A batch
  step (the job script itself) exports ``SLURM_PROCID=0`` but no ``SLURM_STEP_*``: one process.

Nesting is normal: ltscale's Slurm jobs run one ``srun`` task per node, and that task's
``deepspeed`` starts the node's ranks, so a rank sees the srun variables of its node's launcher
(task = node index, size = node count) next to its own ``RANK``/``WORLD_SIZE``. That is accepted
when the outer launcher put one task on this node and ``WORLD_SIZE`` is a multiple of its size.
Any other disagreement means ``RANK``/``WORLD_SIZE`` were inherited from an earlier launch (every
rank would claim the same rank and the rendezvous would hang), and is an error naming both sides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "SOURCES",
    "LaunchEnvError",
    "RankEnv",
    "parse_int",
    "parse_tasks_per_node",
    "rank_env",
    "rank_label",
]

SOURCES = ("env", "openmpi", "pmi", "srun", "single")
"""``RankEnv.source`` values: torch-style variables (torchrun, deepspeed, ltscale's scripts), Open
MPI, PMI/PMI2, an ``srun`` step of several tasks, or a single process."""

_TASKS_RE = re.compile(r"(\d+)(?:\(x(\d+)\))?")


class LaunchEnvError(ValueError):
    """The launch variables are missing, malformed or contradict each other; the message names them."""


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the launch.

    ``local_world_size`` is the number of ranks on this node, None when the launcher does not say
    (plain ``RANK``/``WORLD_SIZE`` without ``LOCAL_WORLD_SIZE``); ``source`` is one of ``SOURCES``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    source: str

    @property
    def spans_nodes(self) -> bool | None:
        """Whether the ranks live on more than one node (None: the launcher does not say)."""
        if self.local_world_size is None:
            return None
        return self.local_world_size < self.world_size


def parse_tasks_per_node(spec: str, *, var: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's compressed per-node task counts: ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.strip().split(","):
        m = _TASKS_RE.fullmatch(item.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(f"{var}={spec!r}: bad item {item!r}, expected N or N(xK) as in '2(x3),1'")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# --------------------------------------------------------------------------- small readers


def parse_int(var: str, value: str, *, minimum: int = 0) -> int:
    """Variable ``var``'s ``value`` as an integer >= ``minimum``; LaunchEnvError naming both if not."""
    try:
        n = int(value)
    except ValueError:
        raise LaunchEnvError(f"{var}={value!r} is not an integer") from None
    if n < minimum:
        raise LaunchEnvError(f"{var}={value!r} must be >= {minimum}")
    return n


def _int(env: Mapping[str, str], var: str, *, minimum: int = 0) -> int:
    return parse_int(var, env[var], minimum=minimum)


def _opt(env: Mapping[str, str], var: str, *, minimum: int = 0) -> int | None:
    return _int(env, var, minimum=minimum) if _has(env, var) else None


def _has(env: Mapping[str, str], *names: str) -> bool:
    return all(env.get(n, "").strip() for n in names)


@dataclass(frozen=True)
class _Layout:
    """One launcher's view; ``local`` is None when it does not say (``why_no_local`` explains)."""

    source: str
    names: str
    rank: int
    world: int
    local: int | None
    local_world: int | None
    why_no_local: str = ""

    def resolve(self) -> RankEnv:
        if self.world == 1:
            return RankEnv(0, 1, 0, 1, "single")
        if self.local is None:
            raise LaunchEnvError(self.why_no_local)
        return _checked(self.rank, self.world, self.local, self.local_world, self.source, self.names)


def _checked(rank: int, world: int, local: int, local_world: int | None, source: str, names: str) -> RankEnv:
    """A RankEnv whose numbers are consistent; ``names`` says which variables they came from."""
    if rank >= world:
        raise LaunchEnvError(f"{names}: rank {rank} is not below the world size {world}")
    if local_world is not None and not (local < local_world <= world):
        raise LaunchEnvError(
            f"{names}: local rank {local} and {local_world} ranks on this node do not fit a world of {world}"
        )
    return RankEnv(rank, world, local, local_world, source)


def _srun_step(env: Mapping[str, str]) -> _Layout | None:
    """The srun step's layout (any task count), or None outside a step (batch step, no Slurm)."""
    if not _has(env, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        return None
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS", minimum=1)
    local_world = None
    if _has(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"):
        var = "SLURM_STEP_TASKS_PER_NODE"
        try:
            tasks = parse_tasks_per_node(env[var], var=var)
        except ValueError as err:
            raise LaunchEnvError(str(err)) from None
        node = _int(env, "SLURM_NODEID")
        if node >= len(tasks) or sum(tasks) != world:
            raise LaunchEnvError(
                f"{var}={env[var]!r} does not fit SLURM_NODEID={node} and SLURM_STEP_NUM_TASKS={world}"
            )
        local_world = tasks[node]
    elif _opt(env, "SLURM_STEP_NUM_NODES", minimum=1) == 1:
        local_world = world
    return _Layout("srun", "SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID", rank, world,
                   _opt(env, "SLURM_LOCALID"), local_world,
                   "SLURM_PROCID/SLURM_STEP_NUM_TASKS are set but SLURM_LOCALID is not")  # fmt: skip


def _openmpi(env: Mapping[str, str]) -> _Layout | None:
    if not _has(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        return None
    return _Layout(
        "openmpi",
        "OMPI_COMM_WORLD_*",
        _int(env, "OMPI_COMM_WORLD_RANK"),
        _int(env, "OMPI_COMM_WORLD_SIZE", minimum=1),
        _opt(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
        _opt(env, "OMPI_COMM_WORLD_LOCAL_SIZE", minimum=1),
        "OMPI_COMM_WORLD_RANK/SIZE are set but OMPI_COMM_WORLD_LOCAL_RANK is not",
    )


def _pmi(env: Mapping[str, str], step: _Layout | None) -> _Layout | None:
    """PMI_RANK/PMI_SIZE; the local rank from MPICH's variables, else from srun when PMI is srun's."""
    if not _has(env, "PMI_RANK", "PMI_SIZE"):
        return None
    rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE", minimum=1)
    names = "PMI_RANK/PMI_SIZE"
    if _has(env, "MPI_LOCALRANKID", "MPI_LOCALNRANKS"):  # MPICH / Intel MPI mpiexec
        local, local_world = _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS", minimum=1)
        return _Layout("pmi", names + "/MPI_LOCALRANKID", rank, world, local, local_world)
    if step is not None and (step.rank, step.world) == (rank, world):
        # srun's own PMI plugin (MpiDefault=pmi2): the step's layout under a second name.
        return _Layout("pmi", names + "/SLURM_LOCALID", rank, world, step.local, step.local_world,
                       step.why_no_local)  # fmt: skip
    return _Layout("pmi", names, rank, world, None, None,
                   f"PMI_RANK={rank} PMI_SIZE={world} but neither MPI_LOCALRANKID/MPI_LOCALNRANKS (mpiexec) "
                   "nor a matching srun step (SLURM_PROCID/SLURM_LOCALID) says which rank of its node this is")  # fmt: skip


def _torch(env: Mapping[str, str]) -> tuple[int, int, int | None, int | None] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK (None if unset), local world size (None if unset)."""
    present = [k for k in ("RANK", "WORLD_SIZE") if _has(env, k)]
    if not present:
        return None
    if len(present) == 1:
        other = "WORLD_SIZE" if present[0] == "RANK" else "RANK"
        raise LaunchEnvError(
            f"environment has {present[0]}={env[present[0]]!r} but no {other}; launch with "
            f"torchrun/deepspeed/mpirun/srun or unset {present[0]}"
        )
    local_world = _opt(env, "LOCAL_WORLD_SIZE", minimum=1)
    if local_world is None:
        local_world = _opt(env, "LOCAL_SIZE", minimum=1)
    return _int(env, "RANK"), _int(env, "WORLD_SIZE", minimum=1), _opt(env, "LOCAL_RANK"), local_world


# --------------------------------------------------------------------------- the one entry point


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """This process's rank, world size and local rank, from ``environ`` (default ``os.environ``).

    Raises LaunchEnvError, naming the variables, when they are missing, malformed or contradict
    each other.
    """
    env = os.environ if environ is None else environ
    step = _srun_step(env)
    outer = [lay for lay in (_openmpi(env), _pmi(env, step), step) if lay is not None]
    torch_vars = _torch(env)
    if torch_vars is None:
        return outer[0].resolve() if outer else RankEnv(0, 1, 0, 1, "single")

    rank, world, local, local_world = torch_vars
    for lay in outer:
        same = (lay.rank, lay.world) == (rank, world)
        per_node = lay.local_world == 1 and world % lay.world == 0
        if not (same or per_node):
            on_node = "?" if lay.local_world is None else lay.local_world
            raise LaunchEnvError(
                f"RANK={rank} WORLD_SIZE={world} contradict the {lay.source} launcher's rank {lay.rank} of "
                f"{lay.world} ({on_node} on this node, {lay.names}): stale variables inherited from another "
                "launch? unset RANK/WORLD_SIZE/LOCAL_RANK"
            )
        if same and local is None and lay.local is not None:
            local, local_world = lay.local, lay.local_world
    if local is None:
        if world > 1:
            raise LaunchEnvError(
                f"RANK={rank} WORLD_SIZE={world} but no LOCAL_RANK: every rank of a node would pick the "
                "same device; export LOCAL_RANK (torchrun and deepspeed do)"
            )
        local = 0
    return _checked(rank, world, local, local_world, "env", "RANK/WORLD_SIZE/LOCAL_RANK")


def rank_label(environ: Mapping[str, str] | None = None) -> str:
    """The global rank for log and error lines, ``"?"`` when the variables are bad.

    Why not raise: the callers are tagging a message, often the very error ``rank_env`` would
    raise; ``init_distributed`` is where a bad launch environment stops the run.
    """
    try:
        return str(rank_env(environ).rank)
    except LaunchEnvError:
        return "?"
