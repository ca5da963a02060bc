"""``ltscale lm-eval ...`` and ``python -m ltscale.lmeval ...``: lm-eval's own CLI, plus ltscale.

lm-eval 0.4.x finds only the model classes its own package imports, so ``lm_eval --model ltscale``
cannot work; this entry point takes lm-eval's flags unchanged and, before running lm-eval's CLI:

* registers the ``ltscale`` model (``--model`` defaults to it here; ``--model hf`` etc. still work);
* writes ltscale's task files (``ltscale.lmeval.tasks``, data from ``$LTSCALE_DATA_DIR``) to
  ``$LTSCALE_LMEVAL_TASKS`` (default ``~/.cache/ltscale/lmeval_tasks``) and adds that directory to
  ``--include_path`` (next to the user's own, if given);
* for ``--model ltscale``: ``--batch_size`` defaults to ``ltscale eval``'s 16 rows in flight (lm-eval's
  default of 1 would decode one problem at a time), and with ``--output_path`` the per-sample latent
  steps go to ``<output_path>/ltscale_latents_<time>.jsonl`` (``latent_log=``).

Under ``torchrun`` each rank evaluates lm-eval's shard of every task and rank 0 gathers and writes,
as ``ltscale eval`` does. Errors in ltscale's model arguments or in a request's generation settings
are one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

__all__ = ["cmd_lm_eval", "main"]

EXIT_OK, EXIT_USAGE = 0, 2
_PROG = "ltscale lm-eval"


def _error(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _latent_log_path(output_path: str) -> Path:
    out = Path(output_path)
    stamp = datetime.now().isoformat(timespec="seconds").replace(":", "-")
    if out.suffix == ".json":  # lm-eval writes <stem>_<time>.json beside it
        return out.with_name(f"{out.stem}_ltscale_latents_{stamp}.jsonl")
    return out / f"ltscale_latents_{stamp}.jsonl"


def _prepare(args) -> str | None:
    """Point lm-eval's parsed arguments at ltscale's tasks (``run``, ``ls``, ``validate``) and, for
    ``run``, at ltscale's model defaults; an error message or None."""
    from ltscale.lmeval.backend import check_model_args
    from ltscale.lmeval.decode import DEFAULT_BATCH_SIZE
    from ltscale.lmeval.tasks import data_pack_tasks, default_tasks_dir, write_tasks

    run = args.command == "run"
    if run and args.model is None and args.config is None:
        args.model = "ltscale"
    model_args = (args.model_args if isinstance(args.model_args, dict) else {}) if run else {}
    if run and args.model == "ltscale":  # before lm-eval spends seconds indexing its thousands of tasks
        check_model_args(model_args)
    tasks_dir = default_tasks_dir()
    written = write_tasks(tasks_dir)
    missing = [t for t in (getattr(args, "tasks", None) or []) if t in data_pack_tasks() and t not in written]
    if missing:
        from ltscale.eval.benchmarks import data_dir

        return (
            f"task {missing[0]} needs the data pack, which is not under LTSCALE_DATA_DIR={data_dir()} "
            "(the directory holding gsm8k/, svamp/, asdiv/)"
        )
    args.include_path = [str(tasks_dir)] + ([args.include_path] if args.include_path else [])
    if run and args.model == "ltscale":
        if not hasattr(args, "batch_size") and "batch_size" not in model_args:
            args.batch_size = str(DEFAULT_BATCH_SIZE)
        if args.output_path and "latent_log" not in model_args:
            model_args["latent_log"] = str(_latent_log_path(args.output_path))
        args.model_args = model_args
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's CLI on ``argv`` (lm-eval's flags) with ltscale's model and tasks; the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval._cli.harness import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError as e:
        return _error(
            f"lm-evaluation-harness is not installed ({e}): pip install -e '.[eval]' (make install does)"
        )
    from ltscale.lmeval.backend import ModelArgsError  # registers --model ltscale

    setup_logging()
    cli = HarnessCLI()
    saved, sys.argv = sys.argv, [_PROG, *argv]  # HarnessCLI parses sys.argv (and inserts `run` when absent)
    try:
        args = cli.parse_args()
    except SystemExit as e:  # --help, or argparse already printed the usage error
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    finally:
        sys.argv = saved
    try:
        if getattr(args, "command", None) in ("run", "ls", "validate"):
            problem = _prepare(args)
            if problem:
                return _error(problem)
        cli.execute(args)
    except ModelArgsError as e:
        return _error(str(e))
    finally:
        if "torch.distributed" in sys.modules:  # left before teardown, as `ltscale eval` does
            from ltscale.engine.dist import shutdown_distributed

            shutdown_distributed()
    return EXIT_OK


def cmd_lm_eval(args) -> int:
    """The ``ltscale lm-eval`` subcommand (``ltscale.cli``): everything after it goes to lm-eval."""
    logging.getLogger("ltscale").debug("lm-eval arguments: %s", args.lm_eval_args)
    return main(args.lm_eval_args)
