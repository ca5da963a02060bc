"""One logging setup for every entry point: rank-tagged lines, INFO on rank 0, WARNING elsewhere.

Rank 0 is the one a user reads; the other ranks still report problems.
"""

from __future__ import annotations

import logging
import sys
import warnings

from ltscale.launch_env import rank_label


def setup_logging(level: int | None = None) -> None:
    rank = rank_label()
    if level is None:  # a rank that cannot tell who it is logs everything
        level = logging.INFO if rank in ("0", "?") else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True, stream=sys.stderr)
    logging.getLogger("ltscale").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:  # "Loading weights" / "Writing model shards" bars on every stage export and eval load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    # torch 2.13 warns on every DeepSpeed all_gather_into_tensor / reduce_scatter_tensor call.
    warnings.filterwarnings("ignore", category=FutureWarning)
