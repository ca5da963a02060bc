"""The ``ltscale`` console script: the top floor, nothing below imports it.

One module per subcommand (``ltscale.cli.<name>``) with ``register(subparsers)`` and the function
it runs; :data:`COMMANDS` lists them in help order, so a new subcommand is one module plus one
entry there. Shared argument handling is ``ltscale.cli.common``.

Exit codes: 0 success; 1 ``data check`` found invalid records (a validation result, like a
linter); 2 user error (missing checkpoint or data file, bad arguments, unreadable data) — reported
as one ``ltscale: error: ...`` line on stderr without a traceback. Anything else is a bug and
propagates with its traceback.

The subcommand modules import only light modules at their top; torch, transformers and the model
package are imported when a subcommand runs, so ``ltscale --help`` and ``ltscale data check`` stay
fast and argument errors surface first.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ltscale.cli.common import EXIT_USAGE, UserError
from ltscale.logging_setup import setup_logging

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]

#: The subcommand modules, in help order: ``ltscale.cli.<module>.register`` adds its subcommand(s).
COMMANDS = ("eval", "analyze", "report", "generate", "export", "compare", "plan", "env", "data", "lm_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltscale", description="LT-Tuning latent-reasoning toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(f"ltscale.cli.{module}").register(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """A subcommand module with ``PASSTHROUGH`` (lm-eval) gets every argument after its ``NAME``
    unparsed, in that attribute: its own CLI parses them."""
    for module in COMMANDS:
        mod = importlib.import_module(f"ltscale.cli.{module}")
        if getattr(mod, "PASSTHROUGH", None) and argv[:1] == [mod.NAME]:
            return argparse.Namespace(
                command=mod.NAME, func=mod.run, verbose=False, **{mod.PASSTHROUGH: argv[1:]}
            )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ltscale`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = _parse(parser, list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse already printed usage; keep main() returning an int
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
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
    from ltscale.engine.dist import shutdown_distributed  # noqa: PLC0415 - torch.distributed

    shutdown_distributed()
