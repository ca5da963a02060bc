"""The ``ltscale`` console script: ``eval``, ``generate``, ``export``, ``env``, ``data synth``, ``data check``,
``lm-eval``.

Exit codes: 0 success; 1 ``data check`` found invalid records (a validation result, like a
linter); 2 user error (missing checkpoint or data file, bad arguments, unreadable data) — reported
as one ``ltscale: error: ...`` line on stderr without a traceback. Anything else is a bug and
propagates with its traceback.

Heavy imports (torch, transformers, the model package) happen inside the subcommands, so
``ltscale --help`` and ``ltscale data check`` stay fast and argument errors surface first.

This module is the argument parser and ``main`` only; the subcommands live next to what they drive
(``ltscale.eval.commands``, ``ltscale.data.commands``, ``ltscale.engine.commands``) and share
``ltscale.cli_common`` (``UserError``, exit codes, ``--checkpoint`` resolution).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ltscale.cli_common import EXIT_OK, EXIT_USAGE, UserError, resolve_checkpoint

__all__ = ["UserError", "build_parser", "main", "resolve_checkpoint"]

logger = logging.getLogger("ltscale.cli")


# ------------------------------------------------------------------------------------ commands


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The subcommand ``module.name``, imported when it runs: building the parser imports none of
    the subcommand modules (nor the packages above them), so ``--help`` and usage errors stay fast."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    run.__name__ = run.__qualname__ = name
    return run


cmd_eval = _lazy("ltscale.eval.commands", "cmd_eval")
cmd_analyze = _lazy("ltscale.eval.commands", "cmd_analyze")
cmd_report = _lazy("ltscale.eval.commands", "cmd_report")
cmd_generate = _lazy("ltscale.eval.commands", "cmd_generate")
cmd_data_synth = _lazy("ltscale.data.commands", "cmd_data_synth")
cmd_data_check = _lazy("ltscale.data.commands", "cmd_data_check")
cmd_export = _lazy("ltscale.engine.commands", "cmd_export")
cmd_env = _lazy("ltscale.engine.commands", "cmd_env")
cmd_lm_eval = _lazy("ltscale.lmeval.entry", "cmd_lm_eval")


def cmd_compare(args: argparse.Namespace) -> int:
    """Thin: the protocol lives in ``ltscale.compare``."""
    from ltscale.compare import ALL, compare
    from ltscale.config import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(ALL)
    try:
        table, _ = compare(Path(args.out), methods=methods, nproc=args.nproc, overrides=args.overrides)
    except (ConfigError, ValueError) as e:
        raise UserError(str(e)) from None
    print(table)
    print(f"\nwrote {Path(args.out) / 'compare.md'} and compare.json")
    return EXIT_OK


# -------------------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    """argparse type: bad sizes are usage errors (exit 2), not tracebacks from deep inside eval."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="HF dir, stage dir (uses hf/) or run dir (highest stage)"
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument(
        "--mode",
        choices=["hidden", "fusion", "pause"],
        default=None,
        help="latent input function (default: the one saved with the checkpoint)",
    )
    p.add_argument("--without-thinking", action="store_true", help="mask <thinking>: pure explicit decoding")
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="format the prompt with the tokenizer's chat template (default: auto)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltscale", description="LT-Tuning latent-reasoning toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{eval,analyze,report,generate,export,compare,env,data,lm-eval}",
    )

    p = sub.add_parser("eval", help="accuracy, mean latent tokens and per-example JSONL on a dataset")
    _model_args(p)
    p.add_argument(
        "--method",
        default=None,
        help="decoding method (default: the checkpoint's own); soft_thinking works on any checkpoint",
    )
    p.add_argument(
        "--method-option",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="method option, e.g. soft_thinking.cold_stop_steps=8 (repeatable)",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="one or more of: gsm8k, svamp, asdiv (from $LTSCALE_DATA_DIR), multiarith (hub, online), "
        "all (= gsm8k svamp asdiv), a JSONL/JSON file, or a hub dataset name",
    )
    p.add_argument("--split", default=None)
    p.add_argument(
        "--output",
        default="results.json",
        help="summary JSON; examples go to <stem>.examples.jsonl (<stem>.<benchmark>.examples.jsonl for several)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="latent tokens vs difficulty, entropy/attention, feature collapse")
    p.add_argument(
        "--checkpoint", required=True, help="HF dir, stage dir (uses hf/) or run dir (highest stage)"
    )
    p.add_argument(
        "--data", required=True, help="a benchmark name (gsm8k, svamp, asdiv, multiarith) or a file"
    )
    p.add_argument("--split", default=None)
    p.add_argument(
        "--limit", type=_positive_int, default=100, help="problems to trace (default 100, as the paper)"
    )
    p.add_argument("--output-dir", default="analysis", help="analysis.json and the PNG figures go here")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument(
        "--probe-steps", type=int, default=6, help="forced latent steps for the collapse probe (0: off)"
    )
    p.add_argument(
        "--examples", default=None, help="eval examples JSONL: difficulty analysis over it instead"
    )
    p.add_argument("--no-attention", action="store_true", help="skip attention capture (keeps sdpa; faster)")
    p.add_argument("--mode", choices=["hidden", "fusion", "pause"], default=None)
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="Markdown results table from run dirs (mean ± std over seeds)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (several seeds of a method: one row)")
    p.add_argument("--metric", choices=["official", "numeric"], default="official")
    p.add_argument("--output", default=None, help="also write the Markdown here")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="answer one question, showing the latent steps")
    _model_args(p)
    p.add_argument("question")
    p.add_argument(
        "--marker", default="\u27e8latent\u27e9", help="how a latent step is shown (default: ⟨latent⟩)"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="consolidate a ZeRO checkpoint offline into an HF save_pretrained dir")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run dir (highest finished stage, or --stage), stage dir, stage<N>/ckpt, or one tag dir",
    )
    p.add_argument("--output", required=True, help="HF dir to write (only an earlier export is replaced)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. final or step-000200 (default: latest)")
    p.add_argument("--stage", type=_positive_int, default=None, help="stage number (with a run dir)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="weights dtype (default: the training precision, as the stage's own hf export)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="train and score every method on the tiny default; one table")
    p.add_argument("--out", default="runs/compare", help="run dirs, compare.md and compare.json go here")
    p.add_argument("--methods", default=None, help="comma list (default: all; cot is always trained first)")
    p.add_argument("--nproc", type=_positive_int, default=2, help="ranks per training run (torchrun)")
    p.add_argument(
        "overrides", nargs="*", help="config overrides for every run (model.* only for the CoT run)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("env", help="versions, accelerator, MPI, extension and env vars (like ds_report)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("data", help="synthetic data and record validation")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{synth,check}")
    q = dsub.add_parser("synth", help="write seeded synthetic arithmetic problems as JSONL")
    q.add_argument("--n", type=_positive_int, required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_data_synth)
    q = dsub.add_parser("check", help="validate a record file (strict); print the count or the error")
    q.add_argument("file")
    q.add_argument("--split", default=None)
    q.set_defaults(func=cmd_data_check)

    # lm-eval's own flags pass through unparsed: main() hands everything after `lm-eval` to it.
    p = sub.add_parser(
        "lm-eval", add_help=False, help="lm-evaluation-harness with the ltscale model and tasks"
    )
    p.set_defaults(func=cmd_lm_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ltscale`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["lm-eval"]:
            args = argparse.Namespace(
                command="lm-eval", func=cmd_lm_eval, lm_eval_args=argv[1:], verbose=False
            )
        else:
            args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage; keep main() returning an int
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    from ltscale.logging_setup import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"ltscale: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ltscale: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """A command that joined a process group (``ltscale eval`` under a launcher) leaves it before
    interpreter teardown, which can otherwise abort a gloo rank after a successful run."""
    if "torch.distributed" not in sys.modules:  # light commands never import torch
        return
    from ltscale.engine.dist import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
