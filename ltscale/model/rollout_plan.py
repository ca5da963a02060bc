"""The rollout's plan: every index a batch's passes need, computed once on CPU and shipped in one copy.

Why on CPU: which tokens pass ``k`` computes, how wide it is and where each row's keys live depend
on where the ``<thinking>`` slots are, i.e. on the data. Computed on the device, each of those
sizes is a host read (``.item()``, ``nonzero``, a boolean index) that stalls the stream, about six
per pass. The collator hands the ids over on CPU, so the plan is built there (shapes become Python
ints), all its index tensors are packed into one int64 buffer and copied to the device in one
transfer (pinned, non-blocking on CUDA); the passes then only launch kernels. ``plan.to("meta")``
works too: a ``meta`` model runs a full rollout from a CPU plan (shape checks at 8B size).

Token order: the plan numbers a batch's real tokens pass by pass, row-major inside a pass, by
position inside a row (``src``). Pass ``k`` computes tokens ``start .. start + n`` of that order, so
its input embeddings are a slice of one embedding call's real rows, its outputs are concatenated for
one LM-head call, and the packed K/V history is indexed by the same numbers.

An empty pass (``min_passes`` beyond what the batch needs, so that every ZeRO-3 rank runs the same
passes) is planned as one dummy query on row 0 with no history: every module is still called,
at the cost of one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ltscale.data.formatting import IGNORE_INDEX
from ltscale.model.device import to_device


@dataclass
class PassPlan:
    """Pass ``k``: its tokens and the indices its runner needs (CPU until ``RolloutPlan.to``)."""

    k: int
    n: int  # real tokens (0: an empty lockstep pass, run as one dummy query)
    start: int  # first token of this pass in the plan's token order
    bsz: int  # rows of the pass's padded/attention layout (1 for an empty pass)
    width: int  # W_k: query slots per row
    span: int  # T_k: keys per row in a packed pass (true positions 0 .. span-1)
    positions: torch.Tensor  # (n_run,) true position of each query
    q_real: torch.Tensor  # (n_run,) padded slot (row * width + offset) of each query
    latent_at: torch.Tensor  # (m,) which query of this pass is a latent slot (k >= 1)
    prev_packed: torch.Tensor  # (m,) where that row's previous token is in the previous pass's packed output
    prev_padded: torch.Tensor  # (m,) same, in the previous pass's flattened (bsz * width) padded output
    # packed passes: the query of each padded slot (bsz * width,), 0 on padding; the history index
    # of row b's token at true position j (bsz * span,)
    q_slots: torch.Tensor | None = None
    k_slots: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # padded: (bsz, width) bool
    pos2d: torch.Tensor | None = None  # padded: (bsz, width) true positions (0 on padding)

    @property
    def empty(self) -> bool:
        return self.n == 0

    @property
    def n_run(self) -> int:
        """Queries the decoder computes: the real tokens, or the dummy of an empty pass."""
        return max(self.n, 1)


@dataclass
class RolloutPlan:
    bsz: int
    length: int
    n_tokens: int  # real tokens of the batch
    n_targets: int  # labels that count in the loss
    passes: list[PassPlan]
    ids: torch.Tensor  # (B, L) the input ids (the embedding call takes the batch's own shape)
    src: torch.Tensor  # (n_tokens,) row * length + column of each token in plan order
    targets: torch.Tensor | None  # (n_tokens,) next-token label of each token in plan order
    packed: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to(self, device: torch.device | str) -> RolloutPlan:
        """The plan with every tensor on ``device``: one host-to-device copy of one int64 buffer,
        made by :func:`ltscale.model.device.to_device` (pinned and asynchronous on CUDA), the one
        helper through which batches reach a device."""
        device = torch.device(device)
        if device == self.device:
            return self
        slots = _tensor_slots(self)
        flat = (
            torch.cat([t.reshape(-1).long() for _, _, t in slots])
            if slots
            else torch.zeros(0, dtype=torch.long)
        )
        shipped = to_device(flat, device)
        parts = shipped.split([t.numel() for _, _, t in slots])
        for (owner, name, t), part in zip(slots, parts):
            part = part.view(t.shape)
            setattr(owner, name, part.bool() if t.dtype == torch.bool else part)
        self.device = device
        return self


def _tensor_slots(plan: RolloutPlan) -> list[tuple[object, str, torch.Tensor]]:
    out = []
    for owner in (plan, *plan.passes):
        for f in fields(owner):
            value = getattr(owner, f.name)
            if isinstance(value, torch.Tensor):
                out.append((owner, f.name, value))
    return out


def check_contiguous(valid: torch.Tensor) -> None:
    """Left or right padding only: "the next token" must be the next array column."""
    starts = valid.long().diff(dim=1).clamp(min=0).sum(dim=1) + valid[:, 0].long()
    bad = (starts > 1).nonzero()
    if bad.numel():
        raise ValueError(
            f"attention_mask row {int(bad[0, 0])} has holes; only left or right padding is supported"
        )


def count_passes(input_ids: torch.Tensor, attention_mask: torch.Tensor, thinking_token_id: int) -> int:
    """Sequential forward calls this batch needs: 1 + the most latent slots in any row (read on CPU)."""
    ids, valid = input_ids.detach().cpu(), attention_mask.detach().cpu().bool()
    latent = (ids == thinking_token_id) & valid
    return 1 + int(latent.sum(dim=1).max()) if latent.numel() else 1


def _on_cpu(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The batch tensors on CPU; from a device in one copy (one sync), not one per tensor."""
    present = [t.detach() for t in tensors if t is not None]
    if all(t.device.type == "cpu" for t in present):
        moved = iter(present)
    else:
        moved = iter(torch.stack([t.long() for t in present]).cpu().unbind(0))
    return [next(moved) if t is not None else None for t in tensors]


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(0) - x


def plan_rollout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    thinking_token_id: int,
    min_passes: int = 1,
    *,
    labels: torch.Tensor | None = None,
    packed: bool = True,
) -> RolloutPlan:
    """Split each row into causal segments at its latent slots; pad passes up to ``min_passes``.

    Reads its inputs on CPU (a batch handed over on the device costs one copy back). ``packed`` selects
    which runner's indices are built (``packed.py``'s packed passes, or the padded fallback).
    """
    ids, valid, lab = _on_cpu(input_ids, attention_mask, labels)
    valid = valid.bool()
    bsz, length = ids.shape
    check_contiguous(valid)
    if not bool(valid.any()):
        raise ValueError("attention_mask: the batch has no real token")
    latent = (ids == thinking_token_id) & valid
    true_pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    if bool((latent & (true_pos == 0)).any()):
        raise ValueError(
            "a <thinking> slot is the first token of a sequence: it has no previous state to read"
        )
    segment = latent.long().cumsum(dim=1).masked_fill(~valid, 0)  # pass index of each token
    n_passes = max(int(segment.max()) + 1, min_passes)
    counts = torch.zeros((bsz, n_passes), dtype=torch.long).scatter_add_(1, segment, valid.long())
    seg_start = torch.full((bsz, n_passes), length, dtype=torch.long)
    seg_start.scatter_reduce_(
        1, segment, torch.where(valid, true_pos, length), reduce="amin", include_self=True
    )
    offset = (true_pos - seg_start.gather(1, segment)).reshape(-1)
    flat_pos = true_pos.reshape(-1)
    flat_seg = segment.masked_fill(~valid, -1).reshape(-1)

    where_packed = torch.zeros((bsz, max(length, 1)), dtype=torch.long)  # history index of (row, position)
    passes: list[PassPlan] = []
    srcs: list[torch.Tensor] = []
    start = span = 0
    prev: PassPlan | None = None
    for k in range(n_passes):
        src = (flat_seg == k).nonzero().squeeze(1)  # row-major: rows, then positions
        n = int(src.numel())
        if n == 0:  # an empty lockstep pass; all later ones are empty too
            one, zero = torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
            spec = PassPlan(
                k=k,
                n=0,
                start=start,
                bsz=1,
                width=1,
                span=1,
                positions=zero,
                q_real=zero,
                latent_at=zero,
                prev_packed=zero,
                prev_padded=zero,
            )
            if packed:
                spec.q_slots, spec.k_slots = zero.clone(), zero.clone()
            else:
                spec.valid, spec.pos2d = one.bool().view(1, 1), zero.view(1, 1)
            passes.append(spec)
            prev = spec
            continue
        rows = src // max(length, 1)
        positions = flat_pos[src]
        width = int(counts[:, k].max())
        q_real = rows * width + offset[src]
        first = _exclusive_cumsum(counts[:, k])  # each row's first query in this pass
        if k > 0:
            latent_rows = (counts[:, k] > 0).nonzero().squeeze(1)
            latent_at = first[latent_rows]
            last_prev = counts[latent_rows, k - 1] - 1  # offset of the row's last token in pass k-1
            prev_packed = _exclusive_cumsum(counts[:, k - 1])[latent_rows] + last_prev
            prev_padded = latent_rows * prev.width + last_prev
        else:
            latent_at = prev_packed = prev_padded = torch.zeros(0, dtype=torch.long)
        spec = PassPlan(
            k=k,
            n=n,
            start=start,
            bsz=bsz,
            width=width,
            span=0,
            positions=positions,
            q_real=q_real,
            latent_at=latent_at,
            prev_packed=prev_packed,
            prev_padded=prev_padded,
        )
        if packed:
            spec.q_slots = torch.zeros(bsz * width, dtype=torch.long).index_put_((q_real,), torch.arange(n))
            where_packed[rows, positions] = torch.arange(start, start + n)
            span = max(span, int(positions.max()) + 1)
            spec.span = span
            spec.k_slots = where_packed[:, :span].reshape(-1).clone()  # later passes write where_packed
        else:
            spec.valid = (
                torch.zeros(bsz * width, dtype=torch.bool).index_fill_(0, q_real, True).view(bsz, width)
            )
            spec.pos2d = (
                torch.zeros(bsz * width, dtype=torch.long).index_put_((q_real,), positions).view(bsz, width)
            )
        passes.append(spec)
        srcs.append(src)
        start += n
        prev = spec
    src = torch.cat(srcs)
    targets, n_targets = None, 0
    if labels is not None:
        # The target of the token at column l is the label of column l + 1 (rows are contiguous).
        next_labels = torch.full_like(lab, IGNORE_INDEX)
        next_labels[:, :-1] = lab[:, 1:]
        next_labels = next_labels.masked_fill(~valid, IGNORE_INDEX)
        targets = next_labels.reshape(-1)[src]
        n_targets = int((targets != IGNORE_INDEX).sum())
    return RolloutPlan(
        bsz=bsz,
        length=length,
        n_tokens=start,
        n_targets=n_targets,
        passes=passes,
        ids=ids,
        src=src,
        targets=targets,
        packed=packed,
    )
