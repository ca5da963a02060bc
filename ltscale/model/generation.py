"""Batched greedy latent decoding with a KV cache (spec §5).

Each row switches to latent mode on its own whenever its argmax is ``<thinking>``: that step's
input is the latent function of the row's current hidden state and logits instead of a vocabulary
row. Rows stop independently at EOS; finished rows feed masked padding until the whole batch is
done. Prompts may be left or right padded: positions and visibility come from the same explicit
4D mask and true positions as the training rollout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ltscale.model.rollout import additive_mask

if TYPE_CHECKING:
    from ltscale.model.latent_lm import LatentLM


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, max_new_tokens) generated ids; <thinking> id at latent steps; pad after EOS
    num_latent: torch.Tensor  # (B,) latent steps taken
    lengths: torch.Tensor  # (B,) tokens generated, EOS included


@torch.no_grad()
def generate_batched(lm: LatentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     max_new_tokens: int, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                     without_thinking: bool = False, forced: torch.Tensor | None = None) -> GenerationOutput:
    """``forced``: ids emitted at the first ``len(forced)`` steps instead of the argmax (Coconut's
    fixed ``<thinking>`` x n + end marker); a forced ``<thinking>`` is a latent step like any other."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = input_ids.device
    bsz = input_ids.shape[0]
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    think = lm.thinking_token_id
    rows = torch.arange(bsz, device=device)
    valid = attention_mask.bool()
    if not bool(valid.any(dim=1).all()):
        raise ValueError("generate: every prompt needs at least one real token")
    pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0).masked_fill(~valid, 0)
    decoder = lm.decoder()
    cache = DynamicCache(config=lm.base.config)
    embeds = lm.embed(input_ids)
    out = decoder(inputs_embeds=embeds, attention_mask=additive_mask(valid, pos, valid, pos, embeds.dtype),
                  position_ids=pos, cache=cache, use_cache=True)
    last = valid.long().cumsum(dim=1).argmax(dim=1)  # column of each row's last real token
    hidden = out.last_hidden_state[rows, last]
    logits = lm.lm_head(hidden)
    key_valid, key_pos = valid, pos
    next_pos = valid.long().sum(dim=1)

    seqs = torch.full((bsz, max_new_tokens), pad, dtype=torch.long, device=device)
    n_latent = torch.zeros(bsz, dtype=torch.long, device=device)
    lengths = torch.zeros(bsz, dtype=torch.long, device=device)
    # Rows that reached EOS leave the batch (cache rows included): computing them until the
    # longest row ends cost ~45% of batch-32 decode steps on the tiny model (bench/decoding.py).
    # ``live`` maps the computed rows to output rows; per-row results are unchanged.
    live = rows
    for step in range(max_new_tokens):
        scores = logits
        if without_thinking:
            scores = scores.clone()
            scores[:, think] = float("-inf")
        nxt = scores.argmax(dim=-1)
        if forced is not None and step < forced.numel():
            nxt = forced.reshape(-1)[step].to(nxt).expand_as(nxt)
        seqs[live, step] = nxt
        lengths[live] += 1
        is_latent = nxt == think
        n_latent[live] += is_latent.long()
        done = nxt == eos_token_id if eos_token_id is not None else torch.zeros_like(is_latent)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            live, nxt, is_latent, hidden, logits = live[keep], nxt[keep], is_latent[keep], hidden[keep], logits[keep]
            key_valid, key_pos, next_pos = key_valid[keep], key_pos[keep], next_pos[keep]
        step_embeds = lm.embed(nxt)
        if lm.uses_rollout and bool(is_latent.any()):
            latent = lm.latent_input(hidden, logits).to(step_embeds.dtype)
            step_embeds = torch.where(is_latent[:, None], latent, step_embeds)
        alive = torch.ones_like(is_latent)
        key_valid = torch.cat([key_valid, alive[:, None]], dim=1)
        key_pos = torch.cat([key_pos, next_pos[:, None]], dim=1)
        mask = additive_mask(key_valid, key_pos, alive[:, None], next_pos[:, None], step_embeds.dtype)
        out = decoder(inputs_embeds=step_embeds[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                      cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, 0]
        logits = lm.lm_head(hidden)
        next_pos = next_pos + alive.long()
    return GenerationOutput(sequences=seqs, num_latent=n_latent, lengths=lengths)
