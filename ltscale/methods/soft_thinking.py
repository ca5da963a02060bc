"""Soft-Thinking (Zhang et al., arXiv 2505.15778; docs/baselines.md §4): training-free soft decoding.

While a row is in soft mode, its next input is a *concept token*: the probability-weighted mixture
``sum_i p_i E[id_i]`` of the input embeddings of the top-k (then top-p) tokens of
``softmax(logits / T)``, renormalised; the recorded token is the top-1 id. Soft mode ends by
**Cold Stop** -- at the step where the full-distribution entropy has been below
``entropy_threshold`` for ``cold_stop_steps`` consecutive steps, that step emits explicitly (the
``think_end`` token when one is configured, else the argmax) -- or when the top-1 token is
``think_end``. After that the row decodes greedily with ordinary embeddings.

Decisions: our CoT-SFT checkpoints have no ``</think>``, so ``think_end`` defaults to none and Cold
Stop alone ends thinking (docs/baselines.md §4.2); ``<thinking>`` is masked (the
method works on a checkpoint's plain vocabulary); EOS in soft mode ends the row as in greedy
decoding. Mean latent tokens = soft steps. The per-row state (mode, low-entropy counter) is
tensors that follow their row through the shared decode loop (``generation.py``, continuous
batching).

As a training config, ``method: soft_thinking`` trains the CoT-SFT checkpoint it decodes (the
``cot`` stages) and evaluates it with Soft-Thinking; ``ltscale eval --method soft_thinking``
applies it to any checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ltscale.config import ConfigError, RunConfig, SoftThinkingConfig, check_top_p
from ltscale.methods import Checkpoint, Decoding
from ltscale.methods.cot import CoT
from ltscale.model.generation import DecodeRule, Rows


@dataclass
class SoftParams(SoftThinkingConfig):
    """The method's settings with its tokens as ids."""

    think_end_id: int | None = None  # soft_thinking.think_end's id
    exclude_id: int | None = None  # masked before everything (<thinking>)


def concept_weights(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """-> (entropy (B,), top ids (B,k), renormalised weights (B,k)).

    Entropy is taken on the full temperature-scaled distribution, before filtering (as the
    original). Top-p keeps the smallest prefix of the sorted top-k whose mass reaches ``top_p``
    (the crossing token included), at least one token.
    """
    x = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    logp = torch.log_softmax(x / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num(0.0).sum(-1)  # 0*log0 = 0 for masked tokens
    vals, ids = p.topk(min(top_k, p.shape[-1]), dim=-1)
    before = vals.cumsum(-1) - vals
    keep = before < top_p
    keep[:, 0] = True
    w = vals * keep
    return entropy, ids, w / w.sum(-1, keepdim=True)


@dataclass
class SoftState:
    soft: torch.Tensor  # (B,) bool: still in soft mode
    low: torch.Tensor  # (B,) long: consecutive low-entropy soft steps so far

    @classmethod
    def start(cls, bsz: int, device) -> SoftState:
        return cls(
            torch.ones(bsz, dtype=torch.bool, device=device),
            torch.zeros(bsz, dtype=torch.long, device=device),
        )


def soft_step(logits: torch.Tensor, state: SoftState, params: SoftParams):
    """One decision step for every row -> (token (B,), soft_now (B,), ids, weights, new state).

    ``soft_now``: this step's input is the concept token. A row leaves soft mode at the step its
    low-entropy counter reaches ``cold_stop_steps`` (that step is explicit) or whose top-1 id is
    ``think_end_id``; it never re-enters it.
    """
    if params.exclude_id is not None:
        logits = logits.clone()
        logits[:, params.exclude_id] = float("-inf")
    entropy, ids, w = concept_weights(logits, params.temperature, params.top_k, params.top_p)
    top1 = ids[:, 0]
    low = torch.where(
        state.soft & (entropy < params.entropy_threshold), state.low + 1, torch.zeros_like(state.low)
    )
    stop = state.soft & (low >= params.cold_stop_steps)
    ended = (
        state.soft & (top1 == params.think_end_id)
        if params.think_end_id is not None
        else torch.zeros_like(stop)
    )
    soft_now = state.soft & ~stop & ~ended
    explicit = logits.argmax(dim=-1)
    if params.think_end_id is not None:
        explicit = torch.where(stop, torch.full_like(explicit, params.think_end_id), explicit)
    token = torch.where(soft_now, top1, explicit)
    return token, soft_now, ids, w, SoftState(soft=soft_now, low=low)


@dataclass
class SoftThinkingRule(DecodeRule):
    """Soft-Thinking in the shared decode loop: per-row soft mode and low-entropy counter follow
    the row; ``num_latent`` counts soft steps."""

    params: SoftParams

    def start(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        state = SoftState.start(n, device)
        return {"soft": state.soft, "low": state.low}

    def choose(self, lm, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        state = SoftState(soft=rows.state["soft"], low=rows.state["low"])
        token, soft_now, ids, w, state = soft_step(rows.logits, state, self.params)
        # ids/w: this step's concept token, used by next_inputs for the rows still decoding
        rows.state.update(soft=state.soft, low=state.low, ids=ids, w=w)
        return token, soft_now

    def next_inputs(self, lm, rows: Rows, tokens: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        ids, w = rows.state.pop("ids"), rows.state.pop("w")
        embeds = lm.embed(tokens)
        if bool(latent.any()):
            concept = (w.to(embeds.dtype)[..., None] * lm.embed(ids)).sum(dim=1)
            embeds = torch.where(latent[:, None], concept, embeds)
        return embeds


def check_params(st: SoftThinkingConfig, key: str = "soft_thinking") -> None:
    if st.temperature <= 0:
        raise ConfigError(f"{key}.temperature: must be > 0")
    if st.top_k < 1:
        raise ConfigError(f"{key}.top_k: must be >= 1")
    check_top_p(st.top_p, f"{key}.top_p")
    if st.cold_stop_steps < 1:
        raise ConfigError(f"{key}.cold_stop_steps: must be >= 1")


class SoftThinking(CoT):
    name = "soft_thinking"
    tiny_config = "tiny-soft-thinking.yaml"
    trains = False  # compare decodes the CoT checkpoint with it

    def resolve(self, cfg: RunConfig) -> RunConfig:
        check_params(cfg.soft_thinking)
        return super().resolve(cfg)

    def checkpoint_meta(
        self, cfg: RunConfig, stage_index: int, special_ids: dict[str, int]
    ) -> dict[str, Any]:
        return {"method": self.name, "soft_thinking": dataclasses.asdict(cfg.soft_thinking)}

    def decoding(self, ckpt: Checkpoint, cfg: RunConfig | None = None) -> Decoding:
        # the run's config when the trainer evaluates; else what the checkpoint saved (+ CLI options)
        st = (
            cfg.soft_thinking if cfg is not None else SoftThinkingConfig(**ckpt.meta.get("soft_thinking", {}))
        )
        check_params(st)
        end_id = None
        if st.think_end is not None:
            ids = ckpt.tokenizer.encode(st.think_end, add_special_tokens=False)
            if len(ids) != 1:
                raise ConfigError(f"soft_thinking.think_end: {st.think_end!r} is {len(ids)} tokens, not one")
            end_id = ids[0]
        params = SoftParams(
            **dataclasses.asdict(st), think_end_id=end_id, exclude_id=ckpt.lm.thinking_token_id
        )
        return Decoding(
            model=ckpt.lm, rule=SoftThinkingRule(params), without_thinking=True, meta=dataclasses.asdict(st)
        )
