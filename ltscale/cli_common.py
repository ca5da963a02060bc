"""What every ``ltscale`` subcommand shares: the user-error type and exit codes that ``main``
turns into one ``ltscale: error: ...`` line, and the checks of ``--checkpoint`` / data arguments
that run before anything heavy is imported.

A module of its own so the subcommand modules (``ltscale.eval.commands``,
``ltscale.data.commands``, ``ltscale.engine.commands``) and ``ltscale.cli`` can all import it
without importing each other.  Pure Python: ``ltscale --help`` imports it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "UserError",
    "checkpoint_arg",
    "load_records_arg",
    "resolve_checkpoint",
]

logger = logging.getLogger("ltscale.cli")

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
_STAGE_RE = re.compile(r"^stage(\d+)$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt", ".gz")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------- checkpoints


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Find the HF model directory behind ``--checkpoint``.

    Accepts, in this order: an HF dir (has ``config.json``; written by ``save_pretrained`` with
    ``ltscale_latent.json`` beside it), a stage dir (uses ``<dir>/hf``), or a run dir (uses the
    ``hf`` of the highest-numbered ``stageN`` that has one — a stage that was interrupted before its
    export is skipped with a log line). Raises ``FileNotFoundError`` listing what was looked for.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p} does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {p} is not a directory")
    looked = [p / "config.json"]
    if _is_hf_dir(p):
        return p
    looked.append(p / "hf" / "config.json")
    if _is_hf_dir(p / "hf"):
        return p / "hf"
    stages = sorted(
        (
            (int(m.group(1)), child)
            for child in p.iterdir()
            if (m := _STAGE_RE.match(child.name)) and child.is_dir()
        ),
        reverse=True,
    )
    for n, stage_dir in stages:
        looked.append(stage_dir / "hf" / "config.json")
        if _is_hf_dir(stage_dir / "hf"):
            if n != stages[0][0]:
                logger.warning("stage%d has no hf export yet; using %s", stages[0][0], stage_dir / "hf")
            return stage_dir / "hf"
    if not stages:
        looked.append(p / "stage<N>" / "hf" / "config.json")
    listing = "\n  ".join(str(x) for x in looked)
    raise FileNotFoundError(
        f"no model checkpoint under {p}; expected an HF dir, a stage dir or a run dir. Looked for:\n  {listing}"
    )


def checkpoint_arg(path: str) -> Path:
    """``--checkpoint`` resolved, or a :class:`UserError` naming what was looked for."""
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------- data


def _looks_like_path(source: str) -> bool:
    """A local file rather than a hub name like ``openai/gsm8k`` (which also contains a slash)."""
    return source.startswith((".", "/", "~")) or source.lower().endswith(_DATA_SUFFIXES)


def load_records_arg(source: str, *, split: str | None = None, limit: int | None = None) -> list[Any]:
    """load_records with user errors (missing file, invalid data) turned into :class:`UserError`."""
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise UserError(f"data file not found: {source}")
    from ltscale.data.records import DataError, load_records

    try:
        return load_records(source, split=split, strict=True, limit=limit)
    except (DataError, FileNotFoundError) as e:
        raise UserError(f"cannot load data {source!r}: {e}") from None
