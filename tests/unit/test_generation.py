"""Batched latent decoding with a KV cache == one-at-a-time full-recompute decoding."""

from __future__ import annotations

import pytest
import torch

from ltscale.model import LatentLM
from ltscale.model.reference import reference_generate
from tests.unit.test_rollout import THINK, tiny_base

EOS = 5


def prompts(pad_side: str):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(6, 60, (4, 7), generator=g)
    lens = [7, 4, 6, 2]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        if pad_side == "left":
            mask[b, 7 - n:] = 1
        else:
            mask[b, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def model(mode: str, think_bias: float) -> LatentLM:
    base = tiny_base(seed=7)
    with torch.no_grad():
        base.lm_head.weight[THINK] += think_bias  # make <thinking> a frequent argmax
        base.lm_head.weight[EOS] += 0.3
    return LatentLM(base, THINK, mode=mode).eval()


@pytest.mark.parametrize("mode", ["hidden", "fusion", "pause"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_batched_equals_one_at_a_time(mode, pad_side):
    lm = model(mode, think_bias=0.35)
    ids, mask = prompts(pad_side)
    fast = lm.generate(ids, mask, 16, eos_token_id=EOS, pad_token_id=0)
    ref = reference_generate(lm, ids, mask, 16, eos_token_id=EOS, pad_token_id=0)
    assert torch.equal(fast.sequences, ref.sequences)
    assert torch.equal(fast.num_latent, ref.num_latent)
    assert torch.equal(fast.lengths, ref.lengths)
    assert int(fast.num_latent.sum()) > 0, "test is vacuous: no latent step was taken"


def test_without_thinking_never_emits_the_token():
    lm = model("fusion", think_bias=2.0)
    ids, mask = prompts("left")
    out = lm.generate(ids, mask, 10, eos_token_id=EOS, without_thinking=True)
    assert not (out.sequences == THINK).any() and int(out.num_latent.sum()) == 0
    ref = reference_generate(lm, ids, mask, 10, eos_token_id=EOS, without_thinking=True)
    assert torch.equal(out.sequences, ref.sequences)


def test_per_sample_eos_and_padding_after_it():
    lm = model("fusion", think_bias=0.35)
    ids, mask = prompts("left")
    out = lm.generate(ids, mask, 16, eos_token_id=EOS, pad_token_id=0)
    for b in range(ids.shape[0]):
        n = int(out.lengths[b])
        if n < 16:
            assert int(out.sequences[b, n - 1]) == EOS
            assert torch.all(out.sequences[b, n:] == 0)
