"""Per-node launch commands, DeepSpeed hostfiles and ``srun`` rank environments from a ``SlurmContext``.

Why pure functions returning argv lists: the Slurm scripts only have to run what these return,
and the unit tests can compare exact command lines for recorded environments (node rank, master,
port) instead of discovering a wrong ``--node_rank`` as a multi-node hang.

Three ways to start ltscale on a Slurm allocation, one ``srun`` task per node for the first two:

- ``deepspeed_command``: ``deepspeed --hostfile H --no_ssh --node_rank R --master_addr A
  --master_port P --num_nodes N --num_gpus G script ...`` on every node.
- ``torchrun_command``: ``torchrun --nnodes N --node_rank R --nproc_per_node G --master_addr A
  --master_port P script ...`` (static), or the c10d rendezvous variant.
- ``rendezvous_env``: no launcher at all; ``srun`` starts one task per GPU and every task reads
  its rank from ``SLURM_PROCID``/``SLURM_LOCALID`` itself (``ltscale.launch_env``); this gives the
  MASTER_ADDR/MASTER_PORT that every task needs and no task can guess, the same on every node.

DeepSpeed 0.19.8 facts behind ``deepspeed_command``, read in ``deepspeed/launcher/runner.py``
and ``launch.py``:

1. Spelling: ``--hostfile`` (``-H``), ``--no_ssh``, ``--node_rank``, ``--master_addr``,
   ``--master_port``, ``--num_nodes``, ``--num_gpus`` (alias ``--num_accelerators``): underscores
   only, no dashed aliases (torchrun accepts both). Defaults: node_rank -1, master_addr "",
   master_port 29500, num_nodes/num_gpus -1 (= all), hostfile ``/job/hostfile``.
2. ``--no_ssh`` asserts ``0 <= node_rank < number of hosts``, so ``--node_rank`` is mandatory.
   With it the runner neither checks ssh reachability nor runs ``ssh <host> hostname -I`` (we
   always give ``--master_addr``); it starts ``python -u -m deepspeed.launcher.launch
   --world_info=... --master_addr --master_port --node_rank`` locally, i.e. a torchrun-like
   per-node launcher.
3. A hostfile is still required for more than one node. Without one (the default
   ``/job/hostfile`` is missing) the resource pool is ``{"localhost": device_count}``,
   ``master_addr`` is overwritten with 127.0.0.1, ``--num_nodes > 1`` raises "Num nodes is >1
   but no extra nodes available via hostfile" and any node rank >= 1 fails the assert above.
   The hostfile must be the same on every node: ``launch.py`` takes ``node_list[node_rank]`` as
   "this node" (host names are not compared with the local hostname) and numbers global ranks
   by hostfile order, so node k's ranks start at the sum of the slots before it, which is why
   the hostfile follows SLURM_JOB_NODELIST order, the order of SLURM_NODEID.
4. ``--num_nodes``/``--num_gpus`` trim the hostfile to its first N hosts and slots [0, G) each
   (``apply_num_nodes_and_gpus``); passing both makes the world independent of the slot counts
   written in the file. They cannot be combined with ``--include``/``--exclude``.
5. ``launch.py`` sets each worker's CUDA_VISIBLE_DEVICES to the chosen slot ids (0..G-1); with a
   hostfile, an inherited CUDA_VISIBLE_DEVICES is ignored. On a shared node where Slurm hands
   out e.g. GPUs 4-7 without cgroup device isolation, DeepSpeed would use 0-3:
   ``visible_devices_warning`` detects that case.
6. Workers get ``--local_rank=N`` appended (``ltscale/train.py`` accepts it). ``.deepspeed_env``
   and NCCL*/PYTHON* forwarding belong to the ssh/MPI runners only; under ``--no_ssh`` each node
   simply inherits the environment ``srun`` gave it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from launcher.slurm import SlurmContext, master_addr, master_port

__all__ = [
    "deepspeed_command",
    "hostfile",
    "rendezvous_env",
    "resolve_nproc",
    "torchrun_command",
    "visible_devices_warning",
]

RENDEZVOUS = ("static", "c10d")


def resolve_nproc(ctx: SlurmContext, nproc_per_node: int | None = None) -> int:
    """Workers per node: the explicit value, else the GPUs Slurm gave this node.

    A CPU-only allocation (no GPU variables, e.g. the local CI cluster) has no natural count, so
    it must be given explicitly rather than silently becoming 0 or the number of CPUs.
    """
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
        return nproc_per_node
    if ctx.gpus_per_node > 0:
        return ctx.gpus_per_node
    raise ValueError(
        "no GPUs found on this node (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE and "
        "CUDA_VISIBLE_DEVICES are unset or empty): give the number of processes per node explicitly"
    )


def _rendezvous(ctx: SlurmContext, addr: str | None, port: int | None) -> tuple[str, int]:
    """Master from the job unless overridden; an override may be loopback on purpose (simulated
    nodes of a one-host test cluster do not resolve), so it is not second-guessed here."""
    a = addr if addr else master_addr(ctx)
    p = port if port is not None else master_port(ctx.job_id)
    if not 0 < p < 65536:
        raise ValueError(f"master port {p} is not a valid TCP port")
    return a, p


def hostfile(ctx: SlurmContext, slots: int | None = None) -> str:
    """DeepSpeed hostfile text, one ``host slots=N`` line per node in SLURM_JOB_NODELIST order.

    ``slots`` defaults to this node's GPU count; Slurm allocations are homogeneous per job in
    the common case and DeepSpeed's ``--num_gpus`` overrides the count anyway.
    """
    n = resolve_nproc(ctx, slots)
    return "".join(f"{host} slots={n}\n" for host in ctx.nodes)


def deepspeed_command(
    ctx: SlurmContext,
    script: str,
    script_args: Sequence[str] = (),
    *,
    hostfile_path: str | None = None,
    nproc_per_node: int | None = None,
    python: str | None = None,
    addr: str | None = None,
    port: int | None = None,
) -> list[str]:
    """This node's ``deepspeed --no_ssh`` command (see the module docstring for why each flag).

    ``hostfile_path`` must name a file with ``hostfile(ctx)``'s content, readable on every node;
    it is required for more than one node. ``python`` runs the runner as ``python -m
    deepspeed.launcher.runner`` instead of the ``deepspeed`` script, for compute nodes whose PATH
    lacks the venv. ``addr``/``port`` override the master derived from the job (e.g. 127.0.0.1 on
    a one-host test cluster whose node names do not resolve).
    """
    if ctx.num_nodes > 1 and not hostfile_path:
        raise ValueError(
            f"deepspeed --no_ssh needs a hostfile for {ctx.num_nodes} nodes (without one it runs "
            "single-node on 127.0.0.1); write hostfile(ctx) to a shared path and pass hostfile_path"
        )
    a, p = _rendezvous(ctx, addr, port)
    cmd = [python, "-m", "deepspeed.launcher.runner"] if python else ["deepspeed"]
    if hostfile_path:
        cmd += ["--hostfile", hostfile_path]
    cmd += [
        "--no_ssh",
        "--node_rank", str(ctx.node_rank),
        "--master_addr", a,
        "--master_port", str(p),
        "--num_nodes", str(ctx.num_nodes),
        "--num_gpus", str(resolve_nproc(ctx, nproc_per_node)),
    ]  # fmt: skip
    return [*cmd, script, *script_args]


def torchrun_command(
    ctx: SlurmContext,
    script: str,
    script_args: Sequence[str] = (),
    *,
    nproc_per_node: int | None = None,
    rendezvous: str = "static",
    python: str | None = None,
    addr: str | None = None,
    port: int | None = None,
) -> list[str]:
    """This node's ``torchrun`` command.

    ``static``: ``--node_rank`` from SLURM_NODEID and ``--master_addr/--master_port``; global rank
    0 is guaranteed to live on the first node. ``c10d``: ``--rdzv_backend c10d --rdzv_endpoint
    A:P --rdzv_id JOB`` and no node rank, because the rendezvous assigns ranks itself (so rank 0
    is not necessarily on the endpoint host; pytorch/pytorch#137402). ``python`` runs
    ``python -m torch.distributed.run`` instead of the ``torchrun`` script.
    """
    if rendezvous not in RENDEZVOUS:
        raise ValueError(f"rendezvous must be one of {RENDEZVOUS}, got {rendezvous!r}")
    a, p = _rendezvous(ctx, addr, port)
    cmd = [python, "-m", "torch.distributed.run"] if python else ["torchrun"]
    cmd += ["--nnodes", str(ctx.num_nodes)]
    if rendezvous == "static":
        cmd += ["--node_rank", str(ctx.node_rank)]
    cmd += ["--nproc_per_node", str(resolve_nproc(ctx, nproc_per_node))]
    if rendezvous == "static":
        cmd += ["--master_addr", a, "--master_port", str(p)]
    else:
        host = f"[{a}]" if ":" in a else a  # IPv6 literal
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{host}:{p}", "--rdzv_id", str(ctx.job_id)]
    return [*cmd, script, *script_args]


def rendezvous_env(ctx: SlurmContext, *, addr: str | None = None, port: int | None = None) -> dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for ``srun --ntasks-per-node=G python ltscale/train.py`` with no launcher.

    The same for every task, so it can be computed once in the batch shell and exported. Give every
    task all of the node's GPUs (``--gpus-per-node``, not ``--gpus-per-task`` binding), since the
    trainer selects ``cuda:LOCAL_RANK``.
    """
    a, p = _rendezvous(ctx, addr, port)
    return {"MASTER_ADDR": a, "MASTER_PORT": str(p)}


def visible_devices_warning(env: Mapping[str, str], nproc: int) -> str | None:
    """A warning when DeepSpeed's CUDA_VISIBLE_DEVICES=0..nproc-1 differs from what Slurm set.

    With a hostfile DeepSpeed ignores the inherited CUDA_VISIBLE_DEVICES (fact 5 in the module
    docstring); if Slurm assigned other ids (4,5,6,7) and the devices are not cgroup-isolated,
    the job would run on someone else's GPUs. Returns None when nothing looks wrong.
    """
    value = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not value or value == "NoDevFiles":
        return None
    ids = [v.strip() for v in value.split(",")]
    expected = [str(i) for i in range(nproc)]
    if ids[:nproc] == expected:
        return None
    return (
        f"CUDA_VISIBLE_DEVICES={value} but deepspeed will set CUDA_VISIBLE_DEVICES={','.join(expected)} "
        "for its workers; that is only right if Slurm isolates devices with cgroups (ConstrainDevices=yes)"
    )
