"""``ltscale report``: Markdown results tables, from run dirs' eval JSONs (several seeds of a
method as one row, mean ± std) or from ``ltscale compare`` results (per method over seeds, paired
differences with a reference method)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ltscale.cli import common
from ltscale.eval.compare_results import is_compare_results, load_compare_results, render_compare_report
from ltscale.eval.report import collect_run, render_report
from ltscale.fsutil import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown results table from run dirs or compare results")
    p.add_argument(
        "runs",
        nargs="+",
        metavar="PATH",
        help="run dirs (several seeds of a method: one row), or compare results (a compare --out "
        "dir or a copy of its results/ dir; several: one section each)",
    )
    p.add_argument("--metric", choices=["official", "numeric"], default="official", help="run dirs only")
    p.add_argument(
        "--reference", default="lt_tuning", help="compare results: the method every other is paired with"
    )
    p.add_argument(
        "--resamples",
        type=common.positive_int,
        default=None,
        help="compare results: paired bootstrap resamples (default 10000)",
    )
    p.add_argument("--output", default=None, help="also write the Markdown here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kinds = {is_compare_results(p) for p in args.runs}
    try:
        if kinds == {True}:
            sections = [
                render_compare_report(
                    load_compare_results(Path(p)), reference=args.reference, resamples=args.resamples
                )
                for p in args.runs
            ]
            text = (
                sections[0]
                if len(sections) == 1
                else "\n".join(f"## {p}\n\n{s}" for p, s in zip(args.runs, sections))
            )
        elif kinds == {False}:
            runs = [collect_run(Path(p), metric=args.metric) for p in args.runs]
            text = render_report(runs, metric=args.metric)
        else:
            raise ValueError("give either run dirs or compare results, not both")
    except (FileNotFoundError, ValueError) as e:
        raise common.UserError(str(e)) from None
    if args.output:
        atomic_write_text(Path(args.output), text)
    print(text, end="")
    return common.EXIT_OK
