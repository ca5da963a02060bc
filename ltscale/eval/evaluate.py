"""Batched greedy evaluation of a latent-reasoning model on math word problems.

Decisions (and why):

* **Exact sharding.** Record ``i`` goes to rank ``i % world_size``; no sample is padded or
  duplicated (a ``DistributedSampler``-style pad biases accuracy on sets not divisible by the world
  size). Every per-example dict carries its global ``index``; the caller gathers the lists and
  calls :func:`summarize` on rank 0, which de-duplicates by index and sorts, so the summary is
  identical to a single-rank run.
* **Continuous batching.** A model with ``generate_many`` (``LatentLM``) decodes the whole shard
  with ``batch_size`` rows in flight, refilling a row as soon as its answer ends, so one long
  answer does not hold a whole batch (bench/decoding.py). Other decoders get fixed batches.
* **Lockstep generate calls** (fixed batches). Shards differ by at most one record, which can mean
  one batch fewer on some ranks; those ranks run a discarded one-prompt *filler* batch so every rank
  calls ``generate`` the same number of times, for decoders that run collectives.
* **Length-sorted batches.** Prompts are sorted by length (longest first, so an OOM shows up on the
  first batch, not the last) and left-padded; results are restored to the original order.
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
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ltscale.eval.extraction import THINKING_TOKEN, extract_answer, numeric_correct, official_correct
from ltscale.fsutil import atomic_write_text  # noqa: F401  (re-exported: callers import it from here)

if TYPE_CHECKING:  # the model and data packages are imported lazily at call time
    from ltscale.data.records import Record
    from ltscale.model import LatentLM

__all__ = [
    "EvalSummary",
    "atomic_write_text",
    "decode_generated",
    "evaluate",
    "examples_path",
    "format_table",
    "merge_results",
    "summarize",
    "write_results",
]

logger = logging.getLogger(__name__)

PromptFn = Callable[[Any, str], list[int]]


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


# ----------------------------------------------------------------------------------- evaluate


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device(getattr(model, "device", "cpu"))


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _to_cpu(out):
    return type(out)(sequences=out.sequences.detach().cpu(), num_latent=out.num_latent.detach().cpu(),
                     lengths=out.lengths.detach().cpu())


def _default_prompt_fn(use_chat_template: bool | None) -> PromptFn:
    from ltscale.data.formatting import prompt_ids

    def fn(tokenizer: Any, question: str) -> list[int]:
        return list(prompt_ids(tokenizer, question, use_chat_template=use_chat_template))

    return fn


def evaluate(
    model: LatentLM,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    without_thinking: bool = False,
    use_chat_template: bool | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    prompt_fn: PromptFn | None = None,
) -> tuple[EvalSummary, list[dict[str, Any]]]:
    """Greedy-generate an answer for this rank's shard of ``records`` and score it.

    Returns this rank's summary and per-example dicts (keys: index, id, question, gold, prediction,
    correct, correct_numeric, num_latent, num_generated, truncated, difficulty, generated_text).
    With ``world_size > 1`` the summary covers only this shard: gather the per-example lists and
    call :func:`summarize` on rank 0. ``prompt_fn(tokenizer, question) -> ids`` overrides the
    default :func:`ltscale.data.formatting.prompt_ids` (methods with their own prompt format).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if prompt_fn is None:
        prompt_fn = _default_prompt_fn(use_chat_template)

    indices = list(range(rank, len(records), world_size))
    shard = [records[i] for i in indices]
    prompts = [prompt_fn(tokenizer, r.question) for r in shard]
    order = sorted(range(len(shard)), key=lambda j: -len(prompts[j]))  # stable: ties keep order
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    # Every rank makes the same number of generate calls (ZeRO-3 lockstep); see module docstring.
    per_rank_max = math.ceil(len(records) / world_size)
    n_calls = math.ceil(per_rank_max / batch_size) if world_size > 1 else len(batches)
    filler: list[int] | None = None
    if len(batches) < n_calls:
        filler = prompts[0] if prompts else prompt_fn(tokenizer, records[0].question)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    eos_id = tokenizer.eos_token_id
    thinking_id = getattr(model, "thinking_token_id", None)
    device = _model_device(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()

    results: list[dict[str, Any] | None] = [None] * len(shard)

    def score(out, b: int, j: int) -> None:
        n = int(out.lengths[b])
        results[j] = _score_one(index=indices[j], record=shard[j], ids=out.sequences[b, :n].tolist(),
                                num_latent=int(out.num_latent[b]), tokenizer=tokenizer, eos_id=eos_id,
                                thinking_id=thinking_id, max_new_tokens=max_new_tokens)

    show = progress and rank == 0
    try:
        if getattr(model, "supports_continuous_batching", False):
            with tqdm(total=len(shard), desc="eval", unit="problem", disable=not show) as bar:
                out = model.generate_many([prompts[j] for j in order], max_new_tokens, slots=batch_size,
                                          eos_token_id=eos_id, pad_token_id=pad_id,
                                          without_thinking=without_thinking, on_finish=bar.update)
            out = _to_cpu(out)
            for b, j in enumerate(order):
                score(out, b, j)
        else:
            with tqdm(total=n_calls, desc="eval", unit="batch", disable=not show) as bar:
                for call in range(n_calls):
                    batch = batches[call] if call < len(batches) else None
                    batch_prompts = [prompts[j] for j in batch] if batch is not None else [filler]
                    input_ids, attention_mask = _left_pad(batch_prompts, pad_id, device)
                    with torch.no_grad():
                        out = model.generate(input_ids, attention_mask, max_new_tokens, eos_token_id=eos_id,
                                             without_thinking=without_thinking)
                    bar.update(1)
                    if batch is None:  # filler batch: results discarded
                        continue
                    out = _to_cpu(out)
                    for b, j in enumerate(batch):
                        score(out, b, j)
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)

    per_example = [r for r in results if r is not None]
    assert len(per_example) == len(shard), "every record of the shard must be scored exactly once"
    summary = summarize(per_example)
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
    return summary, per_example


def _score_one(
    *,
    index: int,
    record: Record,
    ids: list[int],
    num_latent: int,
    tokenizer: Any,
    eos_id: int | None,
    thinking_id: int | None,
    max_new_tokens: int,
) -> dict[str, Any]:
    num_generated = len(ids)
    ended = bool(ids) and eos_id is not None and ids[-1] == eos_id
    text_ids = ids[:-1] if ended else ids
    text = decode_generated(tokenizer, text_ids, thinking_id)
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
