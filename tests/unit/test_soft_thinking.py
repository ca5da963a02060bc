"""Soft-Thinking decoding: concept tokens, Cold Stop, and batched == per-sample."""

from __future__ import annotations

import pytest
import torch

from ltscale.methods.soft_thinking import SoftParams, SoftState, SoftThinkingRule, concept_weights, soft_step
from ltscale.model import LatentLM
from ltscale.model.generation import left_pad
from tests.helpers import tiny_latent_lm

VOCAB, THINK, EOS = 64, 63, 2


def tiny_lm() -> LatentLM:
    return tiny_latent_lm(THINK, "cot", VOCAB).eval()


def soft_generate(lm: LatentLM, ids, mask, max_new_tokens: int, *, params: SoftParams, eos_token_id: int):
    """Soft-Thinking decoding of a padded batch: the shared decode loop with the method's rule."""
    return lm.generate(ids, mask, max_new_tokens, eos_token_id=eos_token_id, rule=SoftThinkingRule(params))


def concept(lm: LatentLM, logits: torch.Tensor, temperature: float, top_k: int, top_p: float = 1.0):
    _, ids, w = concept_weights(logits, temperature, top_k, top_p)
    return (w[..., None] * lm.embed(ids)).sum(1)


def test_cold_temperature_and_top1_give_the_argmax_embedding():
    lm = tiny_lm()
    logits = torch.randn(5, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    argmax_emb = lm.embed(logits.argmax(-1))
    torch.testing.assert_close(concept(lm, logits, 1.0, top_k=1), argmax_emb, rtol=0, atol=0)
    torch.testing.assert_close(concept(lm, logits, 1e-4, top_k=20), argmax_emb)
    # a warm distribution is a real mixture: it differs from the argmax row
    assert (concept(lm, logits, 1.0, top_k=20) - argmax_emb).abs().max() > 1e-3


def test_top_p_keeps_the_crossing_token_and_weights_sum_to_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    _, ids, w = concept_weights(logits, 1.0, top_k=4, top_p=0.7)
    assert ids.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))


def _peaked(bsz: int, low: list[bool]) -> torch.Tensor:
    """Logits per row: one-hot-ish (entropy ~0) when low, uniform (entropy log V) otherwise."""
    out = torch.zeros(bsz, VOCAB, dtype=torch.float64)
    for b, is_low in enumerate(low):
        if is_low:
            out[b, 10 + b] = 50.0
    return out


def test_cold_stop_triggers_exactly_after_n_low_entropy_steps():
    n = 3
    # per step, per row: is the entropy low?  row 0: reset by a high step; row 1: low from the start
    # row 2: never low enough.
    pattern = [
        [False, True, False],
        [True, True, False],
        [True, True, False],
        [False, True, False],
        [True, True, False],
        [True, True, False],
        [True, True, False],
        [True, True, False],
    ]
    params = SoftParams(temperature=1.0, top_k=5, top_p=1.0, entropy_threshold=0.1, cold_stop_steps=n)
    state = SoftState.start(3, "cpu")
    soft = []
    for low in pattern:
        token, soft_now, _, _, state = soft_step(_peaked(3, low), state, params)
        soft.append(soft_now.tolist())
    rows = list(zip(*soft))
    # row 0: low run 1,2 then high (reset), then low 1,2,3 -> the 3rd low step (index 6) is explicit
    assert rows[0] == (True, True, True, True, True, True, False, False)
    # row 1: low from step 0 -> steps 0,1 soft, step 2 (3rd low) explicit, never soft again
    assert rows[1] == (True, True, False, False, False, False, False, False)
    assert all(rows[2])


def test_cold_stop_emits_think_end_and_think_end_top1_leaves_soft_mode():
    params = SoftParams(
        temperature=1.0, top_k=5, top_p=1.0, entropy_threshold=0.1, cold_stop_steps=1, think_end_id=7
    )
    token, soft_now, *_ = soft_step(_peaked(2, [True, False]), SoftState.start(2, "cpu"), params)
    assert soft_now.tolist() == [False, True] and int(token[0]) == 7
    logits = torch.zeros(1, VOCAB, dtype=torch.float64)
    logits[0, 7] = 3.0  # top-1 is the think-end token, entropy high
    token, soft_now, *_ = soft_step(logits, SoftState.start(1, "cpu"), params)
    assert soft_now.tolist() == [False] and int(token[0]) == 7


def _prompts():
    prompts = [[1, 5, 9, 13, 17, 21], [1, 8, 3], [1, 30, 31, 32, 33], [1, 40]]
    return prompts, *left_pad(prompts)


@pytest.mark.parametrize("threshold, n", [(0.0, 4), (float("inf"), 3), (3.9, 2)])
def test_batched_equals_per_sample(threshold, n):
    lm = tiny_lm()
    params = SoftParams(
        temperature=0.7, top_k=8, top_p=0.9, entropy_threshold=threshold, cold_stop_steps=n, exclude_id=THINK
    )
    prompts, ids, mask = _prompts()
    batched = soft_generate(lm, ids, mask, 10, params=params, eos_token_id=EOS)
    for b, p in enumerate(prompts):
        one = soft_generate(lm, torch.tensor([p]), None, 10, params=params, eos_token_id=EOS)
        assert torch.equal(batched.sequences[b], one.sequences[0]), b
        assert int(batched.num_latent[b]) == int(one.num_latent[0])
        assert int(batched.lengths[b]) == int(one.lengths[0])
    if threshold == float("inf"):
        assert batched.num_latent.tolist() == [n - 1] * 4  # every step is low-entropy
    if threshold == 0.0:
        assert (batched.num_latent == batched.lengths).all()  # never cold-stops


def test_top1_soft_decoding_is_greedy_decoding():
    lm = tiny_lm()
    _, ids, mask = _prompts()
    params = SoftParams(
        temperature=1.0, top_k=1, top_p=1.0, entropy_threshold=0.0, cold_stop_steps=5, exclude_id=THINK
    )
    soft = soft_generate(lm, ids, mask, 10, params=params, eos_token_id=EOS)
    greedy = lm.generate(ids, mask, 10, eos_token_id=EOS, without_thinking=True)
    assert torch.equal(soft.sequences, greedy.sequences)


def test_continuous_batching_equals_per_sample():
    """Rows joining and leaving the batch carry their soft-mode state with them (``Rows.state``)."""
    from ltscale.model.generation import generate_many

    lm = tiny_lm()
    with torch.no_grad():
        lm.base.lm_head.weight[EOS] += 0.04  # rows end after 1-10 steps: late rows join older ones
    # every step counts as low-entropy: a row's 4th step (counted from its own start) is explicit
    params = SoftParams(
        temperature=0.7,
        top_k=8,
        top_p=0.9,
        entropy_threshold=float("inf"),
        cold_stop_steps=4,
        exclude_id=THINK,
    )
    prompts = [[1, 5, 9, 13, 17, 21], [1, 8, 3], [1, 30, 31, 32, 33], [1, 40], [1, 41, 42], [1, 43, 44, 45]]
    rule = SoftThinkingRule(params)
    many = generate_many(lm, prompts, 10, slots=2, eos_token_id=EOS, rule=rule)
    for b, p in enumerate(prompts):
        one = generate_many(lm, [p], 10, slots=1, eos_token_id=EOS, rule=rule)
        assert torch.equal(many.sequences[b], one.sequences[0]), b
        assert int(many.num_latent[b]) == int(one.num_latent[0]) and int(many.lengths[b]) == int(
            one.lengths[0]
        )
    assert len(set(many.lengths.tolist())) > 2, "test is vacuous: rows should finish at different steps"
    assert many.num_latent.tolist() == [min(n, 3) for n in many.lengths.tolist()]
