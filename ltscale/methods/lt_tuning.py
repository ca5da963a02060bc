"""LT-Tuning (arXiv 2602.10229): what each curriculum stage trains on and what its latent slots are.

Stage 1 (``cot``) trains on the formatted CoT sequences. Stages 2 and 3 re-score the training set
with the *current* model (docs/method.md §11.4), insert ``<thinking>`` before response tokens whose gold
probability is below the stage's tau (docs/method.md §4, §11.2; the exact formatted sequence, §11.3),
and train with the stage's latent function: raw hidden states (stage 2, ``hidden``) or
Context-Prediction Fusion (stage 3, ``fusion``). The ``pause`` ablation keeps the same insertion
but feeds no latent content. The insertion result is stored in the stage dir and reused on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ltscale import rundir
from ltscale.config import RunConfig, StageConfig
from ltscale.data.formatting import Encoded
from ltscale.data.insertion import (
    InsertionParams,
    apply_insertions,
    gold_token_probs,
    insertion_fingerprint,
    load_insertions,
    save_insertions,
    select_sites,
)
from ltscale.methods import Collective, Method, StageContext

log = logging.getLogger(__name__)


def insertion_params(stage: StageConfig) -> InsertionParams:
    return InsertionParams(tau=stage.tau, max_sites=stage.max_sites, insert_prob=stage.insert_prob,
                           double_insert_prob=stage.double_insert_prob)


def needs_insertion(stage: StageConfig) -> bool:
    return stage.mode != "cot" and stage.max_sites > 0


def score_and_select(forward_logits, examples: Sequence[Encoded], stage: StageConfig, *, stage_index: int,
                     seed: int, batch_size: int, pad_id: int, rank: int, world_size: int,
                     all_gather: Collective) -> list[list[int]]:
    """Distributed confidence scoring: rank r scores examples r, r+W, ...; everyone gets all sites.

    Every rank scores the same number of examples (the short shards repeat their first example
    and drop the result): under ZeRO-3 each forward all-gathers, so ranks must stay in lockstep.
    """
    params = insertion_params(stage)
    mine = list(range(rank, len(examples), world_size))
    per_rank = -(-len(examples) // world_size)
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
    probs = gold_token_probs(forward_logits, [examples[i] for i in padded], batch_size=batch_size, pad_id=pad_id)
    local = {i: select_sites(probs[j], examples[i].prompt_len, params, seed=seed, sample_index=i,
                             stage=stage_index)
             for j, i in enumerate(padded[:len(mine)])}
    merged: dict[int, list[int]] = {}
    for part in all_gather(local):
        merged.update(part)
    return [merged[i] for i in range(len(examples))]


def stage_examples(examples: Sequence[Encoded], stage: StageConfig, *, stage_index: int, stage_dir: Path,
                   thinking_id: int, seed: int, compute_sites: Callable[[], list[list[int]]],
                   is_main: bool, barrier: Callable[[], None]) -> tuple[list[Encoded], dict]:
    """The stage's training sequences, with insertion sites computed once and cached on disk."""
    if not needs_insertion(stage):
        return list(examples), {"latent_tokens": 0}
    params = insertion_params(stage)
    ids = [e.id for e in examples]
    # The token ids are part of the identity: a new tokenizer, template or max_length with the same
    # example ids must not reuse stale positions.
    tokens = hashlib.sha256()
    for e in examples:
        tokens.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        tokens.update(b"|")
    fingerprint = insertion_fingerprint(params, seed, stage_index, ids, extra={"tokens": tokens.hexdigest()})
    path = stage_dir / rundir.INSERTIONS_DIR
    cached = None
    if (path / "meta.json").is_file():
        by_id, meta = load_insertions(path)
        if meta.get("fingerprint") == fingerprint:
            cached = [by_id[i] for i in ids]
            log.info("stage %d: reusing insertion sites from %s", stage_index, path)
        else:
            log.warning("stage %d: %s is stale (different data/params/seed); re-scoring", stage_index, path)
    if cached is None:
        cached = compute_sites()
        if is_main:
            save_insertions(path, ids, cached, {"fingerprint": fingerprint, "stage": stage_index,
                                                "tau": params.tau, "max_sites": params.max_sites,
                                                "insert_prob": params.insert_prob,
                                                "double_insert_prob": params.double_insert_prob, "seed": seed})
        barrier()
    out = [apply_insertions(e, s, thinking_id) for e, s in zip(examples, cached)]
    counts = np.array([len(s) for s in cached])  # over the examples the stage draws
    stats = {"latent_tokens": int(counts.sum()), "latent_per_sample": float(counts.mean()) if len(counts) else 0.0,
             "samples_with_latents": float((counts > 0).mean()) if len(counts) else 0.0}
    log.info("stage %d: %d <thinking> tokens inserted (%.2f per sample)", stage_index, stats["latent_tokens"],
             stats["latent_per_sample"])
    return out, stats


class LTTuning(Method):
    """The three-stage curriculum; stage modes come from the config (cot, hidden, fusion, pause)."""

    name = "lt_tuning"
    confidence_insertion = True

    def stage_examples(self, examples: Sequence[Encoded], ctx: StageContext) -> tuple[list[Encoded], dict]:
        stage, k, seed = ctx.cfg.stages[ctx.stage_index - 1], ctx.stage_index, ctx.cfg.train.seed

        def compute_sites() -> list[list[int]]:  # the current weights' confidence, over all ranks
            return score_and_select(ctx.forward_logits, examples, stage, stage_index=k, seed=seed,
                                    batch_size=ctx.cfg.train.scoring_batch_size, pad_id=ctx.tokenizer.pad_token_id,
                                    rank=ctx.rank, world_size=ctx.world_size, all_gather=ctx.all_gather)

        return stage_examples(examples, stage, stage_index=k, stage_dir=ctx.stage_dir, thinking_id=ctx.thinking_id,
                              seed=seed, compute_sites=compute_sites, is_main=ctx.is_main, barrier=ctx.barrier)


def rewrite_stages(cfg: RunConfig, stages: list[StageConfig], why: str, **changes) -> RunConfig:
    """A copy of ``cfg`` with new stages (and top-level section changes), logged when it differs."""
    out = dataclasses.replace(cfg, stages=stages, **changes)
    if out.to_dict() != cfg.to_dict():
        log.info("method %s: %s", cfg.method, why)
    return out
