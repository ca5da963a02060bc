"""One logging setup for every entry point: rank-tagged lines, INFO on rank 0, WARNING elsewhere.

Rank 0 is the one a user reads; the other ranks still report problems.
"""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: int | None = None) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    logging.getLogger("ltscale").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # torch 2.13 warns on every DeepSpeed all_gather_into_tensor / reduce_scatter_tensor call.
    warnings.filterwarnings("ignore", category=FutureWarning)
