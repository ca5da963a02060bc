"""The ``ltscale`` subcommands that drive ``ltscale.engine``: ``export`` (ZeRO shards -> HF dir,
offline) and ``env`` (versions, accelerator, MPI, extension: like ``ds_report``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ltscale.cli_common import EXIT_OK, UserError


def cmd_export(args: argparse.Namespace) -> int:
    """Thin: all logic (and all deepspeed use) lives in ``ltscale.engine.export``."""
    from ltscale.engine.export import ExportError, export_checkpoint, resolve_source

    try:
        src = resolve_source(args.checkpoint, tag=args.tag, stage=args.stage)
        out = export_checkpoint(
            src.ckpt_root, src.tag, Path(args.output), run_dir=src.run_dir, stage=src.stage, dtype=args.dtype
        )
    except ExportError as e:
        raise UserError(str(e)) from None
    source = json.loads((out / "ltscale_latent.json").read_text())["source"]
    print(f"exported {source['checkpoint']} (stage {src.stage}, step {source['step_in_stage']}) -> {out}")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    from ltscale.engine.envinfo import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return EXIT_OK
