"""KV-cached latent rollout: a batch with ``<thinking>`` slots at arbitrary per-sample positions in
``1 + max latents per sample`` sequential forward calls.

The input at a latent slot ``p`` depends on the hidden state / logits at ``p-1``, so a sequence with
``n`` latent slots needs ``n+1`` causal segments. Pass ``k`` runs every sample's ``k``-th segment
(the ``k``-th latent slot plus the text up to the next one) at once: ragged segments are padded to
the pass width, the KV cache grows by that width, padded keys are hidden by an explicit additive 4D
mask that also enforces causality by *true* position, and ``position_ids`` are true positions. The
official code instead cuts the batch at every column that holds a latent in any row (1 + distinct
latent columns calls); Coconut loops per position.

Every pass is checkpointable on its own (``torch.utils.checkpoint`` with the K/V chunks passed as
explicit tensors), because HF gradient checkpointing silently drops the cache in training mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from ltscale.data.formatting import IGNORE_INDEX
from ltscale.model.packed import run_packed_pass
from ltscale.ops.deferred import DeferredWeightGrads


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Loss math in at least fp32 (fp64 stays fp64, so parity tests are exact)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass
class PassSpec:
    """Which original positions pass ``k`` computes: ``index[b, j]`` (``-1`` = padding)."""

    index: torch.Tensor  # (B, W) long
    valid: torch.Tensor  # (B, W) bool
    position_ids: torch.Tensor  # (B, W) long, true positions (0 on padding)
    has_latent: torch.Tensor  # (B,) bool: column 0 is this row's latent slot (k >= 1)
    prev_last: torch.Tensor  # (B,) long: column of this row's last valid token in pass k-1


@dataclass
class RolloutPlan:
    passes: list[PassSpec]
    true_positions: torch.Tensor  # (B, L)
    valid: torch.Tensor  # (B, L) bool


def _check_contiguous(valid: torch.Tensor) -> None:
    # Left or right padding only: "the next token" must be the next array column.
    starts = valid.float().diff(dim=1).clamp(min=0).sum(dim=1) + valid[:, 0].float()
    if bool((starts > 1).any()):
        bad = int((starts > 1).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {bad} has holes; only left or right padding is supported")


def count_passes(input_ids: torch.Tensor, attention_mask: torch.Tensor, thinking_token_id: int) -> int:
    """Sequential forward calls this batch needs: 1 + the most latent slots in any row."""
    latent = (input_ids == thinking_token_id) & attention_mask.bool()
    return 1 + int(latent.sum(dim=1).max().item()) if latent.numel() else 1


def plan_rollout(input_ids: torch.Tensor, attention_mask: torch.Tensor, thinking_token_id: int,
                 min_passes: int = 1) -> RolloutPlan:
    """Split each row into causal segments at its latent slots; pad passes up to ``min_passes``.

    Extra (empty) passes exist so that every ZeRO-3 rank runs the same number of forward calls: a
    rank with fewer latents still all-gathers and reduce-scatters in lockstep.
    """
    valid = attention_mask.bool()
    _check_contiguous(valid)
    bsz, length = input_ids.shape
    device = input_ids.device
    latent = (input_ids == thinking_token_id) & valid
    true_pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    first_valid = torch.where(valid, true_pos, torch.full_like(true_pos, length)).amin(dim=1) if length else None
    if bool((latent & (true_pos == 0)).any()):
        raise ValueError("a <thinking> slot is the first token of a sequence: it has no previous state to read")
    del first_valid
    segment = latent.long().cumsum(dim=1)  # pass index of each token
    n_passes = max(int(segment.masked_fill(~valid, 0).max().item()) + 1 if length else 1, min_passes)
    # Offset of each token inside its segment = true position - true position of the segment start.
    seg_start = torch.full((bsz, n_passes), length, dtype=torch.long, device=device)
    seg_idx = segment.masked_fill(~valid, 0)
    seg_start.scatter_reduce_(1, seg_idx, torch.where(valid, true_pos, torch.full_like(true_pos, length)),
                              reduce="amin", include_self=True)
    offset = true_pos - seg_start.gather(1, seg_idx)
    counts = torch.zeros((bsz, n_passes), dtype=torch.long, device=device)
    counts.scatter_add_(1, seg_idx, valid.long())
    columns = torch.arange(length, device=device).expand(bsz, length)
    passes: list[PassSpec] = []
    for k in range(n_passes):
        width = max(int(counts[:, k].max().item()), 1)
        index = torch.full((bsz, width), -1, dtype=torch.long, device=device)
        sel = valid & (segment == k)
        rows = torch.arange(bsz, device=device).unsqueeze(1).expand(bsz, length)[sel]
        index[rows, offset[sel]] = columns[sel]
        pass_valid = index >= 0
        pos = torch.where(pass_valid, true_pos.gather(1, index.clamp(min=0)), torch.zeros_like(index))
        prev_last = (counts[:, k - 1] - 1).clamp(min=0) if k > 0 else torch.zeros(bsz, dtype=torch.long, device=device)
        has_latent = counts[:, k] > 0 if k > 0 else torch.zeros(bsz, dtype=torch.bool, device=device)
        passes.append(PassSpec(index=index, valid=pass_valid, position_ids=pos, has_latent=has_latent,
                               prev_last=prev_last))
    return RolloutPlan(passes=passes, true_positions=true_pos, valid=valid)


def additive_mask(key_valid: torch.Tensor, key_pos: torch.Tensor, query_valid: torch.Tensor,
                  query_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, K) float mask; the last Q keys are the queries' own slots.

    A key is visible iff it is real and its true position is <= the query's. A padded query sees
    only itself so its softmax row is finite (a fully masked row gives NaN, and NaN * 0 in the loss
    would still poison gradients).
    """
    allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    q = query_pos.shape[1]
    past = key_pos.shape[1] - q
    eye = torch.eye(q, dtype=torch.bool, device=allowed.device)
    self_only = (~query_valid)[:, :, None] & eye[None]
    allowed = torch.cat([allowed[:, :, :past] & query_valid[:, :, None], allowed[:, :, past:] | self_only], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def run_decoder_pass(decoder: torch.nn.Module, config, embeds: torch.Tensor, mask: torch.Tensor,
                     position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One decoder call on top of an explicit K/V list ``(k0, v0, k1, v1, ...)`` (chunks per pass).

    Returns ``(last_hidden_state, new_k0, new_v0, ...)`` holding only this pass's keys, so callers
    keep per-pass chunks and a checkpointed pass saves each chunk once.
    """
    n_layers = config.num_hidden_layers
    cache = DynamicCache(config=config)
    past_len = 0
    if past:
        n_chunks = len(past) // (2 * n_layers)
        for layer in range(n_layers):
            keys = [past[(c * n_layers + layer) * 2] for c in range(n_chunks)]
            values = [past[(c * n_layers + layer) * 2 + 1] for c in range(n_chunks)]
            k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=-2)
            v = values[0] if len(values) == 1 else torch.cat(values, dim=-2)
            cache.update(k, v, layer)
        past_len = cache.get_seq_length()
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
    new_kv: list[torch.Tensor] = []
    for layer in out.cache.layers[:n_layers]:
        new_kv.append(layer.keys[..., past_len:, :])
        new_kv.append(layer.values[..., past_len:, :])
    return (out.last_hidden_state, *new_kv)


@dataclass
class RolloutResult:
    loss_sum: torch.Tensor  # summed token cross-entropy (fp32 or fp64)
    n_targets: int
    logits: torch.Tensor | None  # (B, L, V) in original order when requested
    n_passes: int


class _PaddedPasses:
    """Pass ``k`` as a ``(B, W_k)`` batch over a padded per-pass K/V cache (any HF decoder).

    Takes ``deferred`` for a uniform constructor but keeps plain per-pass weight gradients.
    """

    def __init__(self, decoder, config, embeds_all: torch.Tensor, checkpointed: bool,
                 deferred: DeferredWeightGrads | None):
        self.decoder, self.config, self.embeds_all, self.checkpointed = decoder, config, embeds_all, checkpointed
        self.rows = torch.arange(embeds_all.shape[0], device=embeds_all.device)
        self.chunks: list[torch.Tensor] = []
        self.key_valid: list[torch.Tensor] = []
        self.key_pos: list[torch.Tensor] = []
        self.hidden: torch.Tensor | None = None

    def previous_state(self, spec: PassSpec) -> torch.Tensor:
        """(B, d): each row's last hidden state of the previous pass."""
        return self.hidden[self.rows, spec.prev_last]

    def run(self, spec: PassSpec, latent: torch.Tensor | None) -> torch.Tensor:
        """Runs the pass; returns the hidden states of its real tokens, row-major ``(n_k, d)``."""
        embeds = self.embeds_all[self.rows[:, None], spec.index.clamp(min=0)]
        if latent is not None:
            first = torch.where(spec.has_latent[:, None], latent.to(embeds.dtype), embeds[:, 0])
            embeds = torch.cat([first[:, None], embeds[:, 1:]], dim=1)
        self.key_valid.append(spec.valid)
        self.key_pos.append(spec.position_ids)
        mask = additive_mask(torch.cat(self.key_valid, 1), torch.cat(self.key_pos, 1), spec.valid,
                             spec.position_ids, embeds.dtype)
        args = (self.decoder, self.config, embeds, mask, spec.position_ids, *self.chunks)
        outs = checkpoint(run_decoder_pass, *args, use_reentrant=False) if self.checkpointed else run_decoder_pass(*args)
        self.hidden = outs[0]
        self.chunks.extend(outs[1:])
        return self.hidden[spec.valid]


class _PackedPasses:
    """Pass ``k`` as one packed row of its real tokens (``packed.py``): no padded slot reaches a Linear."""

    def __init__(self, decoder, config, embeds_all: torch.Tensor, checkpointed: bool,
                 deferred: DeferredWeightGrads | None):
        self.decoder, self.config, self.embeds_all, self.checkpointed = decoder, config, embeds_all, checkpointed
        bsz, length = embeds_all.shape[:2]
        self.chunks: list[torch.Tensor] = []
        self.history_len = 0
        # where_packed[b, j]: index in the packed K/V history of row b's token at true position j.
        self.where_packed = torch.zeros((bsz, max(length, 1)), dtype=torch.long, device=embeds_all.device)
        self.span = 1
        self.hidden: torch.Tensor | None = None
        self.slot_map: torch.Tensor | None = None
        # One weight gradient per decoder Linear per step, not one per pass (packed.py).
        self.deferred = deferred

    def previous_state(self, spec: PassSpec) -> torch.Tensor:
        rows = torch.arange(self.slot_map.shape[0], device=self.slot_map.device)
        return self.hidden[self.slot_map[rows, spec.prev_last]]

    def run(self, spec: PassSpec, latent: torch.Tensor | None) -> torch.Tensor:
        bsz, width = spec.valid.shape
        take = spec.valid
        empty = not bool(take.any())
        if empty:  # a lockstep pass with no tokens: one dummy query keeps every layer's collectives
            take = torch.zeros_like(take)
            take[0, 0] = True
        q_rows, q_cols = take.nonzero(as_tuple=True)  # row-major: the loss's token order
        embeds = self.embeds_all[q_rows, spec.index[q_rows, q_cols].clamp(min=0)]
        if latent is not None:
            is_latent = (q_cols == 0) & spec.has_latent[q_rows]
            embeds = torch.where(is_latent[:, None], latent.to(embeds.dtype)[q_rows], embeds)
        positions = spec.position_ids[q_rows, q_cols]
        n = int(q_rows.numel())
        if not empty:
            self.where_packed[q_rows, positions] = torch.arange(self.history_len, self.history_len + n,
                                                                device=positions.device)
            self.span = max(self.span, int(positions.max()) + 1)
        self.history_len += n
        flat_take = take.reshape(-1)
        self.slot_map = (flat_take.long().cumsum(0) - 1).clamp(min=0).view(bsz, width)
        q_real = flat_take.nonzero().squeeze(1)
        k_slots = self.where_packed[:, :self.span].reshape(-1).clone()  # later passes write where_packed
        # Key j of a row is its token at true position j: causal by true position; padding sees key 0.
        keys = torch.arange(self.span, device=positions.device)
        allowed = keys[None, None, :] <= spec.position_ids[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill_(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        args = (self.decoder, self.config, self.deferred, embeds[None], mask, positions[None], (bsz, width, self.span),
                self.slot_map.reshape(-1), q_real, k_slots, *self.chunks)
        outs = checkpoint(run_packed_pass, *args, use_reentrant=False) if self.checkpointed else run_packed_pass(*args)
        self.hidden = outs[0][0]
        self.chunks.extend(outs[1:])
        return self.hidden[:0] if empty else self.hidden


def latent_rollout(
    *,
    decoder: torch.nn.Module,
    config,
    embed: Callable[[torch.Tensor], torch.Tensor],
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    latent_input: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    thinking_token_id: int,
    min_passes: int = 1,
    gradient_checkpointing: bool = False,
    return_logits: bool = True,
    packed: bool = False,
    deferred: DeferredWeightGrads | None = None,
) -> RolloutResult:
    """The fast path. ``latent_input(h_prev, None) -> embedding`` is the method's latent function; it
    computes the logits it needs itself (``hidden`` mode needs none), so their head call can defer its
    ``V x d`` weight gradient across passes.

    ``packed``: run each pass on its real tokens only (``packed.py``; needs ``packing_supported``);
    otherwise on a ``(B, W_k)`` padded batch. Same values and gradients either way.
    ``deferred``: the step's weight-gradient accumulators (``ops/deferred.py``); packed passes route
    the decoder's Linear layers through them. ``None``: plain per-pass gradients.
    """
    plan = plan_rollout(input_ids, attention_mask, thinking_token_id, min_passes)
    bsz, length = input_ids.shape
    # Target of the token at column l is the label of the next column (contiguous rows).
    if labels is not None:
        next_labels = torch.full_like(labels, IGNORE_INDEX)
        next_labels[:, :-1] = labels[:, 1:]
        next_labels = next_labels.masked_fill(~plan.valid, IGNORE_INDEX)
    # One embedding call and one LM-head call over the real tokens of all passes: per-pass calls
    # would each materialise a dense V x d weight gradient in backward (and run the head on padding).
    embeds_all = embed(input_ids)
    runner_type = _PackedPasses if packed else _PaddedPasses
    runner = runner_type(decoder, config, embeds_all, gradient_checkpointing and torch.is_grad_enabled(), deferred)
    hiddens: list[torch.Tensor] = []
    keep_in_graph: list[torch.Tensor] = []
    for k, spec in enumerate(plan.passes):
        latent = latent_input(runner.previous_state(spec), None) if k > 0 else None
        real = runner.run(spec, latent)
        hiddens.append(real)
        if not bool(spec.valid.any()):
            # An empty lockstep pass: keep it in the graph so its backward (and recompute) runs on
            # every rank too.
            keep_in_graph.append(0.0 * upcast(runner.hidden).sum())
    rows = torch.arange(bsz, device=input_ids.device)
    sel_rows = torch.cat([rows[:, None].expand_as(s.valid)[s.valid] for s in plan.passes])
    sel_cols = torch.cat([s.index[s.valid] for s in plan.passes])
    logits = lm_head(torch.cat(hiddens))  # (real tokens, V)
    loss_sum: torch.Tensor = sum(keep_in_graph, torch.zeros((), device=input_ids.device))
    n_targets = 0
    if labels is not None:
        targets = next_labels[sel_rows, sel_cols]
        loss_sum = loss_sum + torch.nn.functional.cross_entropy(upcast(logits), targets, ignore_index=IGNORE_INDEX,
                                                                reduction="sum")
        n_targets = int((targets != IGNORE_INDEX).sum().item())
    logits_out = None
    if return_logits:
        logits_out = logits.new_zeros(bsz, length, logits.shape[-1]).index_put((sel_rows, sel_cols), logits)
    return RolloutResult(loss_sum=loss_sum, n_targets=n_targets, logits=logits_out, n_passes=len(plan.passes))
