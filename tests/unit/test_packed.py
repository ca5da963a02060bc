"""Packed rollout passes (ltscale/model/packed.py) against the padded passes they replace.

Both paths must give the same loss, logits and every parameter gradient; the packed one must put
only real tokens through the Linear layers, and must refuse (not silently mis-compute) a decoder
that does not route attention through transformers' ``AttentionInterface``.
"""

from __future__ import annotations

import pytest
import torch

from ltscale.model import LatentLM
from ltscale.model.packed import packing_supported
from ltscale.model.rollout import latent_rollout
from tests.unit.test_rollout import THINK, assert_grads_close, batch, grads, tiny_base


def run(lm: LatentLM, packed: str, ids, mask, labels, **kw):
    lm.packed_passes = packed
    lm.zero_grad()
    out = lm(ids, mask, labels, **kw)
    out.loss.backward()
    return out, grads(lm)


@pytest.mark.parametrize("mode", ["hidden", "fusion"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_packed_equals_padded_values_and_gradients(mode, attn, pad_side):
    lm = LatentLM(tiny_base(attn=attn, tie=True), THINK, mode=mode, adapter=True, adapter_hidden=16).double().train()
    ids, mask, labels = batch("mixed", pad_side)
    fast, g_fast = run(lm, "auto", ids, mask, labels, min_passes=7)  # 2 empty lockstep passes at the end
    slow, g_slow = run(lm, "off", ids, mask, labels, min_passes=7)
    assert fast.n_passes == slow.n_passes == 7
    # eager attention takes its softmax in fp32 over a different key set (the padded path's padded
    # keys are masked, not absent), so fp64 agreement is ~1e-7 there
    tol = 1e-12 if attn == "sdpa" else 1e-6
    torch.testing.assert_close(fast.loss, slow.loss, rtol=tol, atol=0)
    valid = mask.bool()
    torch.testing.assert_close(fast.logits[valid], slow.logits[valid], rtol=tol, atol=tol)
    assert_grads_close(g_fast, g_slow, rtol=1e-6 if attn == "sdpa" else 1e-5)


def test_packed_passes_put_only_real_tokens_through_the_linears():
    lm = LatentLM(tiny_base(), THINK, mode="fusion").train()
    ids, mask, labels = batch("mixed")
    rows_seen: list[int] = []
    hook = lm.base.model.layers[0].mlp.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[:-1].numel()))
    try:
        run(lm, "auto", ids, mask, labels, min_passes=6)
        packed_rows = sum(rows_seen)
        rows_seen.clear()
        run(lm, "off", ids, mask, labels, min_passes=6)
    finally:
        hook.remove()
    real = int(mask.sum())
    # 6 passes, of which the last is an empty lockstep pass: one dummy token keeps its collectives
    assert packed_rows == real + 1
    assert sum(rows_seen) > real + 8, "the padded passes should carry padding in this layout"


def test_gradient_checkpointing_packed_is_bitwise_equal_to_plain_packed():
    base = tiny_base()
    ids, mask, labels = batch("mixed", "left")
    out = {}
    for ckpt in (False, True):
        lm = LatentLM(base, THINK, mode="fusion", gradient_checkpointing=ckpt).train()
        out[ckpt] = run(lm, "auto", ids, mask, labels)
    torch.testing.assert_close(out[True][0].loss, out[False][0].loss, rtol=0, atol=0)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-12, atol=1e-14)


def test_packing_supported_only_for_plain_attention():
    cfg = tiny_base().config
    assert packing_supported(cfg)
    cfg._attn_implementation = "flash_attention_2"
    assert not packing_supported(cfg)
    cfg._attn_implementation = "eager"
    cfg.attn_logit_softcapping = 50.0
    assert not packing_supported(cfg)


def test_a_decoder_that_drops_attention_kwargs_is_refused_not_miscomputed():
    lm = LatentLM(tiny_base(), THINK, mode="hidden")
    ids, mask, labels = batch("one")
    inner = lm.decoder()

    class DropsKwargs(torch.nn.Module):
        def forward(self, inputs_embeds, attention_mask, position_ids, use_cache, **_):
            return inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache)

    with pytest.raises(RuntimeError, match="does not pass attention kwargs through"):
        latent_rollout(decoder=DropsKwargs(), config=lm.base.config, embed=lm.embed, lm_head=lm.lm_head,
                       latent_input=lm.latent_input, input_ids=ids, attention_mask=mask, labels=labels,
                       thinking_token_id=THINK, packed=True)
    assert lm.base.config._attn_implementation == "sdpa", "the swap must be undone on error"


def test_bad_packed_passes_value_is_an_error():
    with pytest.raises(ValueError, match="packed_passes"):
        LatentLM(tiny_base(), THINK, mode="fusion", packed_passes="on")


def test_packed_passes_build_one_weight_gradient_per_decoder_linear_per_step(monkeypatch):
    from ltscale.ops import deferred

    built: list[tuple[int, ...]] = []
    original = deferred.WeightGradAccumulator.build

    def counting_build(self):
        grad = original(self)
        if grad is not None:
            built.append(tuple(grad.shape))
        return grad

    monkeypatch.setattr(deferred.WeightGradAccumulator, "build", counting_build)
    lm = LatentLM(tiny_base(), THINK, mode="hidden", gradient_checkpointing=True).train()
    ids, mask, labels = batch("mixed")
    out, g = run(lm, "auto", ids, mask, labels)
    assert out.n_passes == 5
    linears = [m for m in lm.decoder().modules() if type(m) is torch.nn.Linear]
    assert len(built) == len(linears), "one deferred gradient per decoder Linear, not one per pass"
    assert sorted(built) == sorted(tuple(m.weight.shape) for m in linears)
    assert all(f"base.{n}" in g for n, _ in lm.base.named_parameters() if "proj" in n)
    assert all(type(m).forward is torch.nn.Linear.forward and "forward" not in vars(m) for m in linears), \
        "the per-pass Linear override must be gone after the step"
