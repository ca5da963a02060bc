"""Confidence-driven ``<thinking>`` insertion (spec Eq. 5, §3 Algorithm, ambiguity 3).

At the start of stage 2 and 3 the current model scores every training sequence; a response token
whose gold probability is below τ becomes a candidate site, and a seeded sample of the
candidates gets one (sometimes two) ``<thinking>`` tokens inserted right before it.

Decisions:

* We score the **exact formatted training sequence** (prompt + ``## Step i: ...`` response +
  eos), the paper's intent; the official code scores a differently formatted string and applies
  the indices to the formatted one (ambiguity 3), which we do not replicate.
* A site ``t`` means "insert before token ``t``", ``t`` in ``[max(prompt_len, 1), len)``:
  the first response token may get a site (the last prompt position then predicts
  ``<thinking>``), and so may eos; prompt tokens never do.
* Sites are stored in **original** token coordinates (repeated for a double insertion), so the
  stored result does not depend on how insertions are later applied, and stays valid as long as
  the tokenisation does (the fingerprint in ``meta.json`` covers the rest).
* Per-sample randomness is ``np.random.default_rng([seed, stage, sample_index])``: independent of
  batch order, rank count and which samples were scored first, so distributed scoring gives the
  same sites as single-process scoring.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrow_store import read_meta, read_table, write_table
from .formatting import Encoded

logger = logging.getLogger(__name__)

__all__ = [
    "InsertionParams",
    "Sites",
    "apply_insertions",
    "gold_token_probs",
    "insertion_fingerprint",
    "iter_gold_token_probs",
    "load_insertions",
    "save_insertions",
    "select_sites",
]

_FINGERPRINT_VERSION = "ltscale-insertion-v2"


@dataclass
class InsertionParams:
    """Per-stage insertion knobs. Reference values (docs/method.md §4, §11.6): stage 2 ``(0.3, 6, 0.85, 0.15)``,
    stage 3 ``(0.2, 8, 0.95, 0.20)``."""

    tau: float
    max_sites: int
    insert_prob: float
    double_insert_prob: float

    def __post_init__(self) -> None:
        for name in ("insert_prob", "double_insert_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"InsertionParams.{name} must be in [0, 1], got {value}")
        if self.max_sites < 0:
            raise ValueError(f"InsertionParams.max_sites must be >= 0, got {self.max_sites}")


def iter_gold_token_probs(
    forward_logits: Callable[..., Any],
    examples: Sequence[Encoded],
    *,
    batch_size: int,
    pad_id: int,
    lengths: Sequence[int] | np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`gold_token_probs` as a stream of ``(example index, probs)``, batch by batch, so a
    caller can reduce each example's probabilities as they come instead of holding all of them.

    ``lengths`` (token counts of ``examples``) saves building every example just to sort them.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lengths is None:
        lengths = [len(e.input_ids) for e in examples]
    # longest first, ties in input order (a stable sort)
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start : start + batch_size]]
            rows = [examples[i].input_ids for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, r in enumerate(rows):
                ids[row, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[row, : len(r)] = 1
            out = forward_logits(ids, mask)
            logits = getattr(out, "logits", out)
            for row, i in enumerate(idx):
                n = len(rows[row])
                p = np.full(n, np.nan, dtype=np.float32)
                if n > 1:
                    x = logits[row, : n - 1]
                    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
                    gold = ids[row, 1:n].to(x.device).unsqueeze(-1)
                    logp = x.gather(-1, gold).squeeze(-1) - torch.logsumexp(x, dim=-1)
                    p[1:] = logp.exp().cpu().numpy()
                yield i, p


def gold_token_probs(
    forward_logits: Callable[..., Any],
    examples: Sequence[Encoded],
    *,
    batch_size: int,
    pad_id: int,
) -> list[np.ndarray]:
    """Per example, ``p[t] = P(input_ids[t] | input_ids[:t])`` under ``forward_logits``; ``p[0]`` = nan.

    ``forward_logits(input_ids, attention_mask) -> [B, L, V]`` logits (or an output with
    ``.logits``) of a plain causal LM on right-padded batches; inputs are built on CPU, so the
    callable moves them to the model's device (the softmax then runs on the logits' device); right
    padding leaves every real position's logits unchanged under causal attention, so no position
    ids are needed. Examples are batched longest-first to waste little compute on padding; results
    come back in input order. Softmax is taken in float32 (or the logits' dtype if wider), one row
    at a time, so peak extra memory is one ``L x V`` float32 matrix rather than the whole batch's.
    """
    result: list[np.ndarray | None] = [None] * len(examples)
    for i, p in iter_gold_token_probs(forward_logits, examples, batch_size=batch_size, pad_id=pad_id):
        result[i] = p
    return result  # type: ignore[return-value]


def select_sites(
    probs: np.ndarray,
    prompt_len: int,
    params: InsertionParams,
    *,
    seed: int,
    sample_index: int,
    stage: int,
) -> list[int]:
    """Insertion positions (original coordinates, sorted, repeated for a double insertion).

    Candidates: ``t >= max(prompt_len, 1)`` with ``probs[t] < tau`` (nan never qualifies).
    ``min(max_sites, |C|)`` of them are drawn without replacement; then, in ascending order, each
    is kept with ``insert_prob`` and, if kept, doubled with ``double_insert_prob``. So a position
    appears at most twice and at most ``max_sites`` distinct positions are returned.
    """
    probs = np.asarray(probs, dtype=np.float64)
    start = max(int(prompt_len), 1)
    with np.errstate(invalid="ignore"):
        candidates = np.flatnonzero(probs[start:] < params.tau) + start
    k = min(params.max_sites, len(candidates))
    if k == 0:
        return []
    rng = np.random.default_rng([int(seed), int(stage), int(sample_index)])
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    sites: list[int] = []
    for t in chosen.tolist():
        if rng.random() < params.insert_prob:
            sites.append(t)
            if rng.random() < params.double_insert_prob:
                sites.append(t)
    return sites


def apply_insertions(ex: Encoded, sites: Sequence[int], thinking_id: int) -> Encoded:
    """Insert ``thinking_id`` before each site; inserted labels are ``thinking_id`` (docs/method.md §11.14).

    With HF's shifted loss this makes the position before a slot predict ``<thinking>`` and the
    slot itself predict the next text token (or the next ``<thinking>``). Text tokens keep their
    labels; ``prompt_len`` is unchanged because sites never lie in the prompt.
    """
    n = len(ex.input_ids)
    counts: dict[int, int] = {}
    for t in sites:
        if not max(ex.prompt_len, 1) <= t < n:
            raise ValueError(
                f"{ex.id}: insertion site {t} outside the response [{max(ex.prompt_len, 1)}, {n})"
            )
        counts[t] = counts.get(t, 0) + 1
    input_ids: list[int] = []
    labels: list[int] = []
    for t, (tok, lab) in enumerate(zip(ex.input_ids, ex.labels)):
        c = counts.get(t, 0)
        if c:
            input_ids.extend([thinking_id] * c)
            labels.extend([thinking_id] * c)
        input_ids.append(tok)
        labels.append(lab)
    return Encoded(input_ids=input_ids, labels=labels, prompt_len=ex.prompt_len, id=ex.id)


def insertion_fingerprint(
    params: InsertionParams,
    seed: int,
    stage: int,
    examples: str,
    *,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """sha256 over everything that determines a stage's sites, for stale-file detection.

    ``examples`` identifies the scored examples (their ids and tokens; ``Examples.fingerprint``).
    ``extra`` is for inputs only the caller knows (e.g. the scoring model's global step); it must
    be JSON-serialisable.
    """
    payload = {
        "version": _FINGERPRINT_VERSION,
        "params": asdict(params),
        "seed": int(seed),
        "stage": int(stage),
        "examples": str(examples),
        "extra": dict(extra or {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Sites:
    """The insertion sites of a stage's examples, packed: example ``j``'s are
    ``values[offsets[j]:offsets[j + 1]]`` (original coordinates, sorted, repeated for a double
    insertion). Arrays, not one list per example: a 385k-example stage keeps this on every rank."""

    def __init__(self, counts: np.ndarray, values: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int32)
        self.offsets = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        if self.offsets[-1] != len(self.values):
            raise ValueError(f"Sites: counts add up to {self.offsets[-1]}, but {len(self.values)} values")

    @classmethod
    def from_lists(cls, sites: Sequence[Sequence[int]]) -> Sites:
        counts = np.fromiter((len(s) for s in sites), dtype=np.int64, count=len(sites))
        values = np.fromiter((t for s in sites for t in s), dtype=np.int32, count=int(counts.sum()))
        return cls(counts, values)

    @classmethod
    def merge(cls, n: int, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Sites:
        """``n`` examples from ``(positions, counts, values)`` parts that cover each position once."""
        counts = np.full(n, -1, dtype=np.int64)
        for positions, c, _ in parts:
            counts[positions] = c
        if (counts < 0).any():
            raise ValueError(f"Sites.merge: example {int(np.flatnonzero(counts < 0)[0])} has no result")
        out = cls(counts, np.zeros(int(counts.sum()), dtype=np.int32))
        for positions, c, v in parts:
            # destination of each value: its example's offset + its rank within the example
            starts = np.repeat(out.offsets[positions], c)
            within = np.arange(len(v)) - np.repeat(np.cumsum(c) - c, c)
            out.values[starts + within] = v
        return out

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, j: int) -> list[int]:
        return self.values[self.offsets[j] : self.offsets[j + 1]].tolist()

    def to_lists(self) -> list[list[int]]:
        return [self[j] for j in range(len(self))]


def _schema():
    import pyarrow as pa

    return pa.schema([("sites", pa.large_list(pa.int32()))])


def save_insertions(path: Path, sites: Sites, meta: Mapping[str, Any]) -> None:
    """Write one stage's sites (one row per scored example, in order) and ``meta`` as a table dir
    (:mod:`ltscale.data.arrow_store`: atomic, so a preempted write leaves the old result or none)."""
    import pyarrow as pa

    def batches():
        step = 1 << 16
        for a in range(0, len(sites), step):
            b = min(a + step, len(sites))
            offsets = sites.offsets[a : b + 1] - sites.offsets[a]
            values = sites.values[sites.offsets[a] : sites.offsets[b]]
            column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
            yield pa.record_batch([column], schema=_schema())

    write_table(Path(path), _schema(), batches(), dict(meta))
    logger.info("saved insertion sites for %d examples to %s", len(sites), path)


def load_insertions(path: Path) -> tuple[Sites, dict]:
    """-> (sites, meta). The caller compares ``meta`` (fingerprint) before trusting the sites; a
    missing or damaged table raises :class:`~ltscale.data.arrow_store.StoreError`."""
    path = Path(path)
    meta = read_meta(path)
    table = read_table(path, meta)
    column = table.column("sites").combine_chunks() if table.num_rows else None
    if column is None:
        return Sites(np.zeros(0, np.int64), np.zeros(0, np.int32)), meta  # type: ignore[return-value]
    offsets = column.offsets.to_numpy(zero_copy_only=False)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return Sites(np.diff(offsets), values), meta  # type: ignore[return-value]
