"""``ltscale compare``: train and score every method on the tiny default, per seed; one report.

Thin: the protocol lives in ``ltscale.compare``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ltscale.cli import common
from ltscale.compare import ALL, ANALYSIS_SAMPLES, compare
from ltscale.config import ConfigError


def _epochs(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected epochs > 0, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="train and score every method on the tiny default, per seed; one report"
    )
    p.add_argument("--out", default="runs/compare", help="run dirs, results/ and compare.md go here")
    p.add_argument("--methods", default=None, help="comma list (default: all; cot is always trained first)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="train.seed of every run, one CoT checkpoint per seed (default: the configs' seed)",
    )
    p.add_argument(
        "--heldout",
        type=common.positive_int,
        default=None,
        metavar="N",
        help="score on N held-out problems (more than the config's test split: drawn from the "
        "synthetic generator without changing the training problems)",
    )
    p.add_argument(
        "--stage-epochs",
        type=_epochs,
        default=None,
        metavar="E1,E2,E3",
        help="budget: LT-Tuning's stage epochs; every method maps them onto its stages",
    )
    p.add_argument(
        "--analysis-samples",
        type=common.positive_int,
        default=ANALYSIS_SAMPLES,
        help="problems traced one by one for the collapse numbers",
    )
    p.add_argument("--nproc", type=common.positive_int, default=2, help="ranks per training run (torchrun)")
    p.add_argument(
        "overrides", nargs="*", help="config overrides for every run (model.* only for the CoT run)"
    )
    p.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (recorded with every result)."""
    parts = ["ltscale", "compare", "--out", args.out]
    if args.methods:
        parts += ["--methods", args.methods]
    if args.seeds:
        parts += ["--seeds", *map(str, args.seeds)]
    if args.heldout:
        parts += ["--heldout", str(args.heldout)]
    if args.stage_epochs:
        parts += ["--stage-epochs", ",".join(f"{e:g}" for e in args.stage_epochs)]
    if args.analysis_samples != ANALYSIS_SAMPLES:
        parts += ["--analysis-samples", str(args.analysis_samples)]
    return shlex.join([*parts, "--nproc", str(args.nproc), *args.overrides])


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(ALL)
    command = _command(args)
    try:
        report, _ = compare(
            Path(args.out),
            methods=methods,
            seeds=args.seeds,
            heldout=args.heldout,
            stage_epochs=args.stage_epochs,
            nproc=args.nproc,
            overrides=args.overrides,
            analysis_samples=args.analysis_samples,
            command=command,
        )
    except (ConfigError, ValueError) as e:
        raise common.UserError(str(e)) from None
    print(report, end="")
    print(f"\nwrote {Path(args.out) / 'compare.md'}, the seeds' tables and results/seed<k>/<method>.json")
    return common.EXIT_OK
