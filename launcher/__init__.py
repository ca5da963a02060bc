"""Slurm -> launch command glue for ltscale: pure functions, no torch/deepspeed imports.

Why a separate package: the batch scripts need node lists, node ranks, a per-job master port and
``deepspeed``/``torchrun`` command lines before any Python training process exists, and this
logic must be unit-testable on recorded Slurm environments. ``python -m launcher`` exposes it to
shell scripts (see ``launcher/__main__.py``).
"""

from launcher.commands import (
    deepspeed_command,
    hostfile,
    rendezvous_env,
    resolve_nproc,
    torchrun_command,
    visible_devices_warning,
)
from launcher.slurm import (
    SlurmContext,
    expand_nodelist,
    master_addr,
    master_port,
    parse_gpu_count,
    parse_tasks_per_node,
    slurm_context,
)

__all__ = [
    "SlurmContext",
    "deepspeed_command",
    "expand_nodelist",
    "hostfile",
    "master_addr",
    "master_port",
    "parse_gpu_count",
    "parse_tasks_per_node",
    "rendezvous_env",
    "resolve_nproc",
    "slurm_context",
    "torchrun_command",
    "visible_devices_warning",
]
