"""Greedy latent decoding with a KV cache and continuous batching (spec §5).

Each row switches to latent mode on its own whenever its argmax is ``<thinking>``: that step's
input is the latent function of the row's current hidden state and logits instead of a vocabulary
row. A row that reaches EOS (or ``max_new_tokens``) leaves the batch at once, cache rows included,
and when prompts are waiting, the freed slots are refilled: the newcomers are prefilled together
and join the running batch (continuous batching). A long answer then holds one slot instead of
the whole batch; with a fixed batch, the rows of a batch-32 tiny-model decode stop after 25-96
tokens and the batch runs until its longest row ends (bench/decoding.py).

Rows of different ages share one KV cache: each row's keys are left-padded to the cache width and
hidden by a key-validity mask, and positions are true positions per row, so a row's tokens do not
depend on which rows it shares the batch with (tests/unit/test_generation.py checks them against
one-at-a-time full-recompute decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def _left_pad(t: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)


@dataclass
class _Rows:
    """The live rows of a decode: which prompt each row is, its cache rows and decoding state."""

    prompt: torch.Tensor  # (R,) index into the prompts
    cache: DynamicCache  # (R, H_kv, T, hd) per layer, left-padded per row
    key_valid: torch.Tensor  # (R, T) bool
    next_pos: torch.Tensor  # (R,) true position of the row's next input
    hidden: torch.Tensor  # (R, d) last hidden state
    logits: torch.Tensor  # (R, V) logits at that state
    steps: torch.Tensor  # (R,) tokens generated so far

    def __len__(self) -> int:
        return int(self.prompt.numel())

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.prompt, self.key_valid, self.next_pos = self.prompt[keep], self.key_valid[keep], self.next_pos[keep]
        self.hidden, self.logits, self.steps = self.hidden[keep], self.logits[keep], self.steps[keep]
        # Columns that only departed rows used are dead weight for every later step's attention.
        first = int(self.key_valid.any(dim=0).long().argmax())
        if first > 0:
            self.key_valid = self.key_valid[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def join(self, new: _Rows) -> None:
        """Append ``new``'s rows, left-padding whichever side has the shorter cache."""
        width = max(self.key_valid.shape[1], new.key_valid.shape[1])
        for mine, theirs in zip(self.cache.layers, new.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.key_valid = torch.cat([_left_pad(self.key_valid, width, 1, False), _left_pad(new.key_valid, width, 1, False)])
        for name in ("prompt", "next_pos", "hidden", "logits", "steps"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(new, name)]))


def _prefill(lm: LatentLM, prompts: Sequence[torch.Tensor], index: torch.Tensor) -> _Rows:
    device = index.device
    width = max(int(p.numel()) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - p.numel():] = p
        valid[row, width - p.numel():] = True
    pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.base.config)
    embeds = lm.embed(ids)
    out = lm.decoder()(inputs_embeds=embeds, attention_mask=additive_mask(valid, pos, valid, pos, embeds.dtype),
                       position_ids=pos, cache=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]  # left-padded: the last column is every row's last token
    return _Rows(prompt=index, cache=cache, key_valid=valid, next_pos=valid.long().sum(dim=1), hidden=hidden,
                 logits=lm.lm_head(hidden), steps=torch.zeros_like(index))


@torch.no_grad()
def generate_many(lm: LatentLM, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int, *,
                  slots: int, eos_token_id: int | None = None, pad_token_id: int | None = None,
                  without_thinking: bool = False, forced: torch.Tensor | None = None,
                  on_finish: Callable[[int], None] | None = None) -> GenerationOutput:
    """Decode every prompt (unpadded id lists) with at most ``slots`` rows in flight.

    ``forced``: ids emitted at each row's first ``len(forced)`` steps instead of the argmax (Coconut's
    fixed ``<thinking>`` x n + end marker); a forced ``<thinking>`` is a latent step like any other.
    ``on_finish(n)``: called with the number of prompts that just finished (progress bars).
    Outputs are in prompt order.
    """
    if slots < 1:
        raise ValueError(f"generate: slots={slots} must be >= 1")
    device = lm.base.get_input_embeddings().weight.device
    prompts = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in prompts]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise ValueError(f"generate: every prompt needs at least one real token (prompt {empty[0]} has none)")
    n = len(prompts)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    think = lm.thinking_token_id
    forced_ids = forced.reshape(-1).to(device) if forced is not None and forced.numel() else None
    seqs = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    n_latent = torch.zeros(n, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    rows: _Rows | None = None
    waiting = 0  # prompts[waiting:] have not started
    while True:
        free = slots - (len(rows) if rows is not None else 0)
        if free > 0 and waiting < n and max_new_tokens > 0:
            take = range(waiting, min(n, waiting + free))
            new = _prefill(lm, [prompts[i] for i in take], torch.arange(take.start, take.stop, device=device))
            waiting = take.stop
            if rows is None:
                rows = new
            else:
                rows.join(new)
        if rows is None:
            break
        scores = rows.logits
        if without_thinking:
            scores = scores.clone()
            scores[:, think] = float("-inf")
        nxt = scores.argmax(dim=-1)
        if forced_ids is not None:
            in_schedule = rows.steps < forced_ids.numel()
            nxt = torch.where(in_schedule, forced_ids[rows.steps.clamp(max=forced_ids.numel() - 1)], nxt)
        seqs[rows.prompt, rows.steps] = nxt
        rows.steps = rows.steps + 1
        lengths[rows.prompt] = rows.steps
        is_latent = nxt == think
        n_latent[rows.prompt] += is_latent.long()
        done = rows.steps >= max_new_tokens
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if bool(done.any()):
            if on_finish is not None:
                on_finish(int(done.sum()))
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                rows = None
                continue
            rows.select(keep)
            nxt, is_latent = nxt[keep], is_latent[keep]
        step_embeds = lm.embed(nxt)
        if lm.uses_rollout and bool(is_latent.any()):
            latent = lm.latent_input(rows.hidden, rows.logits).to(step_embeds.dtype)
            step_embeds = torch.where(is_latent[:, None], latent, step_embeds)
        # A decode step's query sees every real key of its row (all earlier positions).
        rows.key_valid = torch.cat([rows.key_valid, torch.ones_like(rows.key_valid[:, :1])], dim=1)
        mask = torch.zeros(rows.key_valid.shape, dtype=step_embeds.dtype, device=device)
        mask.masked_fill_(~rows.key_valid, torch.finfo(step_embeds.dtype).min)
        out = lm.decoder()(inputs_embeds=step_embeds[:, None], attention_mask=mask[:, None, None],
                           position_ids=rows.next_pos[:, None], cache=rows.cache, use_cache=True)
        rows.hidden = out.last_hidden_state[:, 0]
        rows.logits = lm.lm_head(rows.hidden)
        rows.next_pos = rows.next_pos + 1
    return GenerationOutput(sequences=seqs, num_latent=n_latent, lengths=lengths)


@torch.no_grad()
def generate_batched(lm: LatentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     max_new_tokens: int, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                     without_thinking: bool = False, forced: torch.Tensor | None = None) -> GenerationOutput:
    """A padded batch (left or right padding) decoded together: ``generate_many`` with one slot per row."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    if not bool(valid.any(dim=1).all()):
        raise ValueError("generate: every prompt needs at least one real token")
    prompts = [input_ids[b][valid[b]] for b in range(input_ids.shape[0])]
    return generate_many(lm, prompts, max_new_tokens, slots=max(len(prompts), 1), eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, without_thinking=without_thinking, forced=forced)
