"""Test-only start-up hook (on PYTHONPATH of some Slurm jobs in tests/slurm), active in the training
ranks of a job's first start only (``SLURM_RESTART_COUNT`` 0), so the requeued start runs clean:

* ``LTSCALE_TEST_STEP_SLEEP=S`` slows each optimizer step by S seconds. Why: the real-time-limit
  test needs Slurm's ``--signal=B:USR1@lead`` to land mid-stage, and Slurm cannot give a limit under
  one minute, while the tiny stage trains in seconds. Sleeping outside the computation leaves every
  number unchanged, so the uninterrupted pipeline run stays the reference.
* ``LTSCALE_TEST_FIRST_FAULT=SPEC`` becomes ``LTSCALE_FAULT`` (ltscale/faults.py), e.g. one rank
  killed mid-stage; a plain ``LTSCALE_FAULT`` would fire again after every requeue.
"""

import os

if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" and "RANK" in os.environ:
    _delay = float(os.environ.get("LTSCALE_TEST_STEP_SLEEP", "0") or 0)
    if _delay > 0:
        import time

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: time.sleep(_delay))
    if os.environ.get("LTSCALE_TEST_FIRST_FAULT"):
        os.environ["LTSCALE_FAULT"] = os.environ["LTSCALE_TEST_FIRST_FAULT"]
