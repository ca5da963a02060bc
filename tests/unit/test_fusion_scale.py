"""The fusion op's ``embed_scale`` (scaled-embedding models, docs/method.md): every implementation
against the dense reference and against the spec's equation with a scaled table, values and
gradients (hidden, logits, E) in float64, with and without the step's deferred E-gradient.

The compiled op takes no scale argument: ``fusion_fused`` runs it at ``a' = a / (a + (1-a) s)`` and
scales the output; these tests pin that rewrite to the reference. CPU only (the CUDA kernel runs the
same rewrite; tests/gpu covers the kernel itself).
"""

from __future__ import annotations

import pytest
import torch

from ltscale.ops import context_prediction_fusion, fusion_reference
from ltscale.ops import deferred as D
from tests.helpers import require_fused

V, D_MODEL, THINK = 40, 8, 3
SCALE = float(torch.tensor(D_MODEL**0.5, dtype=torch.float32))  # Gemma's sqrt(d), as the module rounds it


def inputs(seed: int = 0, lead=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*lead, D_MODEL, generator=g, dtype=torch.float64),
        3 * torch.randn(*lead, V, generator=g, dtype=torch.float64),
        torch.randn(V, D_MODEL, generator=g, dtype=torch.float64),
    )


def run(impl: str, alpha: float, top_p: float, scale: float, *, deferred: bool = False, seed: int = 0):
    """Output and gradients of ``sum(out * w)`` with respect to hidden, logits and E."""
    h0, l0, e0 = inputs(seed)
    h, lg, emb = (t.clone().requires_grad_() for t in (h0, l0, e0))
    acc = D.DeferredWeightGrads() if deferred else None
    out = context_prediction_fusion(
        h,
        lg,
        emb,
        alpha=alpha,
        temperature=0.8,
        top_p=top_p,
        exclude_token_id=THINK,
        impl=impl,
        deferred=acc,
        embed_scale=scale,
    )
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    return out.detach(), h.grad, lg.grad, emb.grad


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("top_p", [0.5, 1.0])  # kept rows / the dense product
def test_reference_is_the_equation_with_a_scaled_table(alpha, top_p):
    """``a*h + (1-a) sum_w P(w) (s E)(w)``: the scale is the same as scaling the table."""
    h, lg, emb = inputs()
    got = fusion_reference(
        h, lg, emb, alpha=alpha, temperature=0.8, top_p=top_p, exclude_token_id=THINK, embed_scale=SCALE
    )
    want = fusion_reference(
        h, lg, SCALE * emb, alpha=alpha, temperature=0.8, top_p=top_p, exclude_token_id=THINK
    )
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    unscaled = fusion_reference(h, lg, emb, alpha=alpha, temperature=0.8, top_p=top_p, exclude_token_id=THINK)
    assert alpha == 1.0 or not torch.allclose(got, unscaled), "the scale must change the result"


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("top_p", [0.5, 1.0])
@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_implementations_match_the_reference_values_and_gradients(impl, top_p, alpha, deferred):
    if impl == "fused":
        require_fused()
    want = run("reference", alpha, top_p, SCALE)
    got = run(impl, alpha, top_p, SCALE, deferred=deferred)
    for name, a, b in zip(("out", "hidden", "logits", "E"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", ["reference", "torch", "fused"])
def test_scale_one_is_the_unscaled_op_bit_for_bit(impl):
    if impl == "fused":
        require_fused()
    h, lg, emb = inputs()
    kw = dict(alpha=0.6, temperature=0.8, top_p=0.9, exclude_token_id=THINK, impl=impl)
    assert torch.equal(
        context_prediction_fusion(h, lg, emb, **kw, embed_scale=1.0),
        context_prediction_fusion(h, lg, emb, **kw),
    )


@pytest.mark.parametrize("impl", ["reference", "torch", "fused"])
def test_one_kept_token_is_the_scaled_row_exactly(impl):
    """``alpha = 0`` and a kept set of one: the embedding module's output for that token, bit for bit."""
    if impl == "fused":
        require_fused()
    h, lg, emb = inputs()
    out = context_prediction_fusion(
        h,
        lg,
        emb,
        alpha=0.0,
        temperature=1.0,
        top_p=1e-9,
        exclude_token_id=THINK,
        impl=impl,
        embed_scale=SCALE,
    )
    top = lg.index_fill(-1, torch.tensor([THINK]), float("-inf")).argmax(-1)
    assert torch.equal(out, emb[top] * torch.tensor(SCALE, dtype=emb.dtype))


def test_a_non_positive_scale_is_an_error():
    h, lg, emb = inputs()
    with pytest.raises(ValueError, match="embed_scale=0"):
        context_prediction_fusion(
            h,
            lg,
            emb,
            alpha=0.6,
            temperature=1.0,
            top_p=0.9,
            exclude_token_id=THINK,
            impl="torch",
            embed_scale=0.0,
        )
