"""Test-only start-up hook (on PYTHONPATH of one Slurm job in tests/slurm): slows each optimizer
step of the job's first start by ``LTSCALE_TEST_STEP_SLEEP`` seconds.

Why: the real-time-limit test needs Slurm's ``--signal=B:USR1@lead`` to land mid-stage, and Slurm
cannot give a limit under one minute, while the tiny stage trains in seconds. Sleeping outside
the computation leaves every number unchanged, so the uninterrupted pipeline run stays the
reference; the requeued start runs at full speed.
"""

import os

_delay = float(os.environ.get("LTSCALE_TEST_STEP_SLEEP", "0") or 0)
if _delay > 0 and os.environ.get("SLURM_RESTART_COUNT", "0") == "0" and "RANK" in os.environ:
    import time

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: time.sleep(_delay))
