"""``ltscale report``: one Markdown table (method x benchmark, latent tokens, collapse) from run
dirs' eval JSONs, several seeds of a method as one row (mean ± std)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ltscale.cli import common
from ltscale.eval.report import collect_run, render_report
from ltscale.fsutil import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown results table from run dirs (mean ± std over seeds)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (several seeds of a method: one row)")
    p.add_argument("--metric", choices=["official", "numeric"], default="official")
    p.add_argument("--output", default=None, help="also write the Markdown here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        runs = [collect_run(Path(p), metric=args.metric) for p in args.runs]
    except (FileNotFoundError, ValueError) as e:
        raise common.UserError(str(e)) from None
    text = render_report(runs, metric=args.metric)
    if args.output:
        atomic_write_text(Path(args.output), text)
    print(text, end="")
    return common.EXIT_OK
