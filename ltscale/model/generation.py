"""Greedy latent decoding with a KV cache and continuous batching (docs/method.md §9).

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

Every method decodes through this one loop; what differs is its :class:`DecodeRule`: how a row's
next token is chosen, whether that step is latent and what the next input is, what the prompt's
embeddings are at prefill (SoftCoT's soft thoughts), and per-row state that follows its row through
the batch (Soft-Thinking's Cold Stop counter). :class:`Greedy` is LT-Tuning's rule, and Coconut's
with a forced schedule.

Prompts are host data: each prefill's padded ids and mask, and the rule's own tensors (Coconut's
schedule) once per call, reach the model's device through ``ltscale.model.device.to_device``. A
caller's ``stop`` condition (lm-eval's stop strings) ends a row like EOS does; it needs the row's
ids on the host, so with it the step's tokens are copied there once per step, which is also the
one host sync the loop makes per step without it (deciding whether any row ended).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from ltscale.model.device import to_device
from ltscale.model.rollout import additive_mask


class LatentDecoder(Protocol):
    """What decoding uses of a ``LatentLM`` (or a method's subclass of it)."""

    base: nn.Module
    thinking_token_id: int
    training: bool

    @property
    def uses_rollout(self) -> bool: ...
    def decoder(self) -> nn.Module: ...
    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def latent_input(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, max_new_tokens) generated ids; <thinking> id at latent steps; pad after EOS
    num_latent: torch.Tensor  # (B,) latent steps taken
    lengths: torch.Tensor  # (B,) tokens generated, EOS included

    def cpu(self) -> GenerationOutput:
        return GenerationOutput(
            self.sequences.detach().cpu(), self.num_latent.detach().cpu(), self.lengths.detach().cpu()
        )


def left_pad(
    rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows left-padded to the longest (mask 1 on real
    tokens): the last column is then every row's last token, where decoding continues."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        if len(row):
            ids[b, width - len(row) :] = torch.as_tensor(row, dtype=torch.long, device=device)
            mask[b, width - len(row) :] = 1
    return ids, mask


def _pad_front(t: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)


@dataclass
class Rows:
    """The live rows of a decode: which prompt each row is, its cache rows and decoding state."""

    prompt: torch.Tensor  # (R,) index into the prompts
    cache: DynamicCache  # (R, H_kv, T, hd) per layer, left-padded per row
    key_valid: torch.Tensor  # (R, T) bool
    next_pos: torch.Tensor  # (R,) true position of the row's next input
    hidden: torch.Tensor  # (R, d) last hidden state
    logits: torch.Tensor  # (R, V) logits at that state
    steps: torch.Tensor  # (R,) tokens generated so far
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the rule's per-row tensors

    _PER_ROW = ("prompt", "next_pos", "hidden", "logits", "steps")

    def __len__(self) -> int:
        return int(self.prompt.numel())

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.key_valid = self.key_valid[keep]
        for name in self._PER_ROW:
            setattr(self, name, getattr(self, name)[keep])
        self.state = {k: v[keep] for k, v in self.state.items()}
        # Columns that only departed rows used are dead weight for every later step's attention.
        first = int(self.key_valid.any(dim=0).long().argmax())
        if first > 0:
            self.key_valid = self.key_valid[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def join(self, new: Rows) -> None:
        """Append ``new``'s rows, left-padding whichever side has the shorter cache."""
        width = max(self.key_valid.shape[1], new.key_valid.shape[1])
        for mine, theirs in zip(self.cache.layers, new.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_front(mine.keys, width, 2), _pad_front(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_front(mine.values, width, 2), _pad_front(theirs.values, width, 2)])
        self.key_valid = torch.cat(
            [_pad_front(self.key_valid, width, 1, False), _pad_front(new.key_valid, width, 1, False)]
        )
        for name in self._PER_ROW:
            setattr(self, name, torch.cat([getattr(self, name), getattr(new, name)]))
        self.state = {k: torch.cat([v, new.state[k]]) for k, v in self.state.items()}


class DecodeRule:
    """How decoding continues each row; the defaults are what every method shares."""

    #: Latent steps each prompt already holds (SoftCoT's soft thoughts), counted in ``num_latent``.
    prompt_latents = 0

    def prefill_embeds(self, lm: LatentDecoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Input embeddings of left-padded prompts ``ids`` (``mask``: 1 on real tokens)."""
        return lm.embed(ids)

    def start(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-row state of ``n`` rows entering the batch (tensors with ``n`` rows)."""
        return {}

    def choose(self, lm: LatentDecoder, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token (R,), latent (R,) bool)`` of every row's next step; may update ``rows.state``."""
        raise NotImplementedError

    def next_inputs(
        self, lm: LatentDecoder, rows: Rows, tokens: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        """``(R, d)`` inputs of the steps just chosen (the rows that finished have left ``rows``)."""
        raise NotImplementedError


@dataclass
class Greedy(DecodeRule):
    """Argmax decoding; a ``<thinking>`` step's input is the latent function of the row's state.

    ``forced``: ids emitted at each row's first ``len(forced)`` steps instead of the argmax (Coconut's
    fixed ``<thinking>`` x n + end marker); a forced ``<thinking>`` is a latent step like any other.
    """

    without_thinking: bool = False
    forced: torch.Tensor | None = None

    def choose(self, lm: LatentDecoder, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        scores = rows.logits
        if self.without_thinking:
            scores = scores.clone()
            scores[:, lm.thinking_token_id] = float("-inf")
        nxt = scores.argmax(dim=-1)
        if self.forced is not None and self.forced.numel():
            forced = self.forced.reshape(-1)  # on the model's device: generate_many moved the rule
            in_schedule = rows.steps < forced.numel()
            nxt = torch.where(in_schedule, forced[rows.steps.clamp(max=forced.numel() - 1)], nxt)
        return nxt, nxt == lm.thinking_token_id

    def next_inputs(
        self, lm: LatentDecoder, rows: Rows, tokens: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        embeds = lm.embed(tokens)
        if lm.uses_rollout and bool(latent.any()):
            embeds = torch.where(
                latent[:, None], lm.latent_input(rows.hidden, rows.logits).to(embeds.dtype), embeds
            )
        return embeds


def _prefill(
    lm: LatentDecoder, rule: DecodeRule, prompts: Sequence[torch.Tensor], index: torch.Tensor
) -> Rows:
    ids, mask = to_device(left_pad(prompts), index.device)
    valid = mask.bool()
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.base.config)
    embeds = rule.prefill_embeds(lm, ids, mask)
    out = lm.decoder()(
        inputs_embeds=embeds,
        attention_mask=additive_mask(valid, pos, valid, pos, embeds.dtype),
        position_ids=pos,
        cache=cache,
        use_cache=True,
    )
    hidden = out.last_hidden_state[:, -1]  # left-padded: the last column is every row's last token
    return Rows(
        prompt=index,
        cache=cache,
        key_valid=valid,
        next_pos=mask.sum(dim=1),
        hidden=hidden,
        logits=lm.lm_head(hidden),
        steps=torch.zeros_like(index),
        state=rule.start(len(prompts), index.device),
    )


@torch.no_grad()
def generate_many(
    lm: LatentDecoder,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    *,
    slots: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    without_thinking: bool = False,
    forced: torch.Tensor | None = None,
    rule: DecodeRule | None = None,
    on_finish: Callable[[int], None] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
) -> GenerationOutput:
    """Decode every prompt (unpadded id lists) with at most ``slots`` rows in flight.

    ``rule``: the method's decoding (default :class:`Greedy` with ``without_thinking`` and ``forced``,
    which a given rule carries itself). ``on_finish(n)``: called with the number of prompts that
    just finished (progress bars). ``stop(i, ids)``: asked after every step of prompt ``i``'s row
    that did not end by EOS or ``max_new_tokens``, with the ids it generated so far (latent steps
    as the ``<thinking>`` id); True ends the row there, its slot going to the next prompt.
    Outputs are in prompt order.
    """
    if slots < 1:
        raise ValueError(f"generate: slots={slots} must be >= 1")
    if rule is None:
        rule = Greedy(without_thinking=without_thinking, forced=forced)
    elif without_thinking or forced is not None:
        raise ValueError("generate: without_thinking and forced are settings of the rule; pass them to it")
    device = lm.base.get_input_embeddings().weight.device
    rule = to_device(rule, device)
    prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1).cpu() for p in prompts]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise ValueError(f"generate: every prompt needs at least one real token (prompt {empty[0]} has none)")
    n = len(prompts)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    seqs = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    n_latent = torch.full((n,), rule.prompt_latents, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in range(n if stop is not None else 0)]
    rows: Rows | None = None
    waiting = 0  # prompts[waiting:] have not started
    while True:
        free = slots - (len(rows) if rows is not None else 0)
        if free > 0 and waiting < n and max_new_tokens > 0:
            take = range(waiting, min(n, waiting + free))
            new = _prefill(
                lm, rule, [prompts[i] for i in take], torch.arange(take.start, take.stop, device=device)
            )
            waiting = take.stop
            if rows is None:
                rows = new
            else:
                rows.join(new)
        if rows is None:
            break
        nxt, is_latent = rule.choose(lm, rows)
        seqs[rows.prompt, rows.steps] = nxt
        rows.steps = rows.steps + 1
        lengths[rows.prompt] = rows.steps
        n_latent[rows.prompt] += is_latent.long()
        done = rows.steps >= max_new_tokens
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if stop is None:
            n_done = int(done.sum())
        else:
            done, n_done = _stopped(stop, generated, rows.prompt, nxt, done)
        if n_done:
            if on_finish is not None:
                on_finish(n_done)
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                rows = None
                continue
            rows.select(keep)
            nxt, is_latent = nxt[keep], is_latent[keep]
        step_embeds = rule.next_inputs(lm, rows, nxt, is_latent)
        # A decode step's query sees every real key of its row (all earlier positions).
        rows.key_valid = torch.cat([rows.key_valid, torch.ones_like(rows.key_valid[:, :1])], dim=1)
        mask = torch.zeros(rows.key_valid.shape, dtype=step_embeds.dtype, device=device)
        mask.masked_fill_(~rows.key_valid, torch.finfo(step_embeds.dtype).min)
        out = lm.decoder()(
            inputs_embeds=step_embeds[:, None],
            attention_mask=mask[:, None, None],
            position_ids=rows.next_pos[:, None],
            cache=rows.cache,
            use_cache=True,
        )
        rows.hidden = out.last_hidden_state[:, 0]
        rows.logits = lm.lm_head(rows.hidden)
        rows.next_pos = rows.next_pos + 1
    return GenerationOutput(sequences=seqs, num_latent=n_latent, lengths=lengths)


def _stopped(
    stop: Callable[[int, list[int]], bool],
    generated: list[list[int]],
    prompt: torch.Tensor,
    tokens: torch.Tensor,
    done: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """``done`` plus the rows ``stop`` ends after this step, and how many rows end; appends the
    step's tokens to ``generated`` (one copy to the host for the whole step)."""
    flags = []
    for i, token, ended in zip(*torch.stack([prompt, tokens, done.long()]).tolist(), strict=True):
        generated[i].append(token)
        flags.append(bool(ended) or bool(stop(i, generated[i])))
    return to_device(torch.tensor(flags), done.device), sum(flags)


@torch.no_grad()
def generate_batched(
    lm: LatentDecoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    **kwargs: Any,
) -> GenerationOutput:
    """A padded batch (left or right padding) decoded together: :func:`generate_many` (same keyword
    arguments) with one slot per row."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    if not bool(valid.any(dim=1).all()):
        raise ValueError("generate: every prompt needs at least one real token")
    prompts = [input_ids[b][valid[b]] for b in range(input_ids.shape[0])]
    return generate_many(lm, prompts, max_new_tokens, slots=max(len(prompts), 1), **kwargs)
