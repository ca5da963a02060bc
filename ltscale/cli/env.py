"""``ltscale env``: versions, accelerator, MPI, extension and environment variables (like
DeepSpeed's ``ds_report``), as text or JSON."""

from __future__ import annotations

import argparse
import json

from ltscale.cli import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="versions, accelerator, MPI, extension and env vars (like ds_report)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ltscale.engine.envinfo import collect, format_report  # noqa: PLC0415 - torch

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return common.EXIT_OK
