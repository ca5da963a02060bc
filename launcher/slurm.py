"""What a Slurm allocation says about this process: nodes, node rank, tasks, GPUs, master address/port.

Why: every node must agree on the node list, its node rank and the master address/port without
talking to the others first. Slurm exports all of it; this module reads it, validates it, and
fails naming the variable rather than letting a wrong value become a rendezvous hang (every node
rank 0, or a master of ``localhost``). Everything is a pure function of a ``Mapping[str, str]``,
unit-tested on recorded environments. ``expand_nodelist`` reimplements ``scontrol show
hostnames`` because ``scontrol`` is often missing in containers, where the usual ``localhost``
fallback silently splits the job into one world per node.

Variables read (first one present wins):

- job id: ``SLURM_JOB_ID``, ``SLURM_JOBID``; it survives a requeue, which keeps the port stable.
- nodes: ``SLURM_JOB_NODELIST``, ``SLURM_NODELIST``; checked against ``SLURM_JOB_NUM_NODES`` /
  ``SLURM_NNODES`` when present.
- node rank: ``SLURM_NODEID``; else the index of ``SLURMD_NODENAME`` in the node list; else 0 for
  a one-node job (a multi-node job with neither is an error, never a silent 0).
- tasks per node: ``SLURM_STEP_TASKS_PER_NODE`` (inside ``srun``, the step's layout),
  ``SLURM_TASKS_PER_NODE`` (``2(x3),1``), ``SLURM_NTASKS_PER_NODE`` (one number for every node),
  else 1 per node.
- GPUs on this node: ``SLURM_GPUS_ON_NODE``, ``SLURM_GPUS_PER_NODE`` (``4``, ``gpu:4``,
  ``a100:8``, ``gpu:a100:4``), the number of entries of ``CUDA_VISIBLE_DEVICES``, else 0.
- ``SLURM_RESTART_COUNT`` (default 0), ``SLURM_CPUS_PER_TASK`` (default 1).

A training rank's own place (``SLURM_PROCID`` and friends) is not read here: that is
``ltscale.launch_env``, the one reader of launch variables, whose task-count parser this reuses.
"""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product

from ltscale.launch_env import parse_int, parse_tasks_per_node

__all__ = [
    "MAX_HOSTS",
    "SlurmContext",
    "expand_nodelist",
    "master_addr",
    "master_port",
    "parse_gpu_count",
    "parse_tasks_per_node",
    "slurm_context",
]

MAX_HOSTS = 65536
"""Upper bound on an expanded host list (Slurm's own per-range limit): a typo such as
``n[0-99999999]`` must be an error, not a 100-million-element list."""

_HOST_CHARS = frozenset(string.ascii_letters + string.digits + "-._")
_SEPARATORS = frozenset(", \t\n")
_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")
_GPU_SUFFIX_RE = re.compile(r"\([^()]*\)$")  # "gpu:4(IDX:0-3)" as printed in some TRES strings


# --------------------------------------------------------------------------- host lists


def _malformed(spec: str, what: str, pos: int) -> ValueError:
    return ValueError(f"malformed Slurm hostlist {spec!r}: {what} at position {pos}")


def _split_top_level(spec: str) -> list[tuple[int, str]]:
    """(start, token) pairs split at commas/whitespace outside brackets; checks bracket balance."""
    tokens: list[tuple[int, str]] = []
    start = 0
    open_at = -1
    for i, ch in enumerate(spec):
        if ch == "[":
            if open_at >= 0:
                raise _malformed(spec, "nested '['", i)
            open_at = i
        elif ch == "]":
            if open_at < 0:
                raise _malformed(spec, "unmatched ']'", i)
            open_at = -1
        elif ch in _SEPARATORS and open_at < 0:
            if i > start:
                tokens.append((start, spec[start:i]))
            start = i + 1
    if open_at >= 0:
        raise _malformed(spec, "unclosed '['", open_at)
    if len(spec) > start:
        tokens.append((start, spec[start:]))
    return tokens


def _parse_ranges(spec: str, body: str, pos: int) -> list[str]:
    """Expand the inside of one ``[...]`` (``01-04,07``); ``pos`` is where ``body`` starts in ``spec``.

    Zero padding follows Slurm: the width is the length of the lower bound as written, so
    ``[08-10]`` gives ``08 09 10`` and ``[8-10]`` gives ``8 9 10``.
    """
    out: list[str] = []
    offset = 0
    for piece in body.split(","):
        m = _RANGE_RE.fullmatch(piece)
        if not m:
            raise _malformed(spec, f"bad range {piece!r} (expected N or N-M)", pos + offset)
        lo_s, hi_s = m.group(1), m.group(2)
        lo = int(lo_s)
        hi = int(hi_s) if hi_s is not None else lo
        if hi < lo:
            raise _malformed(spec, f"decreasing range {piece!r}", pos + offset)
        if hi - lo + 1 > MAX_HOSTS:
            raise _malformed(spec, f"range {piece!r} has more than {MAX_HOSTS} hosts", pos + offset)
        out.extend(f"{n:0{len(lo_s)}d}" for n in range(lo, hi + 1))
        offset += len(piece) + 1
    return out


def _expand_token(spec: str, start: int, token: str) -> list[str]:
    """One comma-free host expression, e.g. ``rack[1-2]-n[01-02]``: cartesian product, Slurm order.

    Slurm expands the first bracket outermost (``rack1-n01 rack1-n02 rack2-n01 ...``), which is
    exactly the order of ``itertools.product``.
    """
    parts: list[list[str]] = []
    i = 0
    while i < len(token):
        if token[i] == "[":
            close = token.index("]", i)  # balance was checked by _split_top_level
            parts.append(_parse_ranges(spec, token[i + 1 : close], start + i + 1))
            i = close + 1
            continue
        j = i
        while j < len(token) and token[j] != "[":
            if token[j] not in _HOST_CHARS:
                raise _malformed(spec, f"unexpected character {token[j]!r}", start + j)
            j += 1
        parts.append([token[i:j]])
        i = j
    total = 1
    for p in parts:
        total *= len(p)
    if total > MAX_HOSTS:
        raise _malformed(spec, f"expression expands to more than {MAX_HOSTS} hosts", start)
    return ["".join(combo) for combo in product(*parts)]


def expand_nodelist(spec: str) -> list[str]:
    """Expand a Slurm hostlist like ``scontrol show hostnames`` does, in the same order.

    ``gpu[01-04,07]`` -> gpu01 gpu02 gpu03 gpu04 gpu07; ``a[1-2],b3`` -> a1 a2 b3;
    ``node[001-003]-ib``; ``rack[1-2]-n[1-2]`` -> rack1-n1 rack1-n2 rack2-n1 rack2-n2. Commas
    and whitespace separate hosts outside brackets; empty items are skipped as Slurm does.
    Duplicates are kept (``scontrol`` keeps them too); ``slurm_context`` rejects them.

    Raises ValueError naming the spec and the 0-based position of the first problem.
    """
    hosts: list[str] = []
    for start, token in _split_top_level(spec):
        hosts.extend(_expand_token(spec, start, token))
        if len(hosts) > MAX_HOSTS:
            raise _malformed(spec, f"more than {MAX_HOSTS} hosts", start)
    if not hosts:
        raise ValueError(f"malformed Slurm hostlist {spec!r}: no host names")
    return hosts


# --------------------------------------------------------------------------- small parsers


def parse_gpu_count(spec: str, *, var: str = "SLURM_GPUS_PER_NODE") -> int:
    """GPUs from a Slurm GPU string: ``4``, ``gpu:4``, ``a100:8``, ``gpu:a100:4``, ``gpu:4(IDX:0-3)``.

    A comma-separated list of typed counts (``a100:2,v100:1``) is summed. The count is always
    the last ``:`` field; the fields before it are names and must be non-empty.
    """
    total = 0
    for item in spec.strip().split(","):
        fields = _GPU_SUFFIX_RE.sub("", item.strip()).removeprefix("gres/").split(":")
        count = fields[-1]
        if not count.isdigit() or any(not f for f in fields[:-1]):
            raise ValueError(
                f"{var}={spec!r}: cannot read a GPU count from {item!r} "
                "(expected [type:]count such as '4', 'gpu:4', 'a100:8' or 'gpu:a100:4')"
            )
        total += int(count)
    return total


def _visible_device_count(value: str) -> int:
    """Entries in CUDA_VISIBLE_DEVICES; '' and Slurm's 'NoDevFiles' mean none, '-1' ends the list."""
    items = [v.strip() for v in value.split(",")]
    return next((i for i, v in enumerate(items) if v in ("", "NoDevFiles", "-1")), len(items))


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """(name, value) of the first variable that is set and non-empty."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _optional_int(env: Mapping[str, str], var: str, default: int | None, *, minimum: int = 0) -> int | None:
    found = _first(env, var)
    return default if found is None else parse_int(var, found[1], minimum=minimum)


# --------------------------------------------------------------------------- the context


@dataclass(frozen=True)
class SlurmContext:
    """This process's place in a Slurm job, validated so that a launch command built from it is consistent.

    ``nodes`` and ``tasks_per_node`` are tuples (lists are converted) so the context stays
    immutable and hashable; ``tasks_per_node[i]`` is the task count on ``nodes[i]``.
    """

    job_id: str
    nodes: tuple[str, ...]
    node_rank: int
    num_nodes: int
    tasks_per_node: tuple[int, ...]
    gpus_per_node: int
    restart_count: int = 0
    cpus_per_task: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "tasks_per_node", tuple(self.tasks_per_node))
        if self.num_nodes != len(self.nodes) or self.num_nodes < 1:
            raise ValueError(f"num_nodes={self.num_nodes} but the node list has {len(self.nodes)} hosts")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node_rank={self.node_rank} is outside [0, {self.num_nodes})")
        if len(self.tasks_per_node) != self.num_nodes:
            raise ValueError(
                f"tasks_per_node has {len(self.tasks_per_node)} entries for {self.num_nodes} nodes"
            )
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} is negative")

    @property
    def hostname(self) -> str:
        """This node's name in the job's node list."""
        return self.nodes[self.node_rank]

    @property
    def local_tasks(self) -> int:
        """Tasks Slurm placed on this node (the local world size under plain ``srun``)."""
        return self.tasks_per_node[self.node_rank]

    @property
    def num_tasks(self) -> int:
        """Tasks in the job/step (the world size under plain ``srun``)."""
        return sum(self.tasks_per_node)


def _node_rank(env: Mapping[str, str], nodes: list[str]) -> int:
    """SLURM_NODEID, else our position by SLURMD_NODENAME, else 0 only when there is one node.

    Defaulting to 0 on a multi-node job is the classic hang (every node thinks it is the master
    node), so that case is an error.
    """
    found = _first(env, "SLURM_NODEID")
    if found is not None:
        rank = parse_int(*found)
        if rank >= len(nodes):
            raise ValueError(f"SLURM_NODEID={rank} but the job has only {len(nodes)} nodes")
        return rank
    found = _first(env, "SLURMD_NODENAME")
    if found is not None and found[1] in nodes:
        return nodes.index(found[1])
    if len(nodes) == 1:
        return 0
    raise KeyError(
        f"SLURM_NODEID is not set and SLURMD_NODENAME does not name one of the {len(nodes)} nodes: "
        "run this on each node inside `srun` (not once in the batch shell)"
    )


def _tasks_per_node(env: Mapping[str, str], num_nodes: int) -> list[int]:
    found = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if found is not None:
        var, value = found
        tasks = parse_tasks_per_node(value, var=var)
        if len(tasks) != num_nodes:
            raise ValueError(
                f"{var}={value!r} describes {len(tasks)} nodes but SLURM_JOB_NODELIST has {num_nodes} "
                "(a job step on a subset of the allocation is not supported)"
            )
        return tasks
    per_node = _optional_int(env, "SLURM_NTASKS_PER_NODE", 1, minimum=1)
    return [per_node or 1] * num_nodes


def _gpus_per_node(env: Mapping[str, str]) -> int:
    found = _first(env, "SLURM_GPUS_ON_NODE")
    if found is not None:
        return parse_int(*found)
    found = _first(env, "SLURM_GPUS_PER_NODE")
    if found is not None:
        return parse_gpu_count(found[1], var=found[0])
    if "CUDA_VISIBLE_DEVICES" in env:
        return _visible_device_count(env["CUDA_VISIBLE_DEVICES"])
    return 0


def slurm_context(env: Mapping[str, str]) -> SlurmContext:
    """Read and cross-check the Slurm variables in ``env`` (see the module docstring for the list).

    Raises KeyError when something required is missing and ValueError when something is
    malformed or inconsistent; both name the variable.
    """
    found = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if found is None:
        raise KeyError("SLURM_JOB_ID is not set: not inside a Slurm allocation (sbatch/salloc/srun)")
    job_id = found[1]
    found = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if found is None:
        raise KeyError(f"SLURM_JOB_NODELIST is not set (job {job_id}): cannot tell which nodes the job has")
    try:
        nodes = expand_nodelist(found[1])
    except ValueError as e:
        raise ValueError(f"{found[0]}: {e}") from None
    dupes = sorted({n for n in nodes if nodes.count(n) > 1})
    if dupes:
        raise ValueError(f"{found[0]}={found[1]!r} names {', '.join(dupes)} more than once")
    declared = _first(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    if declared is not None and parse_int(*declared) != len(nodes):
        raise ValueError(f"{declared[0]}={declared[1]} but {found[0]}={found[1]!r} has {len(nodes)} hosts")
    return SlurmContext(
        job_id=job_id,
        nodes=tuple(nodes),
        node_rank=_node_rank(env, nodes),
        num_nodes=len(nodes),
        tasks_per_node=tuple(_tasks_per_node(env, len(nodes))),
        gpus_per_node=_gpus_per_node(env),
        restart_count=_optional_int(env, "SLURM_RESTART_COUNT", 0) or 0,
        cpus_per_task=_optional_int(env, "SLURM_CPUS_PER_TASK", 1, minimum=1) or 1,
    )


# --------------------------------------------------------------------------- rendezvous


def master_addr(ctx: SlurmContext) -> str:
    """The first node of the allocation: where the batch script runs and SLURM_NODEID is 0.

    Every node computes the same answer from the same SLURM_JOB_NODELIST, with no ``scontrol``.
    """
    return ctx.nodes[0]


def master_port(job_id: str | int, base: int = 29500, span: int = 1000) -> int:
    """A port in ``[base, base + span)`` that depends only on the job id.

    Why deterministic: every node must pick the same port without communicating, and a requeued
    job keeps its id, so it gets the same port again. Why per job: two jobs sharing a node must
    not both bind 29500. A numeric id maps to ``base + id % span``, so consecutive job ids (the
    likely neighbours on a node) never collide; other ids (``123+0`` for heterogeneous jobs) use
    CRC-32, which unlike ``hash()`` is the same in every process. The default range stays below
    Linux's ephemeral ports (32768+), so the OS does not hand the port to an outgoing connection.
    """
    if span < 1:
        raise ValueError(f"port span must be >= 1, got {span}")
    if base < 1024 or base + span - 1 > 65535:
        raise ValueError(f"port range [{base}, {base + span}) must lie within [1024, 65536)")
    key = str(job_id).strip()
    if not key:
        raise ValueError("job id is empty; cannot derive a master port")
    offset = int(key) % span if key.isdigit() else zlib.crc32(key.encode()) % span
    return base + offset
