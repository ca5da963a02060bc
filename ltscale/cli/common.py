"""What the ``ltscale`` subcommands share: the user-error type and exit codes that ``main`` turns
into one ``ltscale: error: ...`` line, argument types and groups, and the checks of
``--checkpoint`` / ``--data`` that run before anything heavy is imported.

Light on purpose (``ltscale --help`` imports it): torch, transformers and the model package are
imported inside the functions that need them, after the arguments were checked.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltscale import rundir
from ltscale.config import LATENT_MODES, ConfigError
from ltscale.eval.benchmarks import BENCHMARKS, load_benchmark

if TYPE_CHECKING:
    from ltscale.inference import Inference

logger = logging.getLogger("ltscale.cli")

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
MODE_CHOICES = tuple(m for m in LATENT_MODES if m != "cot")  # what --mode may switch a checkpoint to
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt", ".gz")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


# ------------------------------------------------------------------------------------ arguments


def positive_int(text: str) -> int:
    """argparse type: bad sizes are usage errors (exit 2), not tracebacks from deep inside eval."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_checkpoint_args(p: argparse.ArgumentParser, *, decoding: bool = True) -> None:
    """Which checkpoint, and how it is loaded and decoded (eval, generate; analyze: ``decoding=False``,
    it traces the checkpoint's own latent decoding)."""
    p.add_argument(
        "--checkpoint", required=True, help="HF dir, stage dir (uses hf/) or run dir (highest stage)"
    )
    p.add_argument(
        "--mode",
        choices=MODE_CHOICES,
        default=None,
        help="latent input function (default: the one saved with the checkpoint)",
    )
    p.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="format the prompt with the tokenizer's chat template (default: auto)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    if not decoding:
        return
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--without-thinking", action="store_true", help="mask <thinking>: pure explicit decoding")
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


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_arg(path: str) -> Path:
    """``--checkpoint`` resolved to its HF dir, or a :class:`UserError` naming what was looked for."""
    try:
        return rundir.resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def device_arg(arg: str, local_rank: int = 0) -> str:
    if arg != "auto":
        return arg
    import torch  # noqa: PLC0415 - heavy: only once a checkpoint is loaded

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def load_inference(args: argparse.Namespace, ckpt: Path, *, local_rank: int = 0) -> Inference:
    """The checkpoint's decoding as the arguments ask: ``--method`` (else its own), ``--method-option``,
    ``--mode``, ``--chat-template``, ``--device``; bad method settings are user errors."""
    from ltscale.inference import load_for_inference, parse_method_options  # noqa: PLC0415 - torch

    method = getattr(args, "method", None)
    try:
        options = parse_method_options(getattr(args, "method_option", None) or [])
    except ValueError as e:
        raise UserError(f"--method-option {e}") from None
    try:
        return load_for_inference(
            ckpt,
            method,
            options,
            mode=args.mode,
            device=device_arg(args.device, local_rank),
            chat=args.chat_template,
        )
    except FileNotFoundError as e:  # a directory with config.json but no latent meta
        raise UserError(str(e)) from None
    except (ConfigError, TypeError, ValueError) as e:
        raise UserError(f"--method: {e}") from None


# ----------------------------------------------------------------------------------------- data


def _looks_like_path(source: str) -> bool:
    """A local file rather than a hub name like ``openai/gsm8k`` (which also contains a slash)."""
    return source.startswith((".", "/", "~")) or source.lower().endswith(_DATA_SUFFIXES)


def load_records_arg(source: str, *, split: str | None = None, limit: int | None = None) -> list[Any]:
    """load_records with user errors (missing file, invalid data) turned into :class:`UserError`."""
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise UserError(f"data file not found: {source}")
    from ltscale.data.records import DataError, load_records  # noqa: PLC0415 - imports torch via ltscale.data

    try:
        return load_records(source, split=split, strict=True, limit=limit)
    except (DataError, FileNotFoundError) as e:
        raise UserError(f"cannot load data {source!r}: {e}") from None


def load_benchmark_arg(source: str, *, split: str | None, limit: int | None) -> list[Any]:
    """A benchmark name (gsm8k, svamp, asdiv, multiarith) or any source ``load_records`` reads;
    an empty result is a user error too."""
    if source.lower() not in BENCHMARKS:
        records = load_records_arg(source, split=split, limit=limit)
    else:
        from ltscale.data.records import DataError  # noqa: PLC0415

        try:
            records = load_benchmark(source, split=split, limit=limit)
        except (DataError, FileNotFoundError) as e:
            raise UserError(f"cannot load benchmark {source!r}: {e}") from None
    if not records:
        raise UserError(f"no records in {source}")
    return records
