"""GPU tier: the CUDA kernel of the fused Context-Prediction Fusion op against the torch reference.

fp32: values and grads (hidden, logits, E) close to the float64 reference, same kept set.
bf16: the kernel's error against float64 is at most 2x the error of the torch reference run in
bf16. Logits there are a permutation of distinct bf16-exact values: with ties at the top-p
boundary the kept set itself would be ambiguous (torch.sort's tie order is unspecified).

Skipped without CUDA or without the CUDA kernel in ``ltscale._C``; ``LTSCALE_REQUIRE_CUDA=1``
(set by tests/gpu/run_on_device.sh) turns that skip into a failure. Runs without pytest too
(``python tests/gpu/test_fusion_cuda.py``): the device machine may not have it.
"""

from __future__ import annotations

import os
import sys

import torch

try:
    import pytest
except ImportError:  # plain-python runner below
    pytest = None

from ltscale.ops import fusion as F

WHY_NOT = (
    "no CUDA device"
    if not torch.cuda.is_available()
    else None
    if F.fused_build_info()["cuda"]
    else "ltscale._C has no CUDA kernel (build with a CUDA torch + nvcc)"
)
if WHY_NOT is not None and pytest is not None:
    if os.environ.get("LTSCALE_REQUIRE_CUDA") == "1":
        pytest.fail(f"LTSCALE_REQUIRE_CUDA=1: {WHY_NOT}", pytrace=False)
    pytest.skip(WHY_NOT, allow_module_level=True)
if pytest is not None:
    pytestmark = pytest.mark.gpu

CASES = [
    dict(alpha=0.6, temperature=1.0, top_p=0.9, exclude_token_id=3),
    dict(alpha=0.3, temperature=0.7, top_p=0.5, exclude_token_id=None),
    dict(alpha=0.6, temperature=2.0, top_p=1.0, exclude_token_id=1),
    dict(alpha=0.5, temperature=1.0, top_p=0.05, exclude_token_id=0),
    dict(alpha=0.0, temperature=1.3, top_p=0.9, exclude_token_id=2),
    dict(alpha=1.0, temperature=1.0, top_p=0.9, exclude_token_id=2),
]


def make(n, V, d, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            scale * torch.randn(n, V, generator=g, dtype=torch.float64),
            torch.randn(V, d, generator=g, dtype=torch.float64))  # fmt: skip


def distinct_bf16_logits(n, V, seed=0):
    """Rows are permutations of k/32, k in [-V/2, V/2): distinct and exact in bf16 (V <= 256)."""
    assert V <= 256
    g = torch.Generator().manual_seed(seed)
    grid = (torch.arange(V, dtype=torch.float64) - V // 2) / 32
    return torch.stack([grid[torch.randperm(V, generator=g)] for _ in range(n)])


def run(fn, h, logits, E, device, dtype, **kw):
    # always a fresh leaf (a same-device, same-dtype .to() would return, and mark, the input itself)
    ts = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (h, logits, E)]
    out = fn(*ts, **kw)
    weights = torch.arange(out.numel(), device=device, dtype=torch.float64).reshape(out.shape).sin()
    (out.double() * weights).sum().backward()
    return [x.detach().double().cpu() for x in (out, *(t.grad for t in ts))]


def test_fp32_matches_fp64_reference():
    for i, kw in enumerate(CASES):
        h, logits, E = make(n=9, V=700, d=48, seed=i)
        ref = run(F.fusion_reference, h, logits, E, "cpu", torch.float64, **kw)
        got = run(F.fusion_fused, h, logits, E, "cuda", torch.float32, **kw)
        for name, a, b in zip(("out", "d_hidden", "d_logits", "d_E"), ref, got):
            torch.testing.assert_close(
                b, a, rtol=2e-5, atol=2e-6, msg=lambda m, n=name, k=kw: f"{k} {n}: {m}"
            )
        kept = F.fusion_weights_dense(logits, temperature=kw["temperature"], top_p=kw["top_p"],
                                      exclude_token_id=kw["exclude_token_id"]) > 0  # fmt: skip
        multi = kept.sum(-1) > 1  # a lone kept token has weight 1 whatever its logit: zero grad
        if kw["alpha"] < 1:
            assert torch.equal((got[2] != 0)[multi], kept[multi]), kw


def test_large_vocab_and_repeated_rows_fp32():
    # 32k vocab, flat-ish rows (thousands kept: the radix select's multi-level path) and every
    # row of the second half equal to row 0 (E-grad atomics onto the same rows).
    h, logits, E = make(n=16, V=32_000, d=64, seed=5, scale=0.5)
    logits[8:] = logits[0]
    kw = CASES[0]
    ref = run(F.fusion_reference, h, logits, E, "cpu", torch.float64, **kw)
    got = run(F.fusion_fused, h, logits, E, "cuda", torch.float32, **kw)
    for name, a, b in zip(("out", "d_hidden", "d_logits", "d_E"), ref, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    kept = F.fusion_weights_dense(logits, temperature=1.0, top_p=0.9, exclude_token_id=3) > 0
    assert torch.equal(got[2] != 0, kept) and kept.sum(-1).min() > 1000


def test_top1_exceeding_top_p_and_excluded_argmax():
    h, logits, E = make(n=6, V=500, d=32, seed=2)
    logits[:3, 11] = 40.0  # top-1 alone exceeds top_p
    logits[3:, 3] = 40.0  # the excluded token is the argmax
    ref = run(F.fusion_reference, h, logits, E, "cpu", torch.float64, **CASES[0])
    got = run(F.fusion_fused, h, logits, E, "cuda", torch.float32, **CASES[0])
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    assert torch.all(got[2][:, 3] == 0) and torch.all(got[3][3] == 0)


def test_bf16_error_at_most_twice_torch_bf16_error():
    g = torch.Generator().manual_seed(11)
    for i, kw in enumerate(CASES[:5]):
        n, V, d = 32, 256, 256
        # scaled by 1.5 or 3 the values stay distinct after bf16 rounding; rounded up front so the
        # float64 reference sees exactly the inputs the bf16 runs see
        logits = (distinct_bf16_logits(n, V, seed=i) * (1.5 if i % 2 else 3.0)).bfloat16().double()
        assert all(len(set(row.tolist())) == V for row in logits)
        h = torch.randn(n, d, generator=g, dtype=torch.float64).bfloat16().double()
        E = torch.randn(V, d, generator=g, dtype=torch.float64).bfloat16().double()
        exact = run(F.fusion_reference, h, logits, E, "cpu", torch.float64, **kw)
        torch_bf16 = run(F.fusion_reference, h, logits, E, "cuda", torch.bfloat16, **kw)
        fused_bf16 = run(F.fusion_fused, h, logits, E, "cuda", torch.bfloat16, **kw)
        for name, x, t, f in zip(("out", "d_hidden", "d_logits", "d_E"), exact, torch_bf16, fused_bf16):
            err_t, err_f = (t - x).abs().max().item(), (f - x).abs().max().item()
            assert err_f <= 2 * err_t + 1e-6, (
                f"{kw} {name}: fused bf16 error {err_f:.3g} > 2 x torch bf16 {err_t:.3g}"
            )


def test_fp16_runs_and_is_close():
    h, logits, E = make(n=8, V=300, d=64, seed=4, scale=2.0)
    ref = run(F.fusion_reference, h, logits, E, "cpu", torch.float64, **CASES[0])
    got = run(F.fusion_fused, h, logits.half().double(), E, "cuda", torch.float16, **CASES[0])
    torch.testing.assert_close(got[0], ref[0], rtol=5e-3, atol=5e-3)


def test_cuda_matches_cpu_kernel_and_auto_takes_it():
    h, logits, E = make(n=12, V=4000, d=40, seed=9)
    kw = CASES[1]
    cpu = run(F.fusion_fused, h, logits, E, "cpu", torch.float32, **kw)
    gpu = run(F.fusion_fused, h, logits, E, "cuda", torch.float32, **kw)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    hc, lc, Ec = (t.cuda().bfloat16() for t in (h, logits, E))
    assert F.fused_unsupported_reason(hc, lc, Ec) is None  # auto takes the CUDA kernel for bf16


def test_the_build_has_code_for_this_gpu():
    """The capability check (``kernel_runs_on``) agrees with the driver: this GPU runs the kernel."""
    info = F.fused_build_info()
    capability = torch.cuda.get_device_capability()
    assert F.kernel_runs_on(capability, info["cuda_archs"], info["cuda_ptx"]), (capability, info)
    assert F.fused_device_problem(torch.device("cuda")) is None


def _cuda_syncs(fn) -> list[str]:
    """The synchronizing CUDA operations ``fn`` runs (CUDA's sync debug mode, as warnings)."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message)[:120] for w in seen if "synchroniz" in str(w.message)]


def test_rollout_passes_do_not_sync_the_stream():
    """What the CPU sync counter cannot prove: on a real stream, a training step whose batch is on
    CPU (planned there, shipped in one copy) adds no synchronizing operation per pass, forward or
    backward: the same count at 5 and at 9 passes (the extra ones empty lockstep passes; what a step
    does once, e.g. an embedding backward, may sync). ``fusion`` on the torch op (the compiled kernel
    reads its kept-set size, one sync per call by design) and ``hidden``; packed and padded passes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ltscale.model import LatentLM

    think = 511
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (4, 32), generator=g)
    ids[0, 5], ids[1, 7], ids[1, 8], ids[3, 20] = think, think, think, think
    mask = torch.ones_like(ids)
    mask[2, 25:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    for mode in ("fusion", "hidden"):
        for packed in ("auto", "off"):
            torch.manual_seed(0)
            base = LlamaForCausalLM(cfg).cuda()
            lm = LatentLM(base, think, mode=mode, fusion_impl="torch", packed_passes=packed).train()

            def step(passes, lm=lm):
                lm.zero_grad(set_to_none=True)
                lm(ids, mask, labels, min_passes=passes).loss.backward()

            step(9)  # warm-up: cuBLAS handles, allocator pools
            counts = {p: _cuda_syncs(lambda p=p: step(p)) for p in (5, 9)}
            assert len(counts[5]) == len(counts[9]) <= 4, (mode, packed, counts)


if __name__ == "__main__":  # plain runner for machines without pytest
    if WHY_NOT is not None:
        print(f"FAILED: {WHY_NOT}")
        sys.exit(1)
    failed = 0
    for name, fn in sorted((k, v) for k, v in globals().items() if k.startswith("test_") and callable(v)):
        try:
            fn()
            print(f"PASSED {name}")
        except Exception as e:  # report every test, then fail
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
