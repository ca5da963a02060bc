"""KV-cached latent rollout: a batch with ``<thinking>`` slots at arbitrary per-sample positions in
``1 + max latents per sample`` sequential forward calls.

The input at a latent slot ``p`` depends on the hidden state / logits at ``p-1``, so a sequence with
``n`` latent slots needs ``n+1`` causal segments. Pass ``k`` runs every sample's ``k``-th segment
(the ``k``-th latent slot plus the text up to the next one) at once. The official code instead cuts
the batch at every column that holds a latent in any row (1 + distinct latent columns calls);
Coconut loops per position.

Two runners compute a pass (same values and gradients):

* packed (``packed.py``, the default): the pass's real tokens as one row; attention gathers each
  row's keys from the packed K/V history;
* padded (the fallback, any HF decoder): ragged segments padded to the pass width, a per-pass K/V
  cache, padded keys hidden by an explicit additive 4D mask that also enforces causality by *true*
  position, ``position_ids`` = true positions.

The batch's plan (``rollout_plan.py``) is made once on CPU and shipped in one copy: no pass reads a
device tensor back to the host.

Every pass is checkpointable on its own (``torch.utils.checkpoint`` with the K/V chunks passed as
explicit tensors), because HF gradient checkpointing silently drops the cache in training mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from ltscale.model.packed import folded_mask, gqa_folded, gqa_groups, linears_routed, run_packed_pass
from ltscale.model.rollout_plan import IGNORE_INDEX, PassPlan, RolloutPlan, count_passes, plan_rollout
from ltscale.ops.deferred import DeferredWeightGrads

__all__ = ["IGNORE_INDEX", "RolloutResult", "additive_mask", "count_passes", "latent_rollout", "plan_rollout",
           "run_decoder_pass", "upcast"]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Loss math in at least fp32 (fp64 stays fp64, so parity tests are exact)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


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


def run_decoder_pass(decoder: torch.nn.Module, config, dummy: bool, fold_gqa: bool, embeds: torch.Tensor,
                     mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One decoder call on top of an explicit K/V list ``(k0, v0, k1, v1, ...)`` (chunks per pass).

    Returns ``(last_hidden_state, new_k0, new_v0, ...)`` holding only this pass's keys, so callers
    keep per-pass chunks and a checkpointed pass saves each chunk once. ``dummy``: an empty lockstep
    pass, whose Linear layers skip their weights (``packed.linears_routed``). ``fold_gqa``: query
    groups folded into the query length where the kernel allows it (``packed.gqa_folded``).
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
            past_len = k.shape[-2]
    with linears_routed(decoder, None, dummy), gqa_folded(config, fold_gqa) as kwargs:
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache,
                      use_cache=True, **kwargs)
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
    plan: RolloutPlan  # what ran (on the model's device)


def _with_latents(embeds: torch.Tensor, spec: PassPlan, latent: torch.Tensor | None) -> torch.Tensor:
    """The pass's query embeddings ``(n_run, d)`` with its latent slots replaced by ``latent``."""
    if latent is None:
        return embeds
    if spec.empty:  # the dummy query carries the latent: the latent function stays in the graph
        return latent[:1].to(embeds.dtype)
    return embeds.index_copy(0, spec.latent_at, latent.to(embeds.dtype))


class _PaddedPasses:
    """Pass ``k`` as a ``(B, W_k)`` batch over a padded per-pass K/V cache (any HF decoder); plain
    per-pass weight gradients (the reference shape for the packed passes). ``fold_gqa``: as the
    packed passes (``packed.gqa_folded``)."""

    def __init__(self, decoder, config, checkpointed: bool, fold_gqa: bool = True):
        self.decoder, self.config, self.checkpointed, self.fold_gqa = decoder, config, checkpointed, fold_gqa
        self.chunks: list[torch.Tensor] = []
        self.key_valid: list[torch.Tensor] = []
        self.key_pos: list[torch.Tensor] = []
        self.hidden: torch.Tensor | None = None

    def previous_state(self, spec: PassPlan) -> torch.Tensor:
        """(m, d): the last hidden state of the previous pass of each row whose latent slot is in ``spec``."""
        return self.hidden.reshape(-1, self.hidden.shape[-1]).index_select(0, spec.prev_padded)

    def run(self, spec: PassPlan, embeds: torch.Tensor) -> torch.Tensor:
        """Runs the pass on its query embeddings ``(n_run, d)``; returns their hidden states."""
        d = embeds.shape[-1]
        padded = embeds.new_zeros(spec.bsz * spec.width, d).index_copy(0, spec.q_real, embeds)
        padded = padded.view(spec.bsz, spec.width, d)
        if spec.empty:  # no history: the dummy sees itself
            key_valid, key_pos, past = spec.valid, spec.pos2d, ()
        else:
            self.key_valid.append(spec.valid)
            self.key_pos.append(spec.pos2d)
            key_valid, key_pos, past = torch.cat(self.key_valid, 1), torch.cat(self.key_pos, 1), self.chunks
        mask = additive_mask(key_valid, key_pos, spec.valid, spec.pos2d, padded.dtype)
        args = (self.decoder, self.config, spec.empty, self.fold_gqa, padded, mask, spec.pos2d, *past)
        outs = checkpoint(run_decoder_pass, *args, use_reentrant=False) if self.checkpointed else run_decoder_pass(*args)
        self.hidden = outs[0]
        if not spec.empty:
            self.chunks.extend(outs[1:])
        return self.hidden.reshape(-1, d).index_select(0, spec.q_real)


class _PackedPasses:
    """Pass ``k`` as one packed row of its real tokens (``packed.py``): no padded slot reaches a Linear.

    ``deferred``: the step's weight-gradient accumulators; the decoder's Linear layers defer to them
    (one weight gradient per step, ``packed.py``). ``fold_gqa``: fold the query groups of
    grouped-query attention into the query length instead of repeating K/V (``packed.py``).
    """

    def __init__(self, decoder, config, checkpointed: bool, deferred: DeferredWeightGrads | None,
                 fold_gqa: bool = True):
        self.decoder, self.config, self.checkpointed, self.deferred = decoder, config, checkpointed, deferred
        self.groups = gqa_groups(config) if fold_gqa else 1
        self.chunks: list[torch.Tensor] = []
        self.hidden: torch.Tensor | None = None

    def previous_state(self, spec: PassPlan) -> torch.Tensor:
        return self.hidden.index_select(0, spec.prev_packed)

    def run(self, spec: PassPlan, embeds: torch.Tensor) -> torch.Tensor:
        pos2d = spec.positions.new_zeros(spec.bsz * spec.width).index_copy(0, spec.q_real, spec.positions)
        mask = folded_mask(pos2d.view(spec.bsz, spec.width), spec.span, self.groups, embeds.dtype)
        past = () if spec.empty else self.chunks  # an empty pass's dummy attends to itself only
        args = (self.decoder, self.config, self.deferred, spec.empty, embeds[None], mask, spec.positions[None],
                (spec.bsz, spec.width, spec.span, self.groups), spec.q_slots, spec.q_real, spec.k_slots, *past)
        outs = checkpoint(run_packed_pass, *args, use_reentrant=False) if self.checkpointed else run_packed_pass(*args)
        self.hidden = outs[0][0]
        if not spec.empty:
            self.chunks.extend(outs[1:])
        return self.hidden


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
    device: torch.device | str | None = None,
    plan: RolloutPlan | None = None,
    fold_gqa: bool = True,
) -> RolloutResult:
    """The fast path. ``latent_input(h_prev, None) -> embedding`` is the method's latent function; it
    computes the logits it needs itself (``hidden`` mode needs none), so their head call can defer its
    ``V x d`` weight gradient across passes.

    ``packed``: run each pass on its real tokens only (``packed.py``; needs ``packing_supported``);
    otherwise on a ``(B, W_k)`` padded batch. Same values and gradients either way.
    ``deferred``: the step's weight-gradient accumulators (``ops/deferred.py``); packed passes route
    the decoder's Linear layers through them. ``None``: plain per-pass gradients.
    ``device``: where the model lives (default: ``input_ids``'s device). The ids may stay on CPU;
    the plan (``plan``, or made here from the ids) carries them to ``device`` in its one copy.
    """
    if plan is None:
        plan = plan_rollout(input_ids, attention_mask, thinking_token_id, min_passes, labels=labels, packed=packed)
    elif plan.packed != packed:
        raise ValueError(f"latent_rollout: plan made for packed={plan.packed}, called with packed={packed}")
    plan = plan.to(device if device is not None else input_ids.device)
    checkpointed = gradient_checkpointing and torch.is_grad_enabled()
    if packed:
        runner = _PackedPasses(decoder, config, checkpointed, deferred, fold_gqa)
    else:
        runner = _PaddedPasses(decoder, config, checkpointed, fold_gqa)
    # One embedding call and one LM-head call over the real tokens of all passes: per-pass calls
    # would each materialise a dense V x d weight gradient in backward (and run the head on padding).
    embeds_all = embed(plan.ids)
    embeds_all = embeds_all.reshape(-1, embeds_all.shape[-1]).index_select(0, plan.src)  # plan order
    hiddens: list[torch.Tensor] = []
    keep_in_graph: list[torch.Tensor] = []
    for spec in plan.passes:
        latent = latent_input(runner.previous_state(spec), None) if spec.k > 0 else None
        embeds = _with_latents(embeds_all[spec.start:spec.start + spec.n], spec, latent)
        out = runner.run(spec, embeds)
        if spec.empty:
            # An empty lockstep pass: keep it in the graph so its backward (and recompute) runs on
            # every rank too.
            keep_in_graph.append(0.0 * upcast(out).sum())
        else:
            hiddens.append(out)
    logits = lm_head(torch.cat(hiddens))  # (real tokens, V), plan order
    loss_sum: torch.Tensor = sum(keep_in_graph, logits.new_zeros((), dtype=upcast(logits).dtype))
    if plan.targets is not None:
        loss_sum = loss_sum + torch.nn.functional.cross_entropy(upcast(logits), plan.targets,
                                                                ignore_index=IGNORE_INDEX, reduction="sum")
    logits_out = None
    if return_logits:
        flat = logits.new_zeros(plan.bsz * plan.length, logits.shape[-1]).index_copy(0, plan.src, logits)
        logits_out = flat.view(plan.bsz, plan.length, -1)
    return RolloutResult(loss_sum=loss_sum, n_targets=plan.n_targets, logits=logits_out, n_passes=len(plan.passes),
                         plan=plan)
