"""The only ltscale package that touches deepspeed / torch.distributed.

Importing it is cheap: deepspeed is imported lazily, on the first call that needs it.
"""

from .checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from .checkpoint_dir import latest_tag, list_checkpoints
from .dist import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean_tensor,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    dist_info,
    init_distributed,
    shutdown_distributed,
)
from .ds_config import render_ds_config, resolve_template, write_ds_config
from .engine import build_engine, full_grad, gather_state_dict, grad_norm

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_mean_tensor",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "build_engine",
    "dist_info",
    "full_grad",
    "gather_state_dict",
    "grad_norm",
    "init_distributed",
    "latest_tag",
    "list_checkpoints",
    "load_checkpoint",
    "render_ds_config",
    "resolve_template",
    "save_checkpoint",
    "shutdown_distributed",
    "write_ds_config",
    "write_json_atomic",
]
