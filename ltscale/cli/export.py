"""``ltscale export``: a ZeRO checkpoint consolidated offline into an HF ``save_pretrained`` dir.

Thin: all logic (and all deepspeed use) lives in ``ltscale.engine.export``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ltscale import rundir
from ltscale.cli import common
from ltscale.precision import ENGINE_PRECISIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidate a ZeRO checkpoint offline into an HF save_pretrained dir")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run dir (highest finished stage, or --stage), stage dir, stage<N>/ckpt, or one tag dir",
    )
    p.add_argument("--output", required=True, help="HF dir to write (only an earlier export is replaced)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. final or step-000200 (default: latest)")
    p.add_argument("--stage", type=common.positive_int, default=None, help="stage number (with a run dir)")
    p.add_argument(
        "--dtype",
        choices=["auto", *ENGINE_PRECISIONS],
        default="auto",
        help="weights dtype (default: the training precision, as the stage's own hf export)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ltscale.engine.export import ExportError, export_checkpoint, resolve_source  # noqa: PLC0415 - deepspeed

    try:
        src = resolve_source(args.checkpoint, tag=args.tag, stage=args.stage)
        out = export_checkpoint(
            src.ckpt_root, src.tag, Path(args.output), run_dir=src.run_dir, stage=src.stage, dtype=args.dtype
        )
    except ExportError as e:
        raise common.UserError(str(e)) from None
    source = rundir.read_meta(out)[rundir.SOURCE_KEY]
    print(f"exported {source['checkpoint']} (stage {src.stage}, step {source['step_in_stage']}) -> {out}")
    return common.EXIT_OK
