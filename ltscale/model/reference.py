"""Naive references for the fast paths, kept deliberately simple: one sample at a time, no padding,
no cache reuse during training; the whole prefix is recomputed for every latent slot.

They share the fast paths' signatures so tests compare values and gradients directly.
"""

from __future__ import annotations

import torch

from ltscale.model.generation import GenerationOutput
from ltscale.model.latent_lm import LatentLM, LatentLMOutput
from ltscale.model.rollout import IGNORE_INDEX, upcast


def _full_forward(lm: LatentLM, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain causal forward of one unpadded sequence (1, T, d) -> (hidden, logits)."""
    out = lm.decoder()(inputs_embeds=embeds, use_cache=False)
    hidden = out.last_hidden_state
    return hidden, lm.lm_head(hidden)


def reference_forward(lm: LatentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, **_: object) -> LatentLMOutput:
    """Same contract as ``LatentLM.forward``; recomputes the prefix per latent slot, per sample."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    bsz, length = input_ids.shape
    total: torch.Tensor | float = 0.0
    n_targets = 0
    logits_full = None
    for b in range(bsz):
        cols = attention_mask[b].bool().nonzero().flatten()
        ids = input_ids[b, cols]
        rows = [lm.embed(ids[t:t + 1])[0] for t in range(len(ids))]
        if lm.uses_rollout:
            for p in range(len(ids)):
                if int(ids[p]) == lm.thinking_token_id:
                    hidden, logits = _full_forward(lm, torch.stack(rows[:p])[None])
                    rows[p] = lm.latent_input(hidden[0, -1:], logits[0, -1:])[0].to(rows[p].dtype)
        hidden, logits = _full_forward(lm, torch.stack(rows)[None])
        if labels is not None:
            lab = labels[b, cols]
            shift_logits = upcast(logits[0, :-1])
            shift_labels = lab[1:]
            total = total + torch.nn.functional.cross_entropy(shift_logits, shift_labels,
                                                              ignore_index=IGNORE_INDEX, reduction="sum")
            n_targets += int((shift_labels != IGNORE_INDEX).sum())
        if logits_full is None:
            logits_full = logits.new_zeros(bsz, length, logits.shape[-1])
        logits_full[b, cols] = logits[0]
    if not torch.is_tensor(total):
        total = torch.zeros((), device=input_ids.device)
    loss = total / max(n_targets, 1) if labels is not None else None
    n_passes = lm.count_passes(input_ids, attention_mask)
    return LatentLMOutput(loss=loss, logits=logits_full, n_passes=n_passes, n_targets=n_targets)


@torch.no_grad()
def reference_generate(lm: LatentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       max_new_tokens: int = 256, *, eos_token_id: int | None = None,
                       pad_token_id: int | None = None, without_thinking: bool = False,
                       forced: torch.Tensor | None = None):
    """One sample at a time, full recompute each step (no cache), the paper's evaluator shape."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    bsz = input_ids.shape[0]
    seqs = torch.full((bsz, max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    n_latent = torch.zeros(bsz, dtype=torch.long, device=input_ids.device)
    lengths = torch.zeros(bsz, dtype=torch.long, device=input_ids.device)
    for b in range(bsz):
        ids = input_ids[b, attention_mask[b].bool()]
        rows = [lm.embed(ids[None])[0]]
        for step in range(max_new_tokens):
            hidden, logits = _full_forward(lm, torch.cat(rows)[None])
            h_last, l_last = hidden[0, -1:], logits[0, -1:]
            scores = l_last.clone()
            if without_thinking:
                scores[:, lm.thinking_token_id] = float("-inf")
            nxt = int(scores.argmax(-1))
            if forced is not None and step < forced.numel():
                nxt = int(forced.reshape(-1)[step])
            seqs[b, step] = nxt
            lengths[b] = step + 1
            if eos_token_id is not None and nxt == eos_token_id:
                break
            if nxt == lm.thinking_token_id and lm.uses_rollout:
                n_latent[b] += 1
                rows.append(lm.latent_input(h_last, l_last).to(rows[0].dtype))
            else:
                n_latent[b] += int(nxt == lm.thinking_token_id)
                rows.append(lm.embed(torch.tensor([nxt], device=input_ids.device)))
    return GenerationOutput(sequences=seqs, num_latent=n_latent, lengths=lengths)
