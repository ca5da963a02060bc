"""Everything a run needs before its first step: data, tokenizer, model, schedule, sampler.

Split out of ``trainer.py`` so the loop there reads top to bottom. Nothing here talks to other
ranks except through the callables it is handed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ltscale import rundir
from ltscale.batching import stage_steps  # noqa: F401 - where the trainer and tests have found it
from ltscale.config import ConfigError, RunConfig
from ltscale.data import Record, iter_records, load_records, synthetic
from ltscale.data.arrow_store import StoreError
from ltscale.data.build import ONE_PROCESS, Ranks, on_rank0
from ltscale.data.formatting import assistant_text
from ltscale.data.sources import open_source
from ltscale.data.synthetic import synthetic_splits
from ltscale.data.tokenizer import add_thinking_token, load_tokenizer, train_sentencepiece
from ltscale.data.trainset import (
    TrainSet,
    build_trainset,
    code_fingerprint,
    tokenizer_fingerprint,
)
from ltscale.engine.engine import ModelConstruction, count_parameters
from ltscale.engine.io_wait import io_timeout_for
from ltscale.methods import get_method
from ltscale.model import LatentLM
from ltscale.model.builder import build_base_model, embedding_parameters, fit_vocab, init_thinking_embedding
from ltscale.model.device import resolve_precision

log = logging.getLogger(__name__)

FUSED_TO_IMPL = {"auto": "auto", "on": "fused", "off": "torch"}
# A sentencepiece tokenizer of a few hundred pieces is learned from the first 100k texts (50k
# problems) of the training data: more only costs rank 0 time before the first step. The tiny
# default's 16k problems are below it.
SPM_TRAIN_TEXTS = 100_000


@dataclass
class RunData:
    tokenizer: object
    thinking_id: int
    train: TrainSet  # memory-mapped from the run dir (ltscale.data.trainset)
    eval_records: list[Record]
    special_ids: dict[str, int] = field(default_factory=dict)  # the method's extra tokens -> ids


def _synthetic(cfg: RunConfig, which: str) -> list[Record]:
    s = cfg.data.synthetic
    # The test split does not depend on n_train (synthetic_splits), so eval draws no training problems.
    n_train = s.n_train if which == "train" else 0
    train, test = synthetic_splits(n_train, s.n_test, s.seed, min_steps=s.min_steps, max_steps=s.max_steps,
                                   max_value=s.max_value, max_operand=s.max_operand)
    return train if which == "train" else test


def load_split_records(cfg: RunConfig, which: str) -> list[Record]:
    """The records of ``data.train`` or ``data.eval`` as a list (eval sets; small data)."""
    d = cfg.data
    source = d.train if which == "train" else d.eval
    split = d.train_split if which == "train" else d.eval_split
    limit = d.train_limit if which == "train" else d.eval_limit
    if source == "synthetic":
        records = _synthetic(cfg, which)
        return records[:limit] if limit is not None else records
    return load_records(source, split=split, strict=d.strict, limit=limit)


def _train_records(cfg: RunConfig) -> Iterable[Record]:
    """The training records as a stream (rank 0 reads them once to tokenize; never kept as a list)."""
    d = cfg.data
    if d.train == "synthetic":
        return _synthetic(cfg, "train")[: d.train_limit]
    return iter_records(d.train, split=d.train_split, strict=d.strict, limit=d.train_limit)


def _train_identity(cfg: RunConfig) -> dict:
    """What identifies the training data: every byte read (hashed), or the generator's settings."""
    d = cfg.data
    if d.train == "synthetic":
        return {"synthetic": asdict(d.synthetic), "limit": d.train_limit, "code": code_fingerprint([synthetic])}
    src = open_source(d.train, d.train_split)
    return {"source": src.name, "content": src.content_hash(), "split": d.train_split, "limit": d.train_limit,
            "strict": d.strict}


def prepare_tokenizer(cfg: RunConfig, run_dir: Path, *, ranks: Ranks = ONE_PROCESS):
    """Load the configured tokenizer, or train a sentencepiece one once (rank 0) into the run dir."""
    m = cfg.model
    if m.tokenizer == "sentencepiece":
        out = run_dir / rundir.TOKENIZER_DIR

        def train() -> None:
            if (out / "tokenizer.json").is_file():
                return
            tmp = run_dir / f".tmp-{rundir.TOKENIZER_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            texts = (t for r in _train_records(cfg) for t in (r.question, assistant_text(r)))
            train_sentencepiece(itertools.islice(texts, SPM_TRAIN_TEXTS), tmp, vocab_size=m.tokenizer_vocab_size,
                                seed=cfg.train.seed)
            tmp.rename(out)

        on_rank0(train, ranks)
        return load_tokenizer(str(out))
    source = m.tokenizer or m.name_or_path
    kwargs = {"gguf_file": m.gguf_file} if m.gguf_file and source == m.name_or_path else {}
    return load_tokenizer(source, trust_remote_code=m.trust_remote_code, **kwargs)


def prepare_train(cfg: RunConfig, run_dir: Path, tokenizer, *, ranks: Ranks = ONE_PROCESS) -> TrainSet:
    """The run's tokenized training set: reused when its fingerprint matches (rank 0 checks), else
    built (rank 0 alone reads the training data; every rank tokenizes a share, ltscale.data.build);
    every rank then maps the table rank 0 vouched for."""
    d, path = cfg.data, rundir.train_data_dir(run_dir)

    def check() -> tuple[str, bool]:
        what = {"data": _train_identity(cfg), "tokenizer": tokenizer_fingerprint(tokenizer), "code": code_fingerprint(),
                "format": {"chat": cfg.model.use_chat_template, "max_length": d.max_length, "strict": d.strict}}
        fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
        try:
            TrainSet(path, fingerprint=fingerprint)
            log.info("training data: reusing %s", path)
            return fingerprint, True
        except StoreError as why:
            log.info("training data: tokenizing into %s on %d rank(s) (%s)", path, ranks.world, why)
            return fingerprint, False

    fingerprint, fresh = on_rank0(check, ranks)
    if not fresh:
        t0 = time.perf_counter()
        rows = build_trainset(path, _train_records(cfg) if ranks.rank == 0 else None, tokenizer,
                              fingerprint=fingerprint, use_chat_template=cfg.model.use_chat_template,
                              max_length=d.max_length, strict=d.strict, ranks=ranks)
        log.info("training data: %d examples tokenized in %.1f s", rows, time.perf_counter() - t0)
    return TrainSet(path, fingerprint=fingerprint)


def prepare_data(cfg: RunConfig, run_dir: Path, *, ranks: Ranks = ONE_PROCESS) -> RunData:
    """Tokenizer, the training set and the eval records; ``ranks`` share the work (ltscale.data.build)."""
    eval_records = load_split_records(cfg, "eval")
    tokenizer = prepare_tokenizer(cfg, run_dir, ranks=ranks)
    thinking_id = add_thinking_token(tokenizer, cfg.model.thinking_token)
    method = get_method(cfg.method)
    special_ids = {tok: add_thinking_token(tokenizer, tok) for tok in method.extra_tokens(cfg)}
    train = prepare_train(cfg, run_dir, tokenizer, ranks=ranks)
    method.check_data(cfg, train)
    return RunData(tokenizer=tokenizer, thinking_id=thinking_id, train=train, eval_records=eval_records,
                   special_ids=special_ids)


def training_precision(cfg: RunConfig) -> tuple[torch.dtype, str]:
    """``(model dtype, DeepSpeed precision)`` of a run: one rule for ``model.dtype`` and
    ``engine.precision`` (``ltscale.model.device.resolve_precision``); a contradiction is a ConfigError."""
    try:
        return resolve_precision(cfg.model.dtype, cfg.engine.precision)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def io_timeout(cfg: RunConfig, lm: torch.nn.Module, world_size: int) -> float:
    """``engine.io_timeout_s``, or when null the bound sized to this model (engine/io_wait.py)."""
    if cfg.engine.io_timeout_s is not None:
        return cfg.engine.io_timeout_s
    return io_timeout_for(count_parameters(lm), world_size, export_bytes_per_param=training_precision(cfg)[0].itemsize,
                          floor_s=cfg.engine.collective_timeout_s)


def build_latent_model(cfg: RunConfig, data: RunData, ds_config: dict | None = None) -> LatentLM:
    """The same initial weights on every rank (seeded), ``<thinking>`` rows initialised per spec.

    Built in the training precision (:func:`training_precision`). With the run's rendered DeepSpeed
    config, built for that engine: under ZeRO-3 partitioned as it is created, so no rank holds the
    whole model (``ltscale.engine.engine.ModelConstruction``); without it, whole in this process.
    """
    m = cfg.model
    dtype, _ = training_precision(cfg)
    construction = ModelConstruction(ds_config) if ds_config is not None else None
    building = construction.building() if construction is not None else contextlib.nullcontext()
    with building:
        base = build_base_model(name_or_path=m.name_or_path, init=m.init, vocab_size=len(data.tokenizer),
                                dtype=dtype, attn_implementation=m.attn_implementation,
                                gguf_file=m.gguf_file, trust_remote_code=m.trust_remote_code, seed=cfg.train.seed)
        fit_vocab(base, data.tokenizer, m.pad_vocab_to_multiple_of)
    method = get_method(cfg.method)
    params = embedding_parameters(base)
    with construction.gathered(params) if construction is not None else contextlib.nullcontext():
        init_thinking_embedding(base, data.tokenizer, data.thinking_id, m.thinking_init_token)
        method.init_model(base, data.tokenizer, cfg, data.special_ids)
    first = cfg.stages[0]
    lm = LatentLM(base, data.thinking_id, mode=first.mode, alpha=first.alpha, temperature=first.temperature,
                  top_p=first.top_p, adapter=m.adapter, adapter_hidden=m.adapter_hidden,
                  gradient_checkpointing=m.gradient_checkpointing, fusion_impl=FUSED_TO_IMPL[cfg.engine.fused],
                  packed_passes=cfg.engine.packed_passes, vocab_tokens=len(data.tokenizer))
    if lm.adapter is not None:
        lm.adapter.to(dtype)
    return method.wrap_model(lm, cfg, data)


@dataclass
class Schedule:
    """Optimizer steps per stage and the LR multiplier as a pure function of the global step.

    Stage k occupies global steps ``[start[k], start[k+1])``. ``continue`` runs one warmup+decay
    over the whole curriculum (the official code: one HF Trainer run); ``reset`` restarts it at
    every stage. Being a function of the global step only, it resumes exactly.
    """

    steps: list[int]
    warmup_ratio: float
    kind: str
    strategy: str
    lr_scales: list[float] | None = None

    @property
    def start(self) -> list[int]:
        return [sum(self.steps[:k]) for k in range(len(self.steps) + 1)]

    def _shape(self, step: int, total: int) -> float:
        warm = int(self.warmup_ratio * total)
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(total - warm, 1)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    def stage_of(self, step: int) -> int:
        """0-based stage index of a global step (steps past the end belong to the last stage)."""
        starts = self.start
        return max(i for i in range(len(self.steps)) if starts[i] <= step) if step < starts[-1] else len(self.steps) - 1

    def multiplier(self, step: int) -> float:
        k = self.stage_of(step)
        scale = self.lr_scales[k] if self.lr_scales else 1.0
        if self.strategy == "continue":
            return scale * self._shape(step, sum(self.steps))
        return scale * self._shape(step - self.start[k], self.steps[k])


class Sampler:
    """Deterministic sample order per (seed, stage): epochs of fresh permutations, then sliced.

    Position = (stage, step), so resuming needs no iterator state: step s, micro-batch a of rank r
    reads ``order[(s*accum + a)*micro*world + r*micro :][:micro]``. The global batch of a step is
    the same set for any world size with the same ``micro*accum*world``.
    """

    def __init__(self, n: int, *, seed: int, micro: int, accum: int, world: int, rank: int):
        self.n, self.seed, self.micro, self.accum, self.world, self.rank = n, seed, micro, accum, world, rank
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def order(self, stage: int, n_steps: int) -> np.ndarray:
        key = (stage, n_steps)
        if key not in self._orders:
            need = n_steps * self.micro * self.accum * self.world
            epochs = -(-need // self.n)
            rng = np.random.default_rng([self.seed, stage])
            self._orders[key] = np.concatenate([rng.permutation(self.n) for _ in range(epochs)])
        return self._orders[key]

    def used_indices(self, stage: int, n_steps: int) -> np.ndarray:
        """Every example index the stage will draw, sorted (what its confidence pass must score)."""
        need = n_steps * self.micro * self.accum * self.world
        return np.unique(self.order(stage, n_steps)[:need])

    def indices(self, stage: int, n_steps: int, step: int, micro_step: int) -> list[int]:
        start = (step * self.accum + micro_step) * self.micro * self.world + self.rank * self.micro
        return self.order(stage, n_steps)[start:start + self.micro].tolist()
