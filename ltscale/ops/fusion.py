"""Context-Prediction Fusion (docs/method.md §5.2): ``e = a*h + (1-a) * s * sum_w P(w) E(w)``.

``s`` (``embed_scale``) is the factor the model's input-embedding module multiplies its rows by
(sqrt(d) for Gemma, 1 elsewhere), so the expected embedding is the embedding module's output under
``P`` (docs/method.md §6).

``P`` is the temperature softmax of the logits with ``<thinking>`` masked, cut to the tokens whose
cumulative (descending) probability is <= ``top_p`` (the official code's rule: the token that
crosses the threshold is *excluded*; the top-1 token is always kept), then renormalised.

Three implementations share one signature:

* ``fusion_reference`` — a direct transcription of the equations: dense ``P @ E`` over the whole
  vocabulary. Slow, obviously right; the parity anchor.
* ``fusion_sparse_torch`` — gathers only the kept rows of ``E`` (after top-p a handful of rows carry
  weight), so it never reads the ``V x d`` matrix (dense product when more than V/4 are kept).
  Same values and gradients as the reference.
* ``fusion_fused`` — the compiled op (``ltscale/ops/csrc``: C++ CPU kernel for fp32/fp64, CUDA kernel
  for fp32/bf16/fp16, built by setup.py at install time): selection without a full sort, kept rows
  only forward and backward. Same values and gradients as the reference (tests/unit/test_fusion_ext.py,
  tests/gpu/test_fusion_cuda.py).

``context_prediction_fusion(..., impl=)`` dispatches: ``auto`` takes the compiled op when it is
built and takes the inputs (device, dtype), else ``fusion_sparse_torch``; ``engine.fused`` in the run
config maps ``on``/``auto``/``off`` to ``fused``/``auto``/``torch``.
"""

from __future__ import annotations

import functools

import torch

from ltscale.ops.deferred import (
    DeferredWeightGrads,
    deferred_matmul,
    deferred_mixture,
    deferred_slot,
    mixture_weight_grad,
)

IMPLS = ("auto", "fused", "torch", "reference")


def _check_args(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    alpha: float,
    temperature: float,
    top_p: float,
    embed_scale: float = 1.0,
) -> None:
    if hidden.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and logits {tuple(logits.shape)} disagree on leading dims"
        )
    if (
        embedding_weight.dim() != 2
        or embedding_weight.shape[0] < logits.shape[-1]
        or embedding_weight.shape[1] != hidden.shape[-1]
    ):
        raise ValueError(
            f"embedding_weight {tuple(embedding_weight.shape)} does not fit logits "
            f"{tuple(logits.shape)} / hidden {tuple(hidden.shape)} (did ZeRO-3 hand over an "
            "empty partition? read it inside a module forward)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} outside [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} outside (0, 1]")
    if not embed_scale > 0:
        raise ValueError(f"embed_scale={embed_scale} must be > 0")


def masked_probs(logits: torch.Tensor, *, temperature: float, exclude_token_id: int | None) -> torch.Tensor:
    """Temperature softmax in fp32 (or fp64) with the excluded token at probability exactly 0."""
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(work_dtype) / temperature
    if exclude_token_id is not None:
        scaled = scaled.clone()
        scaled[..., exclude_token_id] = float("-inf")
    return torch.softmax(scaled, dim=-1)


def top_p_keep_mask_sorted(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask over descending-sorted probabilities: cumsum <= top_p, top-1 always kept.

    ``top_p == 1`` keeps every token: float round-off would otherwise drop the tail when the
    cumulative sum lands a hair above 1.
    """
    if top_p >= 1.0:
        return torch.ones_like(sorted_probs, dtype=torch.bool)
    keep = sorted_probs.cumsum(dim=-1) <= top_p
    keep[..., 0] = True
    return keep


def fusion_weights_dense(
    logits: torch.Tensor, *, temperature: float, top_p: float, exclude_token_id: int | None
) -> torch.Tensor:
    """``P-hat`` over the full vocabulary (zeros outside the kept set), docs/method.md §5.2."""
    probs = masked_probs(logits, temperature=temperature, exclude_token_id=exclude_token_id)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = top_p_keep_mask_sorted(sorted_probs.detach(), top_p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def fusion_reference(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    top_p: float,
    exclude_token_id: int | None,
    embed_scale: float = 1.0,
) -> torch.Tensor:
    _check_args(hidden, logits, embedding_weight, alpha, temperature, top_p, embed_scale)
    weights = fusion_weights_dense(
        logits, temperature=temperature, top_p=top_p, exclude_token_id=exclude_token_id
    )
    vocab = logits.shape[-1]
    e_pred = weights.to(embedding_weight.dtype) @ embedding_weight[:vocab]
    if embed_scale != 1.0:
        e_pred = e_pred * embed_scale
    return alpha * hidden + (1.0 - alpha) * e_pred.to(hidden.dtype)


def fusion_sparse_torch(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    top_p: float,
    exclude_token_id: int | None,
    deferred: DeferredWeightGrads | None = None,
    embed_scale: float = 1.0,
) -> torch.Tensor:
    """Touch only the kept rows of ``E``: K = the largest kept-set size in the batch (dense
    product instead when K > V/4).

    K is data: reading it is free for CPU tensors but a host sync on a device, so there (and on
    ``meta``) the op takes the dense product, whose shapes do not depend on the data.

    ``deferred``: stash ``E``'s gradient (kept rows, or the dense product's pair) in the step's
    accumulator instead of returning a ``V x d`` gradient per call (``deferred.py``). Neither path
    keeps the ``N x K x d`` gathered rows for backward (``deferred.deferred_mixture``)."""
    _check_args(hidden, logits, embedding_weight, alpha, temperature, top_p, embed_scale)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    l2 = logits.reshape(-1, logits.shape[-1])
    probs = masked_probs(l2, temperature=temperature, exclude_token_id=exclude_token_id)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = top_p_keep_mask_sorted(sorted_probs.detach(), top_p)
    vocab = l2.shape[-1]
    k = (int(keep.sum(dim=-1).max()) if keep.numel() else 1) if keep.device.type == "cpu" else vocab
    top_probs = torch.where(keep[:, :k], sorted_probs[:, :k], torch.zeros_like(sorted_probs[:, :k]))
    weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    if 4 * k > vocab:
        # Most of V kept (flat rows, top_p = 1): gathering (N, K, d) rows would cost more memory
        # and time than the dense product (at N=64, K=25k, d=2048: 13 GB), so do that instead.
        dense = torch.zeros_like(probs).scatter(-1, order[:, :k], weights)
        e_pred = deferred_matmul(dense.to(embedding_weight.dtype), embedding_weight, deferred)
    else:
        e_pred = deferred_mixture(
            embedding_weight, order[:, :k], weights, vocab, deferred
        )  # the only reads of E
    if embed_scale != 1.0:
        e_pred = e_pred * embed_scale
    out = alpha * h2 + (1.0 - alpha) * e_pred.to(h2.dtype)
    return out.reshape(*lead, hidden.shape[-1])


def _native():
    """The ``ltscale._C`` module (its import registers ``torch.ops.ltscale.*``), or ``None``."""
    try:
        from ltscale import _C
    except ImportError:
        return None
    return _C


def fused_available() -> bool:
    """Whether the compiled op (``ltscale._C``) is importable and registered."""
    return _native() is not None and hasattr(torch.ops.ltscale, "context_prediction_fusion_forward")


def fused_build_info() -> dict:
    """What the installed extension holds: ``built``, ``cpu``, ``cuda``, ``cuda_archs`` (cubins,
    ``sm_XY``) and ``cuda_ptx`` (``compute_XY``), from setup.py's ``arch_tag`` (for ``ltscale env``
    and the capability check)."""
    mod = _native()
    if mod is None or not fused_available():
        return {"built": False, "cpu": False, "cuda": False, "cuda_archs": [], "cuda_ptx": []}
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    name = "ltscale::context_prediction_fusion_forward"
    tokens = str(getattr(mod, "cuda_archs", "")).split("_")  # "sm_80_sm_90_ptx_90"
    pairs = list(zip(tokens[::2], tokens[1::2]))
    return {
        "built": True,
        "cpu": bool(has_kernel(name, "CPU")),
        "cuda": bool(has_kernel(name, "CUDA")),
        "cuda_archs": [f"sm_{v}" for k, v in pairs if k == "sm"],
        "cuda_ptx": [f"compute_{v}" for k, v in pairs if k == "ptx"],
    }


def _arch(name: str) -> tuple[int, int, bool]:
    """``"sm_86"`` -> ``(8, 6, False)``; ``"sm_90a"`` -> ``(9, 0, True)`` (arch-specific)."""
    digits = name.split("_", 1)[1]
    specific = digits.endswith("a")
    digits = digits.rstrip("a")
    return int(digits[:-1]), int(digits[-1]), specific


def kernel_runs_on(capability: tuple[int, int], cuda_archs: list[str], cuda_ptx: list[str]) -> bool:
    """Whether a build with these cubins / PTX has code for a GPU of ``capability``.

    A cubin runs on its own major version at the same or a later minor (``sm_80`` on an 8.6 GPU;
    an arch-specific ``sm_90a`` only on 9.0); PTX is compiled by the driver for its own or any later
    capability (``compute_90`` on a 10.0 GPU).
    """
    major, minor = capability
    for a in cuda_archs:
        m, n, specific = _arch(a)
        if m == major and (n == minor if specific else n <= minor):
            return True
    return any(not s and (m, n) <= (major, minor) for m, n, s in map(_arch, cuda_ptx))


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fused_device_problem(device: torch.device | str) -> str | None:
    """Why the compiled op has no kernel for ``device`` (``None``: it has one)."""
    device = torch.device(device)
    if not fused_available():
        return (
            "the ltscale._C extension is not built (reinstall with a C++ compiler and torch available: "
            "`make install` / `pip install --no-build-isolation -e .`; see `ltscale env`)"
        )
    info = fused_build_info()
    if device.type == "cpu":
        return None if info["cpu"] else "ltscale._C was built without its CPU kernel"
    if device.type != "cuda":
        return f"no compiled kernel for device {device.type!r}"
    if not info["cuda"]:
        return "ltscale._C was built without its CUDA kernel (torch or nvcc lacked CUDA at install time)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _device_capability(index)
    if not kernel_runs_on(capability, info["cuda_archs"], info["cuda_ptx"]):
        built = ", ".join(info["cuda_archs"] + info["cuda_ptx"]) or "nothing"
        return (
            f"ltscale._C holds CUDA code for {built}, none of which runs on cuda:{index} (compute "
            f"capability {capability[0]}.{capability[1]}); rebuild with TORCH_CUDA_ARCH_LIST including "
            f"{capability[0]}.{capability[1]} (setup.py)"
        )
    return None


# dtypes each compiled kernel takes (hidden, logits and E must share one)
_FUSED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


def fused_unsupported_reason(
    hidden: torch.Tensor, logits: torch.Tensor, embedding_weight: torch.Tensor
) -> str | None:
    """Why the compiled op cannot take these inputs (``None``: it can)."""
    why = fused_device_problem(hidden.device)
    if why is not None:
        return why
    dev = hidden.device.type
    if not (hidden.dtype == logits.dtype == embedding_weight.dtype):
        return (
            f"hidden/logits/embedding dtypes differ ({hidden.dtype}, {logits.dtype}, "
            f"{embedding_weight.dtype}); the compiled op takes one dtype"
        )
    if hidden.dtype not in _FUSED_DTYPES[dev]:
        return f"the {dev} kernel takes {_FUSED_DTYPES[dev]}, got {hidden.dtype}"
    return None


class _FusedFusion(torch.autograd.Function):
    """autograd face of ``torch.ops.ltscale.context_prediction_fusion_{forward,backward}``.

    Forward keeps the kept set (padded indices + renormalised weights, ``N x K_max``) and ``E``;
    backward needs nothing else (no re-selection, no softmax over V).

    With an accumulator (``acc``, its ``token`` an input so the collector runs after this backward)
    the kernel is asked only for the hidden/logits gradients, and ``E``'s gradient goes to ``acc``
    as the kept rows ``dE[idx[n, k]] += (1 - alpha) * w[n, k] * g[n]`` (the kernel's own formula;
    padding entries have ``w = 0``), or as the dense pair ``(1 - alpha) W^T g`` when that holds fewer
    numbers (``K_max * d > V``: ``deferred.mixture_weight_grad``)."""

    @staticmethod
    def forward(ctx, hidden, logits, weight, alpha, temperature, top_p, exclude, token=None, acc=None):
        out, idx, w = torch.ops.ltscale.context_prediction_fusion_forward(
            hidden, logits, weight, alpha, temperature, top_p, exclude
        )
        ctx.save_for_backward(weight, idx, w)
        ctx.args = (alpha, temperature, logits.shape[-1])
        ctx.acc = acc
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, idx, w = ctx.saved_tensors
        alpha, temperature, vocab = ctx.args
        mask = list(ctx.needs_input_grad[:3])
        defer = ctx.acc is not None and mask[2]
        if defer:
            mask[2] = False
        gh = gl = ge = None
        if any(mask):
            gh, gl, ge = torch.ops.ltscale.context_prediction_fusion_backward(
                grad_out.contiguous(), weight, idx, w, alpha, temperature, vocab, mask
            )
        if defer:
            _stash_e_grad(ctx.acc, grad_out, idx, w, alpha, vocab)
        return (
            gh if mask[0] else None,
            gl if mask[1] else None,
            ge if mask[2] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _stash_e_grad(
    acc, grad_out: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, alpha: float, vocab: int
) -> None:
    """``E``'s gradient of one fused call (the kernel's formula) into the step's accumulator."""
    coef = w.to(acc.work_dtype) * (1.0 - alpha)  # (N, K); padding entries are 0 (CUDA: w is fp32)
    mixture_weight_grad(acc, None, idx, coef, grad_out, vocab)


def fusion_fused(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    top_p: float,
    exclude_token_id: int | None,
    deferred: DeferredWeightGrads | None = None,
    embed_scale: float = 1.0,
) -> torch.Tensor:
    """The compiled op (``ltscale._C``): same signature, values and gradients as the reference.

    ``deferred``: stash ``E``'s gradient in the step's accumulator (``deferred.py``) instead of the
    kernel returning a ``V x d`` gradient per call.

    Kept-set ties are broken by token id (the reference's ``torch.sort`` leaves tie order
    unspecified); on CUDA, tokens tied exactly at the top-p boundary are kept or cut together.

    ``embed_scale`` s != 1 runs the kernel at ``a' = a / (a + (1-a) s)`` and scales its output by
    ``c = a + (1-a) s``: ``c a' = a`` and ``c (1-a') = (1-a) s``, so the kernel's own forward,
    backward and E-gradient formulas apply unchanged, at the cost of one extra rounding.
    """
    _check_args(hidden, logits, embedding_weight, alpha, temperature, top_p, embed_scale)
    why = fused_unsupported_reason(hidden, logits, embedding_weight)
    if why is not None:
        raise RuntimeError(f"context_prediction_fusion(impl='fused'): {why}")
    d, vocab = hidden.shape[-1], logits.shape[-1]
    token, acc = deferred_slot(deferred, embedding_weight) or (None, None)
    outer = 1.0 if embed_scale == 1.0 else alpha + (1.0 - alpha) * embed_scale
    out = _FusedFusion.apply(
        hidden.reshape(-1, d),
        logits.reshape(-1, vocab),
        embedding_weight,
        float(alpha / outer),
        float(temperature),
        float(top_p),
        -1 if exclude_token_id is None else int(exclude_token_id),
        token,
        acc,
    )
    if outer != 1.0:
        out = out * outer
    return out.reshape(hidden.shape)


def context_prediction_fusion(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    top_p: float,
    exclude_token_id: int | None,
    impl: str = "auto",
    deferred: DeferredWeightGrads | None = None,
    embed_scale: float = 1.0,
) -> torch.Tensor:
    """Public op (DESIGN.md). ``impl``:

    * ``auto``      the compiled op when it is built and takes these inputs, else ``torch``;
    * ``fused``     the compiled op; a clear ``RuntimeError`` when it is not built or cannot take
                    the inputs (``engine.fused: on``);
    * ``torch``     ``fusion_sparse_torch`` (``engine.fused: off``);
    * ``reference`` the dense transcription of the equations.

    ``deferred`` (``fused``/``torch``; the reference, the parity anchor, ignores it): the step's
    deferred-gradient accumulators (``deferred.py``), so ``E`` gets one ``V x d`` gradient per step
    however many passes call the op.
    ``embed_scale``: the input-embedding module's row factor ``s`` (module docstring).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} not in {IMPLS}")
    kw = dict(
        alpha=alpha,
        temperature=temperature,
        top_p=top_p,
        exclude_token_id=exclude_token_id,
        embed_scale=embed_scale,
    )
    if impl == "reference":
        return fusion_reference(hidden, logits, embedding_weight, **kw)
    if impl == "fused" or (
        impl == "auto" and fused_unsupported_reason(hidden, logits, embedding_weight) is None
    ):
        return fusion_fused(hidden, logits, embedding_weight, **kw, deferred=deferred)
    return fusion_sparse_torch(hidden, logits, embedding_weight, **kw, deferred=deferred)
