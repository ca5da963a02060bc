"""Context-Prediction Fusion: the sparse path vs the dense reference vs a literal transcription of
docs/method.md §5.2, including the cut rule and the masked <thinking> token."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from ltscale.ops import (
    context_prediction_fusion,
    fused_available,
    fusion_reference,
    fusion_sparse_torch,
    fusion_weights_dense,
)
from ltscale.ops import fusion as fusion_mod
from ltscale.ops.fusion import fusion_fused


def spec_transcription(h, logits, E, alpha, T, top_p, k):
    """docs/method.md §5.2 exactly as written, one row at a time in Python."""
    out = []
    for row_h, row_l in zip(h, logits):
        scaled = row_l / T
        scaled[k] = float("-inf")
        P = torch.softmax(scaled, -1)
        order = sorted(range(len(P)), key=lambda i: -float(P[i]))
        kept, cum = [], 0.0
        for i in order:
            cum += float(P[i])
            # top_p == 1 keeps everything (ltscale's documented guard against fp round-off)
            if cum <= top_p or not kept or top_p >= 1.0:
                kept.append(i)
            else:
                break
        z = sum(float(P[i]) for i in kept)
        e_pred = sum(float(P[i]) / z * E[i] for i in kept)
        out.append(alpha * row_h + (1 - alpha) * e_pred)
    return torch.stack(out)


# the compiled op joins when it is built (tests/unit/test_fusion_ext.py covers it in depth)
IMPLS_UNDER_TEST = [fusion_reference, fusion_sparse_torch] + ([fusion_fused] if fused_available() else [])


def inputs(n=5, V=40, d=8, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        scale * torch.randn(n, V, generator=g, dtype=torch.float64),
        torch.randn(V, d, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    "alpha,T,top_p", [(0.6, 1.0, 0.9), (0.3, 0.7, 0.5), (0.6, 2.0, 1.0), (0.5, 1.0, 0.05)]
)
def test_matches_spec_transcription(alpha, T, top_p):
    h, logits, E = inputs()
    want = spec_transcription(h, logits.clone(), E, alpha, T, top_p, k=3)
    for fn in IMPLS_UNDER_TEST:
        got = fn(h, logits, E, alpha=alpha, temperature=T, top_p=top_p, exclude_token_id=3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_alpha_one_is_hidden_and_alpha_zero_is_expectation():
    h, logits, E = inputs()
    one = context_prediction_fusion(h, logits, E, alpha=1.0, temperature=1.0, top_p=0.9, exclude_token_id=0)
    torch.testing.assert_close(one, h, rtol=0, atol=0)
    zero = context_prediction_fusion(h, logits, E, alpha=0.0, temperature=1.0, top_p=1.0, exclude_token_id=0)
    P = torch.softmax(logits.clone().index_fill(-1, torch.tensor([0]), float("-inf")), -1)
    torch.testing.assert_close(zero, P @ E, rtol=1e-12, atol=1e-12)


def test_thinking_token_gets_zero_weight_even_when_it_is_the_argmax():
    h, logits, E = inputs()
    logits[:, 7] = 50.0  # <thinking> dominates
    w = fusion_weights_dense(logits, temperature=1.0, top_p=0.9, exclude_token_id=7)
    assert torch.all(w[:, 7] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w), dtype=w.dtype))


def test_top1_alone_exceeding_top_p_is_kept_alone():
    h, logits, E = inputs()
    logits[:, 5] = 30.0
    w = fusion_weights_dense(logits, temperature=1.0, top_p=0.9, exclude_token_id=None)
    assert torch.all(w[:, 5] == 1.0) and torch.all((w > 0).sum(-1) == 1)


def test_crossing_token_is_excluded():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    w = fusion_weights_dense(logits, temperature=1.0, top_p=0.9, exclude_token_id=None)
    # cumsum 0.5, 0.8 <= 0.9 kept; 0.95 crosses -> dropped (official code's rule)
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_sparse_grads_equal_dense_grads(top_p):
    h, logits, E = inputs(n=6, V=50, d=8, seed=2, scale=1.5)
    E_rep = E.clone()
    res = {}
    for fn in IMPLS_UNDER_TEST:
        hh, ll, ee = (t.clone().requires_grad_() for t in (h, logits, E_rep))
        out = fn(hh, ll, ee, alpha=0.4, temperature=0.8, top_p=top_p, exclude_token_id=1)
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()
        res[fn.__name__] = (out.detach(), hh.grad, ll.grad, ee.grad)
    for name in res:
        for a, b in zip(res["fusion_reference"], res[name]):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_gradcheck_sparse():
    h, logits, E = inputs(n=3, V=12, d=4, seed=3, scale=1.0)

    def fn(a, b, c):
        return fusion_sparse_torch(a, b, c, alpha=0.6, temperature=1.3, top_p=0.8, exclude_token_id=2)

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (h, logits, E)))


def test_repeated_rows_across_batch_accumulate_into_E():
    h, logits, E = inputs(n=4, V=10, d=4)
    logits[:] = logits[0]  # every row keeps the same tokens
    E = E.requires_grad_()
    fusion_sparse_torch(
        h, logits, E, alpha=0.5, temperature=1.0, top_p=0.9, exclude_token_id=None
    ).sum().backward()
    g_sparse = E.grad.clone()
    E.grad = None
    fusion_reference(
        h, logits, E, alpha=0.5, temperature=1.0, top_p=0.9, exclude_token_id=None
    ).sum().backward()
    torch.testing.assert_close(g_sparse, E.grad, rtol=1e-12, atol=1e-14)


def test_bad_arguments_are_named(monkeypatch):
    h, logits, E = inputs()
    with pytest.raises(ValueError, match="alpha"):
        context_prediction_fusion(h, logits, E, alpha=1.5, temperature=1.0, top_p=0.9, exclude_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        context_prediction_fusion(h, logits, E, alpha=0.5, temperature=1.0, top_p=0.0, exclude_token_id=0)
    with pytest.raises(ValueError, match="empty partition"):
        context_prediction_fusion(
            h, logits, torch.empty(0), alpha=0.5, temperature=1.0, top_p=0.9, exclude_token_id=0
        )
    monkeypatch.setattr(fusion_mod, "_native", lambda: None)  # as on a machine where the build failed
    with pytest.raises(RuntimeError, match="not built"):
        context_prediction_fusion(
            h, logits, E, alpha=0.5, temperature=1.0, top_p=0.9, exclude_token_id=0, impl="fused"
        )


def _load_setup_py(repo_root):
    spec = importlib.util.spec_from_file_location("_ltscale_setup_fusion", repo_root / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # guarded by __name__ == "__main__": setup() does not run
    return mod


def test_setup_py_cuda_plan(repo_root, tmp_path, monkeypatch):
    """setup.py builds the CUDA kernel only with a CUDA torch and nvcc; FORCE_CUDA=1 makes a
    missing one an error (the CI compile proof) instead of the printed C++-only fallback."""
    setup_py = _load_setup_py(repo_root)
    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    (cuda_home / "bin" / "nvcc").write_text("")
    cuda_torch = SimpleNamespace(__version__="2.14.1+cu130", version=SimpleNamespace(cuda="13.0"))
    cpu_torch = SimpleNamespace(__version__="2.13.0+cpu", version=SimpleNamespace(cuda=None))
    toolkit, no_toolkit = SimpleNamespace(CUDA_HOME=str(cuda_home)), SimpleNamespace(CUDA_HOME=None)
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    assert setup_py._cuda_plan(cuda_torch, toolkit, True, "auto")[0] is True
    assert setup_py._cuda_plan(cuda_torch, toolkit, True, "cpu") == (False, "LTSCALE_BUILD_EXT=cpu")
    assert setup_py._cuda_plan(cuda_torch, toolkit, False, "auto")[0] is False
    ok, why = setup_py._cuda_plan(cpu_torch, no_toolkit, True, "auto")
    assert not ok and "not a CUDA build" in why
    ok, why = setup_py._cuda_plan(cuda_torch, SimpleNamespace(CUDA_HOME=str(tmp_path / "none")), True, "auto")
    assert not ok and "no nvcc" in why
    monkeypatch.setenv("FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="FORCE_CUDA=1 but .*not a CUDA build"):
        setup_py._cuda_plan(cpu_torch, no_toolkit, True, "auto")
    assert setup_py._cuda_plan(cuda_torch, toolkit, True, "auto")[0] is True


# ------------------------------------------------------------------------------------ kernel archs
def test_setup_py_embeds_ptx_for_the_newest_arch_and_records_it(repo_root, monkeypatch):
    """The default build holds sm_80 / sm_90 cubins and compute_90 PTX; the tag it compiles in
    is what ``fused_build_info`` reads back."""
    from ltscale.ops import fusion as F

    setup_py = _load_setup_py(repo_root)
    assert setup_py.DEFAULT_CUDA_ARCHS.endswith("+PTX")
    tag = setup_py.arch_tag(setup_py.DEFAULT_CUDA_ARCHS)
    assert tag == "sm_80_sm_90_ptx_90"
    assert setup_py.arch_tag("8.0 8.6;9.0a+PTX") == "sm_80_sm_86_sm_90a_ptx_90a"
    monkeypatch.setattr(F, "_native", lambda: SimpleNamespace(cuda_archs=tag))
    monkeypatch.setattr(F, "fused_available", lambda: True)
    info = F.fused_build_info()
    assert info["cuda_archs"] == ["sm_80", "sm_90"] and info["cuda_ptx"] == ["compute_90"]


@pytest.mark.parametrize(
    "capability,archs,ptx,runs",
    [
        ((8, 0), ["sm_80", "sm_90"], [], True),
        ((8, 6), ["sm_80", "sm_90"], [], True),  # a cubin runs on later minors of its major
        ((8, 9), ["sm_90"], [], False),
        ((9, 0), ["sm_80", "sm_90"], [], True),
        ((10, 0), ["sm_80", "sm_90"], [], False),  # a newer GPU: no machine code ...
        ((10, 0), ["sm_80", "sm_90"], ["compute_90"], True),  # ... but the PTX is JIT-compiled
        ((12, 0), ["sm_80"], ["compute_90"], True),
        ((8, 0), ["sm_90"], ["compute_90"], False),  # PTX never runs on an older GPU
        ((9, 0), ["sm_90a"], [], True),
        ((10, 0), ["sm_90a"], ["compute_90a"], False),  # arch-specific code: only its own GPU
        ((7, 5), [], [], False),
    ],
)
def test_kernel_runs_on_capability(capability, archs, ptx, runs):
    from ltscale.ops.fusion import kernel_runs_on

    assert kernel_runs_on(capability, archs, ptx) is runs


def _stub_cuda_build(monkeypatch, capability, archs, ptx):
    """A build with a CUDA kernel for ``archs``/``ptx`` and one visible GPU of ``capability``. What
    this proves without a GPU: the decision and where it is taken; what it cannot: that the driver
    really loads the code (tests/gpu does, on a GPU)."""
    from ltscale.ops import fusion as F

    info = {"built": True, "cpu": True, "cuda": True, "cuda_archs": archs, "cuda_ptx": ptx}
    monkeypatch.setattr(F, "fused_available", lambda: True)
    monkeypatch.setattr(F, "fused_build_info", lambda: dict(info))
    monkeypatch.setattr(F, "_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_a_gpu_without_code_is_a_clear_error_for_fused_and_a_fallback_for_auto(monkeypatch):
    from ltscale.ops import fusion as F

    _stub_cuda_build(monkeypatch, (10, 0), ["sm_80", "sm_90"], [])
    why = F.fused_device_problem("cuda:0")
    assert "compute capability 10.0" in why and "sm_80, sm_90" in why and "TORCH_CUDA_ARCH_LIST" in why
    assert F.fused_device_problem("cpu") is None
    _stub_cuda_build(monkeypatch, (10, 0), ["sm_80", "sm_90"], ["compute_90"])
    assert F.fused_device_problem("cuda:0") is None


def test_engine_fused_on_fails_at_construction_not_at_stage_3(monkeypatch):
    """``LatentLM(fusion_impl="fused")`` (``engine.fused: on``) on a machine whose GPU the build has
    no code for: refused when the model is built, in its first (cot) stage; ``auto`` is accepted
    (it falls back to the torch op at dispatch)."""
    from ltscale.model import LatentLM
    from tests.helpers import make_tiny_llama

    _stub_cuda_build(monkeypatch, (10, 0), ["sm_80", "sm_90"], [])
    with pytest.raises(RuntimeError, match=r"engine.fused=on .*cuda:0.*compute capability 10\.0"):
        LatentLM(make_tiny_llama(), 63, mode="cot", fusion_impl="fused")
    LatentLM(make_tiny_llama(), 63, mode="cot", fusion_impl="auto")
    _stub_cuda_build(monkeypatch, (9, 0), ["sm_80", "sm_90"], [])
    lm = LatentLM(make_tiny_llama(), 63, mode="cot", fusion_impl="fused")
    # model placement re-checks: a device with no kernel at all
    with pytest.raises(RuntimeError, match=r"engine.fused=on .*meta"):
        lm.to("meta")
