"""Soft-Thinking (Zhang et al., arXiv 2505.15778; baselines.md §7): training-free soft decoding.

While a row is in soft mode, its next input is a *concept token*: the probability-weighted mixture
``sum_i p_i E[id_i]`` of the input embeddings of the top-k (then top-p) tokens of
``softmax(logits / T)``, renormalised; the recorded token is the top-1 id. Soft mode ends by
**Cold Stop** -- at the step where the full-distribution entropy has been below
``entropy_threshold`` for ``cold_stop_steps`` consecutive steps, that step emits explicitly (the
``think_end`` token when one is configured, else the argmax) -- or when the top-1 token is
``think_end``. After that the row decodes greedily with ordinary embeddings.

Decisions: our CoT-SFT checkpoints have no ``</think>``, so ``think_end`` defaults to none and Cold
Stop alone ends thinking (baselines.md §7b asks to document this); ``<thinking>`` is masked (the
method works on a checkpoint's plain vocabulary); EOS in soft mode ends the row as in greedy
decoding. Mean latent tokens = soft steps. All per-row state (mode, low-entropy counter,
finished) is tensors; the batch runs in lockstep with a KV cache, like ``generation.py``.

As a training config, ``method: soft_thinking`` trains the CoT-SFT checkpoint it decodes (the
``cot`` stages) and evaluates it with Soft-Thinking; ``ltscale eval --method soft_thinking``
applies it to any checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ltscale.config import ConfigError, RunConfig, SoftThinkingConfig
from ltscale.methods import Inference
from ltscale.methods.cot import CoT
from ltscale.model.generation import GenerationOutput
from ltscale.model.rollout import additive_mask


@dataclass
class SoftParams:
    temperature: float = 0.6
    top_k: int = 10
    top_p: float = 0.95
    entropy_threshold: float = 0.01
    cold_stop_steps: int = 256
    think_end_id: int | None = None
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


@torch.no_grad()
def soft_generate(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    *,
    params: SoftParams,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """Batched Soft-Thinking decode with a KV cache; ``num_latent`` = soft steps per row."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device, bsz = input_ids.device, input_ids.shape[0]
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    valid = attention_mask.bool()
    pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0).masked_fill(~valid, 0)
    decoder = lm.decoder()
    cache = DynamicCache(config=lm.base.config)
    embeds = lm.embed(input_ids)
    out = decoder(
        inputs_embeds=embeds,
        attention_mask=additive_mask(valid, pos, valid, pos, embeds.dtype),
        position_ids=pos,
        cache=cache,
        use_cache=True,
    )
    rows = torch.arange(bsz, device=device)
    logits = lm.lm_head(out.last_hidden_state[rows, valid.long().cumsum(dim=1).argmax(dim=1)])
    key_valid, key_pos, next_pos = valid, pos, valid.long().sum(dim=1)
    seqs = torch.full((bsz, max_new_tokens), pad, dtype=torch.long, device=device)
    n_soft = torch.zeros(bsz, dtype=torch.long, device=device)
    lengths = torch.zeros(bsz, dtype=torch.long, device=device)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    state = SoftState.start(bsz, device)
    for step in range(max_new_tokens):
        token, soft_now, ids, w, state = soft_step(logits, state, params)
        active = ~finished
        token = torch.where(finished, torch.full_like(token, pad), token)
        soft_now = soft_now & active
        seqs[:, step] = token
        lengths += active.long()
        n_soft += soft_now.long()
        if eos_token_id is not None:
            finished = finished | (active & (token == eos_token_id))
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        step_embeds = lm.embed(token)
        if bool(soft_now.any()):
            concept = (w.to(step_embeds.dtype)[..., None] * lm.embed(ids)).sum(dim=1)
            step_embeds = torch.where(soft_now[:, None], concept, step_embeds)
        alive = ~finished
        key_valid = torch.cat([key_valid, alive[:, None]], dim=1)
        key_pos = torch.cat([key_pos, next_pos[:, None]], dim=1)
        mask = additive_mask(key_valid, key_pos, alive[:, None], next_pos[:, None], step_embeds.dtype)
        out = decoder(
            inputs_embeds=step_embeds[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            cache=cache,
            use_cache=True,
        )
        logits = lm.lm_head(out.last_hidden_state[:, 0])
        next_pos = next_pos + alive.long()
    return GenerationOutput(sequences=seqs, num_latent=n_soft, lengths=lengths)


class SoftThinkingInference(nn.Module):
    """``evaluate``'s model: Soft-Thinking decoding of a ``LatentLM`` checkpoint."""

    def __init__(self, lm: nn.Module, params: SoftParams):
        super().__init__()
        self.lm = lm
        self.params = params
        self.thinking_token_id = lm.thinking_token_id

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens: int = 256,
        *,
        eos_token_id=None,
        pad_token_id=None,
        without_thinking: bool = True,
    ):
        return soft_generate(
            self.lm,
            input_ids,
            attention_mask,
            max_new_tokens,
            params=self.params,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


def check_params(st: SoftThinkingConfig, key: str = "soft_thinking") -> None:
    if st.temperature <= 0:
        raise ConfigError(f"{key}.temperature: must be > 0")
    if st.top_k < 1:
        raise ConfigError(f"{key}.top_k: must be >= 1")
    if not 0.0 < st.top_p <= 1.0:
        raise ConfigError(f"{key}.top_p: {st.top_p} outside (0, 1]")
    if st.cold_stop_steps < 1:
        raise ConfigError(f"{key}.cold_stop_steps: must be >= 1")


class SoftThinking(CoT):
    name = "soft_thinking"

    def resolve(self, cfg: RunConfig) -> RunConfig:
        check_params(cfg.soft_thinking)
        return super().resolve(cfg)

    def checkpoint_meta(
        self, cfg: RunConfig, stage_index: int, special_ids: dict[str, int]
    ) -> dict[str, Any]:
        return {"method": self.name, "soft_thinking": dataclasses.asdict(cfg.soft_thinking)}

    def inference(
        self, lm, tokenizer, meta: dict[str, Any], cfg: RunConfig | None = None, *, chat: bool | None = None
    ) -> Inference:
        # the run's config when the trainer evaluates; else what the checkpoint saved (+ CLI options)
        st = cfg.soft_thinking if cfg is not None else SoftThinkingConfig(**meta.get("soft_thinking", {}))
        check_params(st)
        end_id = None
        if st.think_end is not None:
            ids = tokenizer.encode(st.think_end, add_special_tokens=False)
            if len(ids) != 1:
                raise ConfigError(f"soft_thinking.think_end: {st.think_end!r} is {len(ids)} tokens, not one")
            end_id = ids[0]
        params = SoftParams(
            temperature=st.temperature,
            top_k=st.top_k,
            top_p=st.top_p,
            entropy_threshold=st.entropy_threshold,
            cold_stop_steps=st.cold_stop_steps,
            think_end_id=end_id,
            exclude_id=lm.thinking_token_id,
        )
        return Inference(
            model=SoftThinkingInference(lm, params), without_thinking=True, meta=dataclasses.asdict(st)
        )
