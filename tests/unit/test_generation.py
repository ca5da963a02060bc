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


def many_prompts(n: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(6, 60, (int(torch.randint(1, 9, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def one_at_a_time(lm, prompts, max_new, **kw):
    outs = [reference_generate(lm, torch.tensor([p]), None, max_new, eos_token_id=EOS, pad_token_id=0, **kw)
            for p in prompts]
    return (torch.cat([o.sequences for o in outs]), torch.cat([o.num_latent for o in outs]),
            torch.cat([o.lengths for o in outs]))


@pytest.mark.parametrize("slots", [1, 2, 3, 16])
def test_continuous_batching_equals_one_at_a_time(slots):
    from ltscale.model.generation import generate_many

    lm = model("fusion", think_bias=0.35)
    with torch.no_grad():
        lm.base.lm_head.weight[EOS] += 0.05  # some rows stop after 1-7 tokens, others think for 14
    ps = many_prompts()
    finished: list[int] = []
    fast = generate_many(lm, ps, 14, slots=slots, eos_token_id=EOS, pad_token_id=0, on_finish=finished.append)
    seqs, n_latent, lengths = one_at_a_time(lm, ps, 14)
    assert torch.equal(fast.sequences, seqs)
    assert torch.equal(fast.num_latent, n_latent)
    assert torch.equal(fast.lengths, lengths)
    assert sum(finished) == len(ps)
    assert int(n_latent.sum()) > 0, "test is vacuous: no latent step was taken"
    assert len(set(lengths.tolist())) > 2, "test is vacuous: rows should finish at different steps"


def test_continuous_batching_follows_the_forced_schedule_per_row():
    from ltscale.model.generation import generate_many

    lm = model("hidden", think_bias=0.0)
    ps = many_prompts(5)
    forced = torch.tensor([THINK, THINK, 7])
    fast = generate_many(lm, ps, 10, slots=2, eos_token_id=EOS, pad_token_id=0, forced=forced)
    seqs, n_latent, lengths = one_at_a_time(lm, ps, 10, forced=forced)
    assert torch.equal(fast.sequences[:, :3], forced.expand(5, 3)), "late-admitted rows start their own schedule"
    assert torch.equal(fast.sequences, seqs) and torch.equal(fast.lengths, lengths)
    assert torch.all(fast.num_latent >= 2)


def test_a_stop_condition_ends_its_row_and_frees_the_slot():
    """Row i stops after 2 + i % 4 steps unless EOS came first; 2 slots for 7 prompts, so stopped rows
    make room for waiting ones. Every row equals the reference's decode cut where it stopped."""
    from ltscale.model.generation import generate_many

    lm = model("fusion", think_bias=0.35)
    ps = many_prompts()
    seqs, _, lengths = one_at_a_time(lm, ps, 14)
    want = [min(int(lengths[i]), 2 + i % 4) for i in range(len(ps))]

    def stop(i: int, ids: list[int]) -> bool:
        assert ids == seqs[i, : len(ids)].tolist() and ids[-1] != EOS
        return len(ids) >= 2 + i % 4

    fast = generate_many(lm, ps, 14, slots=2, eos_token_id=EOS, pad_token_id=0, stop=stop)
    assert fast.lengths.tolist() == want and max(want) < int(lengths.max())
    for i, n in enumerate(want):
        assert fast.sequences[i, :n].tolist() == seqs[i, :n].tolist() and not fast.sequences[i, n:].any()
        assert int(fast.num_latent[i]) == int((seqs[i, :n] == THINK).sum())
    assert int(fast.num_latent.sum()) > 0, "test is vacuous: no latent step was taken"


def test_generate_many_rejects_bad_input():
    from ltscale.model.generation import generate_many

    lm = model("fusion", think_bias=0.0)
    with pytest.raises(ValueError, match="prompt 1 has none"):
        generate_many(lm, [[7, 8], []], 4, slots=2)
    with pytest.raises(ValueError, match="slots=0"):
        generate_many(lm, [[7, 8]], 4, slots=0)


def test_left_pad_puts_every_rows_last_token_in_the_last_column():
    from ltscale.model.generation import left_pad

    ids, mask = left_pad([[7, 8, 9], [5], torch.tensor([3, 4])], pad_id=1)
    assert ids.tolist() == [[7, 8, 9], [1, 1, 5], [1, 3, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    empty_ids, empty_mask = left_pad([])
    assert empty_ids.shape == empty_mask.shape == (0, 0)
