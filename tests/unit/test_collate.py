"""Collation: padding sides, masks, labels at pads, true position ids."""

from __future__ import annotations

import pytest
import torch

from ltscale.data import IGNORE_INDEX, Encoded, collate
from tests.helpers import make_tiny_llama

A = Encoded(input_ids=[1, 5, 6, 7], labels=[IGNORE_INDEX, IGNORE_INDEX, 6, 7], prompt_len=2, id="a")
B = Encoded(input_ids=[1, 8], labels=[IGNORE_INDEX, 8], prompt_len=1, id="b")


def test_right_padding():
    out = collate([A, B], pad_id=3)
    assert set(out) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert all(t.dtype == torch.long for t in out.values())
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 3, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]


def test_left_padding_true_positions():
    out = collate([A, B], pad_id=3, padding_side="left")
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [3, 3, 1, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def test_pad_to_multiple_of():
    out = collate([A, B], pad_id=0, pad_to_multiple_of=8)
    assert out["input_ids"].shape == (2, 8)
    assert out["attention_mask"].sum().item() == 6
    assert collate([A], pad_id=0, pad_to_multiple_of=4)["input_ids"].shape == (1, 4)


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        collate([A], pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="labels"):
        collate([Encoded([1, 2], [1], 0, "bad")], pad_id=0)


def test_matches_unpadded_forward_under_left_padding():
    """Left padding + our position_ids reproduce the unpadded logits of a tiny Llama."""
    model = make_tiny_llama(
        vocab_size=16, hidden=16, layers=1, heads=2, dtype=torch.float32, max_positions=2048,
        isolated_rng=False, record_dtype=False,
    ).eval()  # fmt: skip
    batch = collate([A, B], pad_id=0, padding_side="left")
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        ref = model(input_ids=torch.tensor([B.input_ids])).logits
    torch.testing.assert_close(logits[1, -2:], ref[0], rtol=1e-5, atol=1e-5)
