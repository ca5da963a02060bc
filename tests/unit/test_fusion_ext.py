"""The compiled Context-Prediction Fusion op (``ltscale._C``, CPU kernel) against the torch
reference: values, gradients to hidden / logits / E, fp64 gradcheck, the spec's edge cases, and
the dispatch rules of ``impl``.

The extension is built by ``make install``; without it these tests skip locally, and fail under
``CI=true`` (there a skip would hide that the compiled path never ran).
"""

from __future__ import annotations

import os

import pytest
import torch

from ltscale.ops import fusion as F
from tests.helpers import require_fused

require_fused(module_level=True)


def make(n=6, V=50, d=8, seed=0, scale=3.0, dtype=torch.float64, extra_rows=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype)
    logits = scale * torch.randn(n, V, generator=g, dtype=dtype)
    E = torch.randn(V + extra_rows, d, generator=g, dtype=dtype)
    return h, logits, E


def run(fn, h, logits, E, **kw):
    """Output and the grads of a fixed non-uniform loss w.r.t. (hidden, logits, E)."""
    hh, ll, ee = (t.clone().requires_grad_() for t in (h, logits, E))
    out = fn(hh, ll, ee, **kw)
    weights = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()
    (out * weights).sum().backward()
    return out.detach(), hh.grad, ll.grad, ee.grad


def assert_parity(h, logits, E, rtol, atol, **kw):
    ref = run(F.fusion_reference, h, logits, E, **kw)
    got = run(F.fusion_fused, h, logits, E, **kw)
    for name, a, b in zip(("out", "d_hidden", "d_logits", "d_E"), ref, got):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return ref, got


CASES = {
    "paper-default": dict(alpha=0.6, temperature=1.0, top_p=0.9, exclude_token_id=3),
    "temperature-0.7": dict(alpha=0.3, temperature=0.7, top_p=0.5, exclude_token_id=None),
    "temperature-2-top_p-1": dict(alpha=0.6, temperature=2.0, top_p=1.0, exclude_token_id=1),
    "tiny-top_p": dict(alpha=0.5, temperature=1.0, top_p=0.05, exclude_token_id=0),
    "alpha-0": dict(alpha=0.0, temperature=1.3, top_p=0.9, exclude_token_id=2),
    "alpha-1": dict(alpha=1.0, temperature=1.0, top_p=0.9, exclude_token_id=2),
}


@pytest.mark.parametrize("case", CASES)
def test_fp64_values_and_grads_equal_reference(case):
    assert_parity(*make(), rtol=1e-12, atol=1e-12, **CASES[case])


@pytest.mark.parametrize("case", ["paper-default", "temperature-2-top_p-1", "alpha-0"])
def test_fp32_values_and_grads_equal_reference(case):
    assert_parity(*make(n=9, V=300, d=32, dtype=torch.float32, seed=1), rtol=1e-5, atol=1e-6, **CASES[case])


@pytest.mark.parametrize("case", ["paper-default", "temperature-0.7", "temperature-2-top_p-1", "tiny-top_p"])
def test_gradcheck_fp64(case):
    h, logits, E = make(n=3, V=12, d=4, seed=3, scale=1.0)
    kw = CASES[case]
    fn = lambda a, b, c: F.fusion_fused(a, b, c, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (h, logits, E)))


def test_top1_alone_exceeding_top_p_is_kept_alone():
    h, logits, E = make()
    logits[:, 5] = 30.0
    kw = dict(alpha=0.25, temperature=1.0, top_p=0.9, exclude_token_id=None)
    ref, got = assert_parity(h, logits, E, rtol=1e-12, atol=1e-12, **kw)
    torch.testing.assert_close(got[0], 0.25 * h + 0.75 * E[5].expand_as(h), rtol=1e-12, atol=1e-12)
    assert torch.all(got[2] == 0), "a lone kept token has weight 1 whatever its logit: zero logit grads"


def test_excluded_token_is_the_argmax():
    h, logits, E = make()
    logits[:, 7] = 50.0  # <thinking> dominates every row
    _, got = assert_parity(
        h, logits, E, rtol=1e-12, atol=1e-12, alpha=0.4, temperature=1.0, top_p=0.9, exclude_token_id=7
    )
    assert torch.all(got[2][:, 7] == 0) and torch.all(got[3][7] == 0)


def test_cut_tokens_get_exactly_zero_grads():
    h, logits, E = make(n=4, V=200, d=8, scale=2.0)
    kw = dict(alpha=0.6, temperature=1.0, top_p=0.7, exclude_token_id=None)
    kept = F.fusion_weights_dense(logits, temperature=1.0, top_p=0.7, exclude_token_id=None) > 0
    assert kept.sum() < kept.numel() // 2, "test needs cut tokens"
    _, d_logits, d_E = run(F.fusion_fused, h, logits, E, **kw)[1:]
    assert torch.all(d_logits[~kept] == 0)
    assert torch.all(d_E[~kept.any(0)] == 0)
    assert torch.all(d_logits[kept] != 0)


def test_repeated_rows_across_batch_accumulate_into_E():
    h, logits, E = make(n=5, V=30, d=6)
    logits[:] = logits[0]  # every row keeps the same tokens: E rows repeat across the batch
    assert_parity(
        h, logits, E, rtol=1e-12, atol=1e-12, alpha=0.5, temperature=1.0, top_p=0.9, exclude_token_id=None
    )


def test_large_flat_vocab_exercises_the_growing_partial_sort():
    # A flat distribution keeps thousands of tokens: the kept-set search runs several rounds.
    h, logits, E = make(n=4, V=6000, d=4, scale=0.3, seed=7)
    kw = dict(alpha=0.6, temperature=1.0, top_p=0.9, exclude_token_id=11)
    ref, got = assert_parity(h, logits, E, rtol=1e-10, atol=1e-12, **kw)
    kept_ref = F.fusion_weights_dense(logits, temperature=1.0, top_p=0.9, exclude_token_id=11) > 0
    assert torch.equal(got[2] != 0, kept_ref) and kept_ref.sum(-1).min() > 1000


def test_embedding_with_more_rows_than_vocab_and_leading_dims():
    h, logits, E = make(n=6, V=40, d=8, extra_rows=5)
    kw = dict(alpha=0.6, temperature=0.9, top_p=0.8, exclude_token_id=4)
    ref, got = assert_parity(h.reshape(2, 3, 8), logits.reshape(2, 3, 40), E, rtol=1e-12, atol=1e-12, **kw)
    assert got[0].shape == (2, 3, 8) and got[3].shape == E.shape and torch.all(got[3][40:] == 0)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_partial_requires_grad(needs):
    h, logits, E = make()
    kw = CASES["paper-default"]
    ref_grads = run(F.fusion_reference, h, logits, E, **kw)[1:]
    ts = [t.clone().requires_grad_(n) for t, n in zip((h, logits, E), needs)]
    out = F.fusion_fused(*ts, **kw)
    (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()
    for t, n, want in zip(ts, needs, ref_grads):
        if n:
            torch.testing.assert_close(t.grad, want, rtol=1e-12, atol=1e-12)
        else:
            assert t.grad is None


def test_deterministic_and_no_grad():
    h, logits, E = make(n=8, V=500, d=16, dtype=torch.float32)
    kw = CASES["paper-default"]
    a = run(F.fusion_fused, h, logits, E, **kw)
    b = run(F.fusion_fused, h, logits, E, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(F.fusion_fused(h, logits, E, **kw), a[0])


def test_auto_dispatch_and_fused_errors(monkeypatch):
    h, logits, E = make()
    kw = CASES["paper-default"]
    calls = []
    real = F.fusion_fused
    monkeypatch.setattr(F, "fusion_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    F.context_prediction_fusion(h, logits, E, **kw)
    assert calls == [1], "auto must take the compiled op for float64 CPU inputs"
    # bf16 on CPU: no compiled kernel -> auto falls back, fused says why
    hb, lb, Eb = (t.to(torch.bfloat16) for t in (h, logits, E))
    torch.testing.assert_close(
        F.context_prediction_fusion(hb, lb, Eb, **kw), F.fusion_sparse_torch(hb, lb, Eb, **kw)
    )
    assert calls == [1]
    with pytest.raises(RuntimeError, match="bfloat16"):
        F.context_prediction_fusion(hb, lb, Eb, impl="fused", **kw)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        F.context_prediction_fusion(h, logits.float(), E, impl="fused", **kw)
    # the extension missing: fused names the fix, auto quietly uses torch
    monkeypatch.setattr(F, "_native", lambda: None)
    with pytest.raises(RuntimeError, match="not built"):
        F.context_prediction_fusion(h, logits, E, impl="fused", **kw)
    torch.testing.assert_close(
        F.context_prediction_fusion(h, logits, E, **kw), F.fusion_sparse_torch(h, logits, E, **kw)
    )


def test_kernel_argument_errors_are_clear():
    h, logits, E = make()
    with pytest.raises(RuntimeError, match="exclude_token_id=50"):
        F.fusion_fused(h, logits, E, alpha=0.5, temperature=1.0, top_p=0.9, exclude_token_id=50)
    with pytest.raises(RuntimeError, match="disagree on N"):
        torch.ops.ltscale.context_prediction_fusion_forward(h[:2], logits, E, 0.5, 1.0, 0.9, -1)


def test_build_info_reports_the_cpu_kernel():
    info = F.fused_build_info()
    assert info["built"] and info["cpu"]
    assert info["cuda"] == bool(info["cuda_archs"])


def test_kernel_bench_runs_at_toy_size(repo_root, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(repo_root / "bench" / "fusion_op.py"), "--vocab", "3000", "--dim", "16",
           "--batch", "2", "--reps", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo_root,
                          env={**os.environ, "LTSCALE_BENCH_JSON": str(out), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["headline"] > 0 and len(res["rows"]) == 1 and "| float32 | 3000 | 16 | 2 |" in proc.stdout


def test_large_embedding_grad_accumulates_and_steps():
    # E >= 4 MB: its gradient comes back as lazily zeroed pages (only kept rows written); it must
    # behave as an ordinary dense grad: accumulation over two backwards, clipping, optimizer steps.
    V, d = 9000, 128
    h, logits, E0 = make(n=6, V=V, d=d, dtype=torch.float32, seed=4)
    kw = CASES["paper-default"]
    params = {}
    for name, fn in (("ref", F.fusion_reference), ("fused", F.fusion_fused)):
        E = torch.nn.Parameter(E0.clone())
        for k in range(2):
            fn(h + k, logits, E, **kw).square().sum().backward()
        torch.nn.utils.clip_grad_norm_([E], max_norm=1.0)
        torch.optim.SGD([E], lr=0.1, momentum=0.9, weight_decay=0.01).step()
        params[name] = (E.grad.clone(), E.detach().clone())
    torch.testing.assert_close(params["fused"][0], params["ref"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(params["fused"][1], params["ref"][1], rtol=1e-5, atol=1e-6)
    adam_on_lazy_grad = torch.nn.Parameter(E0.clone())
    F.fusion_fused(h, logits, adam_on_lazy_grad, **kw).sum().backward()
    torch.optim.AdamW([adam_on_lazy_grad], lr=0.1).step()  # in-place optimizer ops on that grad
    assert torch.isfinite(adam_on_lazy_grad).all()
