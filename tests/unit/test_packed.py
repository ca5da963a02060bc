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


def _count_kv_repeats(monkeypatch) -> list[int]:
    """Calls of transformers' ``repeat_kv`` that copy K/V up to the query head count (n_rep > 1)."""
    import transformers.integrations.sdpa_attention as hf_sdpa
    import transformers.models.llama.modeling_llama as hf_llama

    seen: list[int] = []
    for mod in (hf_sdpa, hf_llama):
        real = mod.repeat_kv
        monkeypatch.setattr(mod, "repeat_kv", lambda x, n, _real=real: (n > 1 and seen.append(n), _real(x, n))[1])
    return seen


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_gqa_fold_equals_unfolded_and_reference_without_repeating_kv(attn, heads, kv_heads, packed, monkeypatch):
    """Folding the G query heads of a K/V head into the query length is exact (fp64, values and
    every gradient) and never expands K/V to the query head count, in packed and padded passes."""
    from ltscale.model.reference import reference_forward
    from tests.helpers import make_tiny_llama

    base = make_tiny_llama(64, heads=heads, kv_heads=kv_heads, attn=attn, max_positions=2048, isolated_rng=False,
                           record_dtype=False)
    lm = LatentLM(base, THINK, mode="fusion", alpha=0.6, top_p=0.9).train()
    ids, mask, labels = batch("mixed", "left")
    repeats = _count_kv_repeats(monkeypatch)
    results = {}
    for fold in (True, False):
        lm.zero_grad()
        res = latent_rollout(decoder=lm.decoder(), config=lm.base.config, embed=lm.embed, lm_head=lm.lm_head,
                             latent_input=lm.latent_input, input_ids=ids, attention_mask=mask, labels=labels,
                             thinking_token_id=THINK, min_passes=6, packed=packed, fold_gqa=fold)
        (res.loss_sum / res.n_targets).backward()
        results[fold] = (res.loss_sum / res.n_targets, res.logits, grads(lm), len(repeats))
        repeats.clear()
    assert results[True][3] == 0, "the folded passes must not repeat K/V"
    assert results[False][3] > 0, "the unfolded reference repeats K/V (else this test proves nothing)"
    lm.zero_grad()
    ref = reference_forward(lm, ids, mask, labels)
    ref.loss.backward()
    g_ref = grads(lm)
    valid = mask.bool()
    # eager attention takes its softmax in fp32: fp64 agreement is ~1e-7 there (as in the tests above)
    tol = 1e-10 if attn == "sdpa" else 1e-6
    for fold in (True, False):
        loss, logits, g, _ = results[fold]
        torch.testing.assert_close(loss, ref.loss, rtol=tol, atol=0)
        torch.testing.assert_close(logits[valid], ref.logits[valid], rtol=tol, atol=tol)
        assert_grads_close(g, g_ref, rtol=1e-6 if attn == "sdpa" else 1e-5)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12 if attn == "sdpa" else tol, atol=0)
    assert_grads_close(results[True][2], results[False][2], rtol=1e-11 if attn == "sdpa" else 1e-5)


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention", "sdpa_paged"])
def test_unsupported_attention_is_refused_at_config_validation_and_construction(impl):
    from ltscale.config import ConfigError
    from ltscale.model.families import KERNELS
    from ltscale.run_config import load_config

    assert KERNELS == ("sdpa", "eager")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation: .*not supported.*sdpa, eager"):
        load_config(None, [f"model.attn_implementation={impl}"])
    base = tiny_base()
    base.config._attn_implementation = impl  # what a base loaded with that kernel reports
    with pytest.raises(ValueError, match=r"model\.attn_implementation: .*sdpa, eager"):
        LatentLM(base, THINK, mode="fusion")
    for ok in KERNELS:
        load_config(None, [f"model.attn_implementation={ok}"])
        LatentLM(tiny_base(attn=ok), THINK, mode="fusion")
