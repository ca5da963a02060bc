"""Training entry point (thin): ``deepspeed ltscale/train.py --config X [--stage 1|2|3|all] [key=value ...]``.

Also runs under ``torchrun`` and ``mpirun -np N python ltscale/train.py``; without ``--config``
it runs the embedded tiny default (configs/tiny.yaml).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script by a launcher: make `import ltscale` work from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config YAML (default: configs/tiny.yaml)")
    p.add_argument("--stage", default="all", help="1, 2, 3 ... or 'all' (default)")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides, e.g. train.micro_batch_size=4 stages.2.alpha=0.5",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ltscale.config import ConfigError
    from ltscale.logging_setup import setup_logging
    from ltscale.run_config import load_config

    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"ltscale: config error: {err}", file=sys.stderr)
        return 2
    from ltscale.data import DataError
    from ltscale.engine.checkpoint import CheckpointCorruptError
    from ltscale.engine.dist import is_collective_failure
    from ltscale.launch_env import rank_label
    from ltscale.trainer import Preempted, StageOrderError, TooManySkippedSteps, train

    rank = rank_label()
    try:
        train(cfg, args.stage)
    except Preempted as stop:
        # 143 = 128 + SIGTERM: what a job killed by the signal would report; the Slurm scripts
        # requeue on it. The checkpoint is complete, so a re-launch continues exactly.
        print(f"ltscale: {stop}", file=sys.stderr)
        return 143
    except (DataError, StageOrderError, FileNotFoundError, ValueError, CheckpointCorruptError) as err:
        return _fail(rank, err, 2)
    except TooManySkippedSteps as err:
        return _fail(rank, err, 3)
    except Exception as err:
        if not is_collective_failure(err):
            raise
        # Another rank died or hung: say so in one line instead of a gloo/NCCL traceback, and
        # leave without touching the broken process group (that could block again).
        return _fail(
            rank,
            f"lost contact with another rank ({type(err).__name__}: {err}); the job is "
            "resumable from its latest checkpoint - relaunch it",
            EXIT_RANK_FAILURE,
        )
    return 0


EXIT_RANK_FAILURE = 4


def _fail(rank: str, err: object, code: int) -> int:
    logging.getLogger("ltscale").error("rank %s: %s", rank, err)
    print(f"ltscale: error (rank {rank}): {err}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    code = main()
    if code in (2, 3, 4):
        # Error exits leave without interpreter teardown: a gloo group destroyed while a peer is
        # failing too can abort the rank ("terminate called without an active exception", exit
        # 134) and hide the code. The message is printed and the logs are flushed first.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
