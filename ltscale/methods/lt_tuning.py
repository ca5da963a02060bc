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
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ltscale import rundir
from ltscale.config import RunConfig, StageConfig
from ltscale.data.arrow_store import StoreError
from ltscale.data.formatting import Encoded
from ltscale.data.insertion import (
    InsertionParams,
    Sites,
    apply_insertions,
    insertion_fingerprint,
    iter_gold_token_probs,
    load_insertions,
    save_insertions,
    select_sites,
)
from ltscale.data.trainset import Examples
from ltscale.methods import Collective, Method, StageContext

log = logging.getLogger(__name__)


def insertion_params(stage: StageConfig) -> InsertionParams:
    return InsertionParams(tau=stage.tau, max_sites=stage.max_sites, insert_prob=stage.insert_prob,
                           double_insert_prob=stage.double_insert_prob)


def needs_insertion(stage: StageConfig) -> bool:
    return stage.mode != "cot" and stage.max_sites > 0


def score_and_select(forward_logits, examples: Sequence[Encoded], stage: StageConfig, *, stage_index: int,
                     seed: int, batch_size: int, pad_id: int, rank: int, world_size: int,
                     all_gather: Collective) -> Sites:
    """Distributed confidence scoring: rank r scores examples r, r+W, ...; everyone gets all sites.

    Every rank scores the same number of examples (the short shards repeat their first example
    and drop the result): under ZeRO-3 each forward all-gathers, so ranks must stay in lockstep.
    Each example's probabilities are reduced to its sites as its batch finishes, and ranks
    exchange packed arrays, so no rank holds per-example Python objects for the whole stage.
    """
    params = insertion_params(stage)
    examples = Examples.of(examples)
    mine = np.arange(rank, len(examples), world_size)
    per_rank = -(-len(examples) // world_size)
    padded = np.concatenate([mine, np.full(per_rank - len(mine), mine[0] if len(mine) else 0, dtype=np.int64)])
    subset = Examples(examples, padded)
    local: dict[int, list[int]] = {}
    for j, probs in iter_gold_token_probs(forward_logits, subset, batch_size=batch_size, pad_id=pad_id,
                                          lengths=examples.lengths()[padded]):
        if j < len(mine):
            i = int(mine[j])
            local[i] = select_sites(probs, int(examples.prompt_len(i)), params, seed=seed, sample_index=i,
                                    stage=stage_index)
    positions = np.array(sorted(local), dtype=np.int64)
    packed = Sites.from_lists([local[i] for i in positions])
    return Sites.merge(len(examples), all_gather((positions, packed.counts, packed.values)))


def stage_examples(examples: Sequence[Encoded], stage: StageConfig, *, stage_index: int, stage_dir: Path,
                   thinking_id: int, seed: int, compute_sites: Callable[[], Sites],
                   is_main: bool, barrier: Callable[[], None]) -> tuple[Examples, dict]:
    """The stage's training sequences, with insertion sites computed once and cached on disk."""
    examples = Examples.of(examples)
    if not needs_insertion(stage):
        return examples, {"latent_tokens": 0}
    params = insertion_params(stage)
    # The examples' ids and token ids are part of the identity: a new tokenizer, template or
    # max_length with the same example ids must not reuse stale positions.
    fingerprint = insertion_fingerprint(params, seed, stage_index, examples.fingerprint())
    path = stage_dir / rundir.INSERTIONS_DIR
    sites = None
    try:
        saved, meta = load_insertions(path)
        if meta.get("fingerprint") == fingerprint and len(saved) == len(examples):
            sites = saved
            log.info("stage %d: reusing insertion sites from %s", stage_index, path)
        else:
            log.warning("stage %d: %s is stale (different data/params/seed); re-scoring", stage_index, path)
    except StoreError as why:
        if (path / "meta.json").exists() or path.exists():
            log.warning("stage %d: %s; re-scoring", stage_index, why)
    if sites is None:
        sites = compute_sites()
        if is_main:
            save_insertions(path, sites, {"fingerprint": fingerprint, "stage": stage_index, "tau": params.tau,
                                          "max_sites": params.max_sites, "insert_prob": params.insert_prob,
                                          "double_insert_prob": params.double_insert_prob, "seed": seed})
        barrier()
    counts = sites.counts  # over the examples the stage draws
    out = examples.map(lambda j, e: apply_insertions(e, sites[j], thinking_id), latent_counts=counts)
    stats = {"latent_tokens": int(counts.sum()), "latent_per_sample": float(counts.mean()) if len(counts) else 0.0,
             "samples_with_latents": float((counts > 0).mean()) if len(counts) else 0.0}
    log.info("stage %d: %d <thinking> tokens inserted (%.2f per sample)", stage_index, stats["latent_tokens"],
             stats["latent_per_sample"])
    return out, stats


class LTTuning(Method):
    """The three-stage curriculum; stage modes come from the config (cot, hidden, fusion, pause)."""

    name = "lt_tuning"
    confidence_insertion = True

    def stage_examples(self, examples: Sequence[Encoded], ctx: StageContext) -> tuple[Examples, dict]:
        stage, k, seed = ctx.cfg.stages[ctx.stage_index - 1], ctx.stage_index, ctx.cfg.train.seed

        def compute_sites() -> Sites:  # the current weights' confidence, over all ranks
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
