"""``ltscale compare``: train and score every method on the tiny default; one table.

Thin: the protocol lives in ``ltscale.compare``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ltscale.cli import common
from ltscale.compare import ALL, compare
from ltscale.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train and score every method on the tiny default; one table")
    p.add_argument("--out", default="runs/compare", help="run dirs, compare.md and compare.json go here")
    p.add_argument("--methods", default=None, help="comma list (default: all; cot is always trained first)")
    p.add_argument("--nproc", type=common.positive_int, default=2, help="ranks per training run (torchrun)")
    p.add_argument(
        "overrides", nargs="*", help="config overrides for every run (model.* only for the CoT run)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(ALL)
    try:
        table, _ = compare(Path(args.out), methods=methods, nproc=args.nproc, overrides=args.overrides)
    except (ConfigError, ValueError) as e:
        raise common.UserError(str(e)) from None
    print(table)
    print(f"\nwrote {Path(args.out) / 'compare.md'} and compare.json")
    return common.EXIT_OK
