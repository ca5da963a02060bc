"""``ltscale lm-eval ...``: lm-evaluation-harness with the ltscale model and tasks.

lm-eval's own flags pass through unparsed (``main`` hands everything after ``lm-eval`` to it);
the work is ``ltscale.lmeval.entry``'s.
"""

from __future__ import annotations

import argparse

NAME = "lm-eval"
PASSTHROUGH = "lm_eval_args"  # main() puts every argument after NAME here


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, add_help=False, help="lm-evaluation-harness with the ltscale model and tasks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ltscale.lmeval.entry import cmd_lm_eval  # noqa: PLC0415 - lm_eval and torch

    return cmd_lm_eval(args)
