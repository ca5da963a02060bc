"""Batched greedy evaluation of a latent-reasoning model on math word problems.

Decisions (and why):

* **Exact sharding.** Record ``i`` goes to rank ``i % world_size``; no sample is padded or
  duplicated (a ``DistributedSampler``-style pad biases accuracy on sets not divisible by the world
  size). Every per-example dict carries its global ``index``; the caller gathers the lists and
  calls :func:`summarize` on rank 0, which de-duplicates by index and sorts, so the summary is
  identical to a single-rank run.
* **Continuous batching.** The shard is decoded by the method's decoding
  (:class:`ltscale.inference.Inference`) with ``batch_size`` rows in flight, refilling a row as soon
  as its answer ends, so one long answer does not hold a whole batch (bench/decoding.py). Ranks
  decode independently: the model is a local copy on every rank, so no decode step is collective.
* **Longest prompts first** (so an OOM shows up at the start, not the end); results are restored
  to the original order.
* **Decoding.** Only the ``lengths[b]`` generated tokens are decoded, minus a final EOS (the official
  evaluator stops on EOS without appending it). Latent steps are rendered as ``<thinking>`` so the
  official extraction rule applies unchanged. Special tokens are kept, as the official code does.
* **Accuracies are fractions in [0, 1]**; :func:`format_table` prints percentages.
* ``num_generated`` counts every generated position, latent steps and the EOS included
  (``GenerationOutput.lengths``); ``truncated`` marks outputs that hit ``max_new_tokens`` without
  EOS, the usual cause of a missing ``####`` line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ltscale.eval.extraction import THINKING_TOKEN, extract_answer, numeric_correct, official_correct
from ltscale.fsutil import atomic_write_text

if TYPE_CHECKING:
    from ltscale.data.records import Record
    from ltscale.inference import Inference

__all__ = [
    "EvalSummary",
    "decode_generated",
    "evaluate",
    "examples_path",
    "format_table",
    "generated_text",
    "merge_results",
    "summarize",
    "write_results",
]

logger = logging.getLogger(__name__)


@dataclass
class EvalSummary:
    """Aggregate metrics of one evaluation run (accuracies are fractions in [0, 1])."""

    n: int
    accuracy_official: float
    accuracy_numeric: float
    mean_latent_tokens: float
    mean_generated_tokens: float
    num_truncated: int = 0
    #: difficulty (number of gold steps) -> {n, accuracy, accuracy_numeric, mean_latent, mean_generated}
    by_difficulty: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-ready; JSON turns the integer difficulty keys into strings)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSummary:
        """Inverse of :meth:`to_dict`, also accepting the JSON form (string keys, extra keys)."""
        return cls(
            n=int(d["n"]),
            accuracy_official=float(d["accuracy_official"]),
            accuracy_numeric=float(d["accuracy_numeric"]),
            mean_latent_tokens=float(d["mean_latent_tokens"]),
            mean_generated_tokens=float(d["mean_generated_tokens"]),
            num_truncated=int(d.get("num_truncated", 0)),
            by_difficulty={int(k): dict(v) for k, v in d.get("by_difficulty", {}).items()},
        )

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        """Flat ``{prefix}/metric`` dict for :meth:`ltscale.monitor.Monitor.scalars`."""
        return {
            f"{prefix}/accuracy": self.accuracy_official,
            f"{prefix}/accuracy_numeric": self.accuracy_numeric,
            f"{prefix}/mean_latent_tokens": self.mean_latent_tokens,
            f"{prefix}/mean_generated_tokens": self.mean_generated_tokens,
            f"{prefix}/truncated_frac": self.num_truncated / self.n if self.n else 0.0,
        }


# ----------------------------------------------------------------------------------- decoding


def decode_generated(
    tokenizer: Any, ids: Sequence[int], thinking_token_id: int | None, marker: str = THINKING_TOKEN
) -> str:
    """Decode generated ids with every latent step rendered as ``marker``.

    When the tokenizer itself spells ``thinking_token_id`` as ``marker`` (the LT-Tuning vocabulary),
    one ``decode`` with special tokens kept reproduces the official evaluator's text exactly.
    Otherwise (a baseline whose placeholder has another spelling, or an id outside the vocabulary)
    the text runs between latent steps are decoded separately and joined with ``marker``.
    """
    ids = [int(t) for t in ids]
    if not ids:
        return ""
    if thinking_token_id is None or thinking_token_id not in ids:
        return tokenizer.decode(ids, skip_special_tokens=False)
    try:
        spelled = tokenizer.convert_ids_to_tokens(thinking_token_id)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        spelled = None
    if spelled == marker:
        return tokenizer.decode(ids, skip_special_tokens=False)
    parts: list[str] = []
    run: list[int] = []
    for t in ids:
        if t == thinking_token_id:
            if run:
                parts.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            parts.append(marker)
        else:
            run.append(t)
    if run:
        parts.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(parts)


def generated_text(tokenizer: Any, ids: Sequence[int], thinking_token_id: int | None,
                   eos_id: int | None) -> tuple[str, bool]:
    """``(text, ended)`` of one generated row (its ``lengths`` tokens): a final EOS is not decoded,
    as the official evaluator stops on EOS without appending it."""
    ids = [int(t) for t in ids]
    ended = bool(ids) and eos_id is not None and ids[-1] == eos_id
    return decode_generated(tokenizer, ids[:-1] if ended else ids, thinking_token_id), ended


# ----------------------------------------------------------------------------------- evaluate


def evaluate(
    inf: Inference,
    records: Sequence[Record],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    without_thinking: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[EvalSummary, list[dict[str, Any]]]:
    """Greedy-generate an answer for this rank's shard of ``records`` and score it.

    ``inf``: the checkpoint's decoding (:func:`ltscale.inference.load_for_inference`), which also
    builds each prompt. Returns this rank's summary and per-example dicts (keys: index, id,
    question, gold, prediction, correct, correct_numeric, num_latent, num_generated, truncated,
    difficulty, generated_text). With ``world_size > 1`` the summary covers only this shard: gather
    the per-example lists and call :func:`summarize` on rank 0.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    indices = list(range(rank, len(records), world_size))
    shard = [records[i] for i in indices]
    prompts = [inf.prompt_ids(r.question) for r in shard]
    order = sorted(range(len(shard)), key=lambda j: -len(prompts[j]))  # stable: ties keep order
    eos_id = inf.tokenizer.eos_token_id
    with tqdm(total=len(shard), desc="eval", unit="problem", disable=not (progress and rank == 0)) as bar:
        out = inf.generate_many([prompts[j] for j in order], max_new_tokens, slots=batch_size,
                                eos_token_id=eos_id, without_thinking=without_thinking, on_finish=bar.update)
    results: list[dict[str, Any]] = [{}] * len(shard)
    for b, j in enumerate(order):
        n = int(out.lengths[b])
        text, ended = generated_text(inf.tokenizer, out.sequences[b, :n].tolist(), inf.thinking_token_id, eos_id)
        results[j] = _score_one(index=indices[j], record=shard[j], text=text, ended=ended, num_generated=n,
                                num_latent=int(out.num_latent[b]), max_new_tokens=max_new_tokens)
    summary = summarize(results)
    if rank == 0:
        logger.info(
            "eval (shard of rank %d/%d): n=%d accuracy=%.4f numeric=%.4f mean_latent=%.2f",
            rank,
            world_size,
            summary.n,
            summary.accuracy_official,
            summary.accuracy_numeric,
            summary.mean_latent_tokens,
        )
    return summary, results


def _score_one(*, index: int, record: Record, text: str, ended: bool, num_generated: int, num_latent: int,
               max_new_tokens: int) -> dict[str, Any]:
    pred = extract_answer(text)
    gold = str(record.answer)
    return {
        "index": index,
        "id": record.id,
        "question": record.question,
        "gold": gold,
        "prediction": pred,
        "correct": official_correct(pred, gold),
        "correct_numeric": numeric_correct(pred, gold),
        "num_latent": num_latent,
        "num_generated": num_generated,
        "truncated": not ended and num_generated >= max_new_tokens,
        "difficulty": int(record.difficulty),
        "generated_text": text,
    }


# ---------------------------------------------------------------------------------- aggregation


def merge_results(shards: Iterable[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Concatenate per-rank example lists, drop duplicate indices, sort by global index.

    Examples without an ``index`` key (hand-made lists) keep their relative order after the indexed ones.
    """
    seen: set[int] = set()
    indexed: list[dict[str, Any]] = []
    loose: list[dict[str, Any]] = []
    dups = 0
    for shard in shards:
        for ex in shard:
            idx = ex.get("index")
            if idx is None:
                loose.append(ex)
            elif idx in seen:
                dups += 1
            else:
                seen.add(idx)
                indexed.append(ex)
    if dups:
        logger.warning("merge_results: dropped %d duplicate examples (same index)", dups)
    indexed.sort(key=lambda ex: ex["index"])
    return indexed + loose


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def summarize(per_example: Sequence[dict[str, Any]]) -> EvalSummary:
    """Aggregate per-example dicts (possibly gathered from several ranks) into an :class:`EvalSummary`.

    De-duplicates by ``index`` and sorts first, so the result does not depend on rank order.
    An empty list gives ``n=0`` and zero metrics (with a warning) rather than NaN, which JSON lacks.
    """
    examples = merge_results([per_example])
    if not examples:
        logger.warning("summarize: no examples; reporting zeros")
    groups: dict[int, list[dict[str, Any]]] = {}
    for ex in examples:
        groups.setdefault(int(ex["difficulty"]), []).append(ex)
    by_difficulty = {
        d: {
            "n": len(g),
            "accuracy": _mean([float(e["correct"]) for e in g]),
            "accuracy_numeric": _mean([float(e["correct_numeric"]) for e in g]),
            "mean_latent": _mean([float(e["num_latent"]) for e in g]),
            "mean_generated": _mean([float(e["num_generated"]) for e in g]),
        }
        for d, g in sorted(groups.items())
    }
    return EvalSummary(
        n=len(examples),
        accuracy_official=_mean([float(e["correct"]) for e in examples]),
        accuracy_numeric=_mean([float(e["correct_numeric"]) for e in examples]),
        mean_latent_tokens=_mean([float(e["num_latent"]) for e in examples]),
        mean_generated_tokens=_mean([float(e["num_generated"]) for e in examples]),
        num_truncated=sum(bool(e.get("truncated", False)) for e in examples),
        by_difficulty=by_difficulty,
    )


# ------------------------------------------------------------------------------------- output


def examples_path(output: Path) -> Path:
    """Where :func:`write_results` puts the per-example JSONL for summary file ``output``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.examples.jsonl")


def write_results(
    summary: EvalSummary,
    per_example: Sequence[dict[str, Any]],
    output: Path,
    *,
    meta: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the summary JSON at ``output`` and ``<stem>.examples.jsonl`` next to it (atomically).

    ``meta`` (checkpoint, data, prompt format, decoding settings …) is stored under the summary's
    ``"meta"`` key so a number can always be traced to how it was produced. Returns both paths.
    """
    output = Path(output)
    ex_path = examples_path(output)
    payload = summary.to_dict()
    if meta:
        payload["meta"] = meta
    lines = "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in per_example)
    atomic_write_text(ex_path, lines)
    atomic_write_text(output, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return output, ex_path


_COLUMNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("stage", ("stage",), "str"),
    ("mode", ("mode",), "str"),
    ("n", ("n",), "int"),
    ("accuracy (%)", ("accuracy_official", "accuracy"), "pct"),
    ("numeric acc. (%)", ("accuracy_numeric",), "pct"),
    ("mean latent tokens", ("mean_latent_tokens", "mean_latent"), "float"),
    ("mean generated tokens", ("mean_generated_tokens", "mean_generated"), "float"),
)


def _cell(row: dict[str, Any], keys: tuple[str, ...], kind: str) -> str:
    for k in keys:
        if k in row and row[k] is not None:
            v = row[k]
            if kind == "pct":
                return f"{100.0 * float(v):.2f}"
            if kind == "float":
                return f"{float(v):.2f}"
            if kind == "int":
                return str(int(v))
            return str(v)
    return "-"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of eval rows, e.g. ``[{"stage": 1, **summary.to_dict()}, ...]``.

    Columns: stage, n, accuracy (official, %), numeric accuracy (%), mean latent / generated tokens.
    Missing values print as ``-``; columns absent from every row are dropped.
    """
    cols = [c for c in _COLUMNS if any(any(k in r for k in c[1]) for r in rows)] or list(_COLUMNS[:1])
    cells = [[_cell(r, keys, kind) for _, keys, kind in cols] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (h, _, _) in enumerate(cols)]
    lines = [
        "| " + " | ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths)) + " |",
        "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|",
    ]
    for row in cells:
        lines.append(
            "| "
            + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            + " |"
        )
    return "\n".join(lines)
