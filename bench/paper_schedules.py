"""Re-implementations of the training schedules ltscale is compared with. Bench-only: the product
never imports this file.

All three take a right-padded batch and return the same token-mean loss as ``LatentLM.forward``
(P1 asserts it), using the model's own latent function, so only the *schedule* differs:

* ``per_column_forward`` — the LT-Tuning paper's code (docs/method.md §8): the
  collator left-pads every row so its first ``<thinking>`` lands in one common column, then the
  batch is cut at every column that holds a latent in any row and the segments run left to right
  through the HF model with a KV cache, ``output_hidden_states=True`` and full-vocabulary logits.
  Sequential calls = 1 + distinct latent columns.
* ``coconut_forward`` — Coconut's loop (docs/baselines.md §3.3): the same cached windows, but
  before every call the whole ``B x L x d`` input-embedding tensor is rebuilt from a Python list of
  per-position slices with nested ``torch.stack`` (its way of writing the latent without in-place
  ops).
* ``recompute_forward`` — the full forward recomputed for each latent column (no cache): what
  "recompute the full prefix per latent position" costs, and what Coconut silently degrades to
  under HF gradient checkpointing (which drops the cache). Batched, unlike the per-sample product
  reference in ``ltscale/model/reference.py``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ltscale.model import LatentLM

IGNORE = -100


def align_first_latent(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, thinking_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's collator: left-pad rows so every row's first latent sits in the same column
    (rows without latents get no left pad), right-pad the rest; positions restart after the pad."""
    rows = [input_ids[b, attention_mask[b].bool()] for b in range(input_ids.shape[0])]
    labs = [labels[b, attention_mask[b].bool()] for b in range(input_ids.shape[0])]
    firsts = [int((r == thinking_id).nonzero()[0]) if bool((r == thinking_id).any()) else None for r in rows]
    anchor = max((f for f in firsts if f is not None), default=0)
    left = [anchor - f if f is not None else 0 for f in firsts]
    width = max(lp + len(r) for lp, r in zip(left, rows))
    bsz = len(rows)
    ids = torch.zeros((bsz, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, IGNORE)
    pos = torch.zeros_like(ids)
    for b, (lp, r) in enumerate(zip(left, rows)):
        ids[b, lp : lp + len(r)] = r
        mask[b, lp : lp + len(r)] = 1
        lab[b, lp : lp + len(r)] = labs[b]
        pos[b, lp : lp + len(r)] = torch.arange(len(r))
    return ids, mask, lab, pos


def latent_columns(ids: torch.Tensor, mask: torch.Tensor, thinking_id: int) -> list[int]:
    return ((ids == thinking_id) & mask.bool()).any(dim=0).nonzero().flatten().tolist()


def per_column_calls(input_ids: torch.Tensor, attention_mask: torch.Tensor, thinking_id: int) -> int:
    """Sequential forward calls the paper's schedule needs for this batch (after its alignment)."""
    ids, mask, _, _ = align_first_latent(input_ids, attention_mask, torch.zeros_like(input_ids), thinking_id)
    return 1 + len(latent_columns(ids, mask, thinking_id))


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    work = logits[:, :-1].float() if logits.dtype not in (torch.float32, torch.float64) else logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        work.reshape(-1, work.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def _windows(ids: torch.Tensor, mask: torch.Tensor, thinking_id: int) -> list[tuple[int, int]]:
    cols = latent_columns(ids, mask, thinking_id)
    bounds = [0, *cols, ids.shape[1]]
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def per_column_forward(
    lm: LatentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    think = lm.thinking_token_id
    ids, mask, lab, pos = align_first_latent(input_ids, attention_mask, labels, think)
    latent = (ids == think) & mask.bool()
    embeds = lm.embed(ids)
    cache = DynamicCache(config=lm.base.config)
    parts = []
    h_prev = l_prev = None
    for s, e in _windows(ids, mask, think):
        seg = embeds[:, s:e]
        if s > 0 and bool(latent[:, s].any()):
            fill = lm.latent_input(h_prev[:, -1], l_prev[:, -1]).to(seg.dtype)
            first = torch.where(latent[:, s, None], fill, seg[:, 0])
            seg = torch.cat([first[:, None], seg[:, 1:]], dim=1)
        out = lm.base(
            inputs_embeds=seg,
            attention_mask=mask[:, :e],
            position_ids=pos[:, s:e],
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        h_prev, l_prev = out.hidden_states[-1], out.logits
        parts.append(out.logits)
    return _loss(torch.cat(parts, dim=1), lab)


def coconut_forward(
    lm: LatentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    think = lm.thinking_token_id
    ids, mask, lab, pos = align_first_latent(input_ids, attention_mask, labels, think)
    latent = (ids == think) & mask.bool()
    bsz, length = ids.shape
    embeds = lm.embed(ids)
    cache = DynamicCache(config=lm.base.config)
    parts = []
    h_prev = l_prev = None
    for s, e in _windows(ids, mask, think):
        if s > 0 and bool(latent[:, s].any()):
            fill = lm.latent_input(h_prev[:, -1], l_prev[:, -1]).to(embeds.dtype)
            # Coconut: break the embeddings into per-position slices, swap the latent ones, restack.
            slices = [[embeds[b, p, :] for p in range(length)] for b in range(bsz)]
            for b in latent[:, s].nonzero().flatten().tolist():
                slices[b][s] = fill[b]
            embeds = torch.stack([torch.stack(row) for row in slices])
        out = lm.base(
            inputs_embeds=embeds[:, s:e],
            attention_mask=mask[:, :e],
            position_ids=pos[:, s:e],
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        h_prev, l_prev = out.hidden_states[-1], out.logits
        parts.append(out.logits)
    return _loss(torch.cat(parts, dim=1), lab)


def recompute_forward(
    lm: LatentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    think = lm.thinking_token_id
    ids, mask, lab, pos = align_first_latent(input_ids, attention_mask, labels, think)
    latent = (ids == think) & mask.bool()
    embeds = lm.embed(ids)
    for c in latent_columns(ids, mask, think):
        out = lm.base(
            inputs_embeds=embeds[:, :c],
            attention_mask=mask[:, :c],
            position_ids=pos[:, :c],
            use_cache=False,
            output_hidden_states=True,
        )
        fill = lm.latent_input(out.hidden_states[-1][:, -1], out.logits[:, -1]).to(embeds.dtype)
        col = torch.where(latent[:, c, None], fill, embeds[:, c])
        embeds = torch.cat([embeds[:, :c], col[:, None], embeds[:, c + 1 :]], dim=1)
    out = lm.base(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    return _loss(out.logits, lab)


SCHEDULES = {"per_column": per_column_forward, "coconut": coconut_forward, "recompute": recompute_forward}
