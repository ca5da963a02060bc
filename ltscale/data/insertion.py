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
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .formatting import Encoded

logger = logging.getLogger(__name__)

__all__ = [
    "InsertionParams",
    "apply_insertions",
    "gold_token_probs",
    "insertion_fingerprint",
    "load_insertions",
    "save_insertions",
    "select_sites",
]

META_FILE = "meta.json"
_FINGERPRINT_VERSION = "ltscale-insertion-v1"


@dataclass
class InsertionParams:
    """Per-stage insertion knobs. Reference values (spec §4.2): stage 2 ``(0.3, 6, 0.85, 0.15)``,
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
    callable moves them to the model's device (the softmax then runs on the logits' device); right padding leaves every real
    position's logits unchanged under causal attention, so no position ids are needed. Examples are
    batched longest-first to waste little compute on padding; results come back in input order.
    Softmax is taken in float32 (or the logits' dtype if wider), one row at a time, so peak extra
    memory is one ``L x V`` float32 matrix rather than the whole batch's.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    result: list[np.ndarray | None] = [None] * len(examples)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            lengths = [len(examples[i].input_ids) for i in idx]
            width = max(lengths)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : lengths[row]] = torch.tensor(examples[i].input_ids, dtype=torch.long)
                mask[row, : lengths[row]] = 1
            out = forward_logits(ids, mask)
            logits = getattr(out, "logits", out)
            for row, i in enumerate(idx):
                n = lengths[row]
                p = np.full(n, np.nan, dtype=np.float32)
                if n > 1:
                    x = logits[row, : n - 1]
                    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
                    gold = ids[row, 1:n].to(x.device).unsqueeze(-1)
                    logp = x.gather(-1, gold).squeeze(-1) - torch.logsumexp(x, dim=-1)
                    p[1:] = logp.exp().cpu().numpy()
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
    """Insert ``thinking_id`` before each site; inserted labels are ``thinking_id`` (spec §10.14).

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
    example_ids: Sequence[str],
    *,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """sha256 over everything that determines a stage's sites, for stale-file detection.

    ``extra`` is for inputs only the caller knows (e.g. the scoring model's global step or a
    tokenizer hash); it must be JSON-serialisable.
    """
    h = hashlib.sha256()
    payload = {
        "version": _FINGERPRINT_VERSION,
        "params": asdict(params),
        "seed": int(seed),
        "stage": int(stage),
        "n": len(example_ids),
        "extra": dict(extra or {}),
    }
    h.update(json.dumps(payload, sort_keys=True).encode())
    for rid in example_ids:
        h.update(b"\0")
        h.update(str(rid).encode())
    return h.hexdigest()


def _features():
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features({"id": datasets.Value("string"), "sites": list_type(datasets.Value("int32"))})


def save_insertions(
    path: Path, ids: Sequence[str], sites: Sequence[Sequence[int]], meta: Mapping[str, Any]
) -> None:
    """Write one stage's sites as an Arrow dataset (``id``, ``sites``) plus ``meta.json``.

    Atomic for readers: everything is written into a temp dir next to ``path`` and renamed into
    place, so a job killed mid-write (Slurm preemption) leaves either the old result or none, never
    a half-written one that resume would trust. An existing ``path`` is replaced.
    """
    import datasets

    path = Path(path)
    if len(ids) != len(sites):
        raise ValueError(f"save_insertions: {len(ids)} ids but {len(sites)} site lists")
    if len(set(ids)) != len(ids):
        raise ValueError("save_insertions: duplicate example ids")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        ds = datasets.Dataset.from_dict(
            {"id": [str(i) for i in ids], "sites": [[int(t) for t in s] for s in sites]}, features=_features()
        )
        ds.save_to_disk(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(dict(meta), indent=2, sort_keys=True))
        if path.exists():
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old.exists() and not path.exists():
                old.rename(path)  # put the previous result back rather than lose it
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved insertion sites for %d examples to %s", len(ids), path)


def load_insertions(path: Path) -> tuple[dict[str, list[int]], dict]:
    """-> ({example id: sites}, meta). The caller compares ``meta`` (fingerprint) before trusting it."""
    import datasets

    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not an insertion result (no {META_FILE})")
    meta = json.loads(meta_file.read_text())
    ds = datasets.load_from_disk(str(path))
    columns = ds[:]
    return dict(zip(columns["id"], [list(s) for s in columns["sites"]])), meta
