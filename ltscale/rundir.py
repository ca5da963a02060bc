"""The run directory and the checkpoint meta file: their one owner.

Layout of a run dir (every other module and ``slurm/common.sh`` ask this module for a path)::

    config.resolved.yaml  the config that ran (a resumed run compares against it)
    ds_config.json        the rendered DeepSpeed config
    tokenizer/            a sentencepiece tokenizer trained for the run (model.tokenizer: sentencepiece)
    data/train/           the tokenized training set (Arrow, ltscale/data/trainset.py owns what is inside),
                          built once and reused on resume while its fingerprint matches
    tb/                   TensorBoard events
    eval_table.md         the per-stage eval table
    assistant/            SoftCoT's frozen assistant, saved once
    softcot_thoughts.pt   SoftCoT's assistant thoughts of the training prompts
    stage{N}/ckpt/<tag>   DeepSpeed + train state (engine/checkpoint.py owns what is inside ckpt/)
    stage{N}/insertions/  the stage's <thinking> sites (Arrow), reused on resume
    stage{N}/hf/          HF save_pretrained export of the stage's final weights (an "HF dir")
    stage{N}/eval.json    eval summary (+ eval.examples.jsonl), analysis.json
    stage{N}/COMPLETE     written last: the stage is done

An HF dir holds what ``save_pretrained`` writes plus ``ltscale_latent.json`` (the *latent meta*:
what the weights need to decode as a latent model, see :func:`latent_meta`), and optionally
``ltscale_adapter.safetensors`` (the latent adapter) and ``ltscale_extra.safetensors`` (modules a
method adds around the base, e.g. SoftCoT's projection).

Pure Python and quick to import: ``python -m ltscale.rundir QUERY ...`` answers the shell scripts
(see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ltscale.fsutil import atomic_write_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.resolved.yaml"
DS_CONFIG_FILE = "ds_config.json"
TOKENIZER_DIR = "tokenizer"
TRAIN_DATA_DIR = "data/train"
TB_DIR = "tb"
EVAL_TABLE_FILE = "eval_table.md"
ASSISTANT_DIR = "assistant"
SOFTCOT_THOUGHTS_FILE = "softcot_thoughts.pt"

CKPT_DIR = "ckpt"
CKPT_LATEST = "latest"  # inside ckpt/: the newest complete tag (engine/checkpoint.py writes it)
HF_DIR = "hf"
INSERTIONS_DIR = "insertions"
EVAL_FILE = "eval.json"
ANALYSIS_FILE = "analysis.json"
COMPLETE_FILE = "COMPLETE"

HF_CONFIG_FILE = "config.json"  # what makes a directory an HF dir
LATENT_META_FILE = "ltscale_latent.json"
ADAPTER_FILE = "ltscale_adapter.safetensors"
EXTRA_FILE = "ltscale_extra.safetensors"

STAGE_RE = re.compile(r"^stage(\d+)$")
#: The latent-meta keys every checkpoint has (what ``LatentLM`` is rebuilt from).
LATENT_KEYS = ("mode", "alpha", "temperature", "top_p", "thinking_token_id", "adapter", "adapter_hidden")
#: The method entry (absent: LT-Tuning and its ablations, which decode as ``mode`` says).
METHOD_KEY = "method"
#: Where an ``ltscale export`` came from (``checkpoint``, ``tag``, ``stage``, steps, dtype).
SOURCE_KEY = "source"


# ------------------------------------------------------------------------------------ paths


def train_data_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / TRAIN_DATA_DIR


def stage_dir(run_dir: str | os.PathLike[str], k: int) -> Path:
    return Path(run_dir) / f"stage{k}"


def ckpt_dir(run_dir: str | os.PathLike[str], k: int) -> Path:
    return stage_dir(run_dir, k) / CKPT_DIR


def hf_dir(run_dir: str | os.PathLike[str], k: int) -> Path:
    return stage_dir(run_dir, k) / HF_DIR


def complete_file(run_dir: str | os.PathLike[str], k: int) -> Path:
    return stage_dir(run_dir, k) / COMPLETE_FILE


def stage_complete(run_dir: str | os.PathLike[str], k: int) -> bool:
    return complete_file(run_dir, k).is_file()


def stage_number(path: str | os.PathLike[str]) -> int | None:
    """N for a directory named ``stage{N}``, else None."""
    m = STAGE_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def stages(run_dir: str | os.PathLike[str]) -> list[int]:
    """Numbers of the ``stage{N}`` directories in ``run_dir``, ascending (numeric, not lexicographic)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(n for c in run_dir.iterdir() if (n := stage_number(c)) is not None and c.is_dir())


def finished_stages(run_dir: str | os.PathLike[str]) -> list[int]:
    return [n for n in stages(run_dir) if stage_complete(run_dir, n)]


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or bool(stages(path))


def latest_tag(run_dir: str | os.PathLike[str], k: int) -> str | None:
    """The tag ``stage{k}/ckpt/latest`` names when that checkpoint exists, else None."""
    root = ckpt_dir(run_dir, k)
    try:
        tag = (root / CKPT_LATEST).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return tag if tag and (root / tag).is_dir() else None


class StageOrderError(RuntimeError):
    """A stage was asked for before the stage it starts from has finished."""


def check_stage_order(run_dir: str | os.PathLike[str], k: int) -> bool:
    """Whether stage ``k`` still has to run: False when it is complete; raises
    :class:`StageOrderError` when stage ``k-1`` (its starting point) is not."""
    if stage_complete(run_dir, k):
        return False
    if k > 1 and not stage_complete(run_dir, k - 1):
        raise StageOrderError(
            f"stage {k} starts from stage {k - 1}'s final checkpoint, but {complete_file(run_dir, k - 1)} "
            f"does not exist; run --stage {k - 1} first"
        )
    return True


# ------------------------------------------------------------------------------- checkpoints


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / HF_CONFIG_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Find the HF dir behind a ``--checkpoint`` argument.

    Accepts, in this order: an HF dir (has ``config.json``), a stage dir (uses ``<dir>/hf``), or a
    run dir (uses the ``hf`` of the highest-numbered ``stageN`` that has one; a stage interrupted
    before its export is skipped with a log line). Raises ``FileNotFoundError`` listing what was
    looked for.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p} does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {p} is not a directory")
    looked = [p / HF_CONFIG_FILE]
    if is_hf_dir(p):
        return p
    looked.append(p / HF_DIR / HF_CONFIG_FILE)
    if is_hf_dir(p / HF_DIR):
        return p / HF_DIR
    numbers = stages(p)[::-1]
    for n in numbers:
        looked.append(hf_dir(p, n) / HF_CONFIG_FILE)
        if is_hf_dir(hf_dir(p, n)):
            if n != numbers[0]:
                log.warning("stage%d has no hf export yet; using %s", numbers[0], hf_dir(p, n))
            return hf_dir(p, n)
    if not numbers:
        looked.append(p / "stage<N>" / HF_DIR / HF_CONFIG_FILE)
    listing = "\n  ".join(str(x) for x in looked)
    raise FileNotFoundError(
        f"no model checkpoint under {p}; expected an HF dir, a stage dir or a run dir. Looked for:\n  {listing}"
    )


# ------------------------------------------------------------------------------- latent meta


def latent_meta(
    *,
    mode: str,
    alpha: float,
    temperature: float,
    top_p: float,
    thinking_token_id: int,
    adapter: bool,
    adapter_hidden: int | None,
    **entries: Any,
) -> dict[str, Any]:
    """The content of ``ltscale_latent.json``: the latent keys plus optional entries (``method``
    and the method's own section, ``source`` for an ``ltscale export``)."""
    return {
        "mode": mode,
        "alpha": float(alpha),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "thinking_token_id": int(thinking_token_id),
        "adapter": bool(adapter),
        "adapter_hidden": adapter_hidden,
        **entries,
    }


def read_meta(hf: str | os.PathLike[str]) -> dict[str, Any]:
    """``hf``'s latent meta as written, ``{}`` when it has none."""
    path = Path(hf) / LATENT_META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_meta(hf: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    missing = [k for k in LATENT_KEYS if k not in meta]
    if missing:
        raise ValueError(f"latent meta for {hf} lacks {missing}")
    return atomic_write_text(Path(hf) / LATENT_META_FILE, json.dumps(meta, indent=2))


def source_hf_dir(meta: dict[str, Any]) -> Path | None:
    """For an ``ltscale export`` of ``stage{N}/ckpt/<tag>``: that stage's own ``hf`` dir."""
    checkpoint = (meta.get(SOURCE_KEY) or {}).get("checkpoint")
    return Path(checkpoint).parent.parent / HF_DIR if checkpoint else None


def inference_meta(hf: str | os.PathLike[str]) -> dict[str, Any]:
    """``hf``'s latent meta with the method entries an export lacks taken from its source stage's
    own export (``ltscale export`` rebuilds the latent keys only)."""
    meta = read_meta(hf)
    parent = source_hf_dir(meta)
    if METHOD_KEY not in meta and parent is not None:
        for key, value in read_meta(parent).items():
            meta.setdefault(key, value)
    return meta


# ------------------------------------------------------------------------------ shell queries


def _query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ltscale.rundir", description=main.__doc__)
    sub = p.add_subparsers(dest="query", required=True)
    for name, what in (
        ("stage-dir", "print RUN_DIR/stage<K>"),
        ("ckpt-dir", "print RUN_DIR/stage<K>/ckpt"),
        ("hf-dir", "print RUN_DIR/stage<K>/hf"),
        ("complete-file", "print RUN_DIR/stage<K>/COMPLETE"),
        ("stage-complete", "exit 0 when stage K is complete, 1 when not"),
        ("latest-tag", "print the stage's newest complete checkpoint tag, or 'none'"),
        ("check-stage", "print 'complete' or 'ready'; exit 2 with the reason when stage K-1 is not complete"),
    ):
        q = sub.add_parser(name, help=what)
        q.add_argument("run_dir")
        q.add_argument("stage", type=int)
    q = sub.add_parser("checkpoint", help="print the HF dir behind a --checkpoint argument; exit 2 when none")
    q.add_argument("path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run-dir questions for shell scripts, answered by the layout's owner."""
    args = _query_parser().parse_args(argv)
    if args.query == "checkpoint":
        try:
            print(resolve_checkpoint(args.path))
        except FileNotFoundError as e:
            print(f"ltscale: error: {e}", file=sys.stderr)
            return 2
        return 0
    run_dir, k = args.run_dir, args.stage
    paths = {"stage-dir": stage_dir, "ckpt-dir": ckpt_dir, "hf-dir": hf_dir, "complete-file": complete_file}
    if args.query in paths:
        print(paths[args.query](run_dir, k))
        return 0
    if args.query == "stage-complete":
        return 0 if stage_complete(run_dir, k) else 1
    if args.query == "latest-tag":
        print(latest_tag(run_dir, k) or "none")
        return 0
    try:
        print("ready" if check_stage_order(run_dir, k) else "complete")
    except StageOrderError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
