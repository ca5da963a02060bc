"""Batching of :class:`~ltscale.data.formatting.Encoded` sequences.

``position_ids`` are returned explicitly (0 at each sequence's first real token) because the
latent rollout runs ragged passes with its own 4D masks and cannot let the model infer positions
from padding; left padding without them would shift RoPE positions. Pads get position 0,
attention 0 and label -100, so they are inert whatever the model does with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .formatting import IGNORE_INDEX, Encoded

__all__ = ["collate"]


def collate(
    examples: Sequence[Encoded],
    *,
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence (rounded up to ``pad_to_multiple_of``) -> LongTensors
    ``input_ids``, ``attention_mask``, ``labels`` (-100 at pads), ``position_ids``."""
    if not examples:
        raise ValueError("collate: empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        if len(e.labels) != n:
            raise ValueError(f"{e.id}: {n} input ids but {len(e.labels)} labels")
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, sl] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, sl] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, sl] = 1
        position_ids[row, sl] = torch.arange(n, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }
