"""Deferred weight gradients (``ltscale/ops/deferred.py``): the fusion latent function's ``V x d``
weight gradients become one per step, with the same values and gradients.

* the collector runs after every use's backward, whatever order those ran in, and the weight's
  gradient equals plain autograd's (including other, non-deferred uses of the weight);
* ``LatentLM`` fusion-mode loss and every parameter gradient, deferral on == off == the naive
  per-slot reference (tied/untied head, compiled/torch op, adapter, gradient checkpointing);
* one ``V x d`` gradient per step: the number of fresh ``V x d`` tensors backward creates does not
  grow with the number of latent passes (it does without deferral);
* lifecycle: no accumulator outside a training forward, none kept alive by a forward without backward.

fp64 (one bf16 rounding test). Tolerances as in test_rollout.py (Llama's RMSNorm/rotary run in fp32 internally).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ltscale.model import LatentLM
from ltscale.model.reference import reference_forward
from ltscale.ops import deferred as D
from tests.helpers import require_fused
from tests.unit.test_rollout import assert_grads_close, batch, grads, tiny_base

VOCAB, THINK = 64, 63


@pytest.fixture
def events(monkeypatch) -> list[tuple[int, str]]:
    """``(id(weight), kind)`` for every piece stashed (``add_dense`` / ``add_rows``) and every
    gradient materialised (``build``), in order. The rollout's packed passes defer the decoder's
    Linear weights too: tests pick the vocabulary matrices (``vocab_events``)."""
    seen: list[tuple[int, str]] = []
    init = D.WeightGradAccumulator.__init__

    def tagged_init(self, weight):
        init(self, weight)
        self.test_tag = id(weight)

    monkeypatch.setattr(D.WeightGradAccumulator, "__init__", tagged_init)
    for kind in ("add_dense", "add_rows", "build"):
        real = getattr(D.WeightGradAccumulator, kind)

        def logged(self, *args, _real=real, _kind=kind):
            out = _real(self, *args)
            if _kind != "build" or out is not None:
                seen.append((self.test_tag, _kind))
            return out

        monkeypatch.setattr(D.WeightGradAccumulator, kind, logged)
    return seen


def vocab_events(lm: LatentLM, events: list[tuple[int, str]], kind: str) -> list[str]:
    """Which vocabulary matrices (``E``, ``head``; tied: ``E``) had a ``kind`` event, sorted."""
    names = {
        id(lm.base.get_output_embeddings().weight): "head",
        id(lm.base.get_input_embeddings().weight): "E",
    }
    return sorted(names[i] for i, k in events if k == kind and i in names)


# ------------------------------------------------------------------------------------ the mechanism
def _uses(weight, x, a, index, deferred, order: str):
    """Three deferred uses of ``weight`` (head, dense mixture, row gather), created in ``order``;
    the first-created one sits behind a longer chain to the loss."""
    make = {
        "linear": lambda: D.deferred_linear(x, weight, deferred).sum(-1),
        "matmul": lambda: D.deferred_matmul(a, weight, deferred).sum(-1),
        "gather": lambda: D.deferred_gather_rows(weight, index, deferred).sum((-2, -1)),
    }
    outs = []
    for i, name in enumerate(order.split(",")):
        y = make[name]()
        for _ in range(3 - i):  # different depths: different backward order
            y = torch.sin(y) * 1.5
        outs.append(y)
    return outs


def _loss(weight, outs):
    # the weight also has a plain (non-deferred) gradient, summed with the deferred one by autograd
    return (
        sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype)).sum() for o in outs) + (weight**2).sum()
    )


@pytest.mark.parametrize("order", ["linear,matmul,gather", "gather,matmul,linear", "matmul,gather,linear"])
def test_collector_runs_after_every_use_whatever_their_order(order, monkeypatch):
    g = torch.Generator().manual_seed(0)
    V, d, n = 12, 5, 4
    w0 = torch.randn(V, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(n, V - 2, generator=g, dtype=torch.float64, requires_grad=True)  # fewer rows than W
    index = torch.tensor([[1, 3, 3], [0, 11, 1], [3, 3, 3], [7, 1, 0]])  # repeats must sum

    ref_w = w0.clone().requires_grad_()
    _loss(ref_w, _uses(ref_w, x, a, index, None, order)).backward()
    ref = (ref_w.grad, x.grad.clone(), a.grad.clone())
    x.grad = a.grad = None

    events: list[str] = []
    for kind in ("add_dense", "add_rows", "build"):
        real = getattr(D.WeightGradAccumulator, kind)
        monkeypatch.setattr(
            D.WeightGradAccumulator,
            kind,
            lambda self, *args, _real=real, _kind=kind: (events.append(_kind), _real(self, *args))[1],
        )
    w = w0.clone().requires_grad_()
    deferred = D.DeferredWeightGrads()
    outs = _uses(w, x, a, index, deferred, order)
    assert len(deferred.accumulators()) == 1  # one collector for the three uses
    _loss(w, outs).backward()
    assert events[-1] == "build" and events.count("build") == 1
    assert sorted(events[:-1]) == ["add_dense", "add_dense", "add_rows"]
    torch.testing.assert_close(w.grad, ref[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x.grad, ref[1], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a.grad, ref[2], rtol=1e-13, atol=1e-13)
    assert not deferred.accumulators()[0].dense and not deferred.accumulators()[0].rows  # stash emptied


def test_use_backward_order_really_varies():
    """The ordering test above is only meaningful if the uses' backwards run in different orders."""
    seen = []
    for order in ("linear,matmul,gather", "gather,matmul,linear"):
        calls: list[str] = []
        w = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
        x = torch.randn(4, 5, dtype=torch.float64)
        a = torch.randn(4, 10, dtype=torch.float64)
        index = torch.tensor([[1, 3], [0, 11]])
        deferred = D.DeferredWeightGrads()
        outs = _uses(w, x, a, index, deferred, order)
        acc = deferred.accumulators()[0]
        acc.add_dense = lambda a_, b_, _real=acc.add_dense, _c=calls: (_c.append("dense"), _real(a_, b_))[1]
        acc.add_rows = lambda i_, v_, _real=acc.add_rows, _c=calls: (_c.append("rows"), _real(i_, v_))[1]
        _loss(w, outs).backward()
        seen.append(calls)
    assert seen[0] != seen[1]


def test_plain_path_without_grad_or_accumulator():
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    deferred = D.DeferredWeightGrads()
    with torch.no_grad():
        assert D.deferred_linear(x, w, deferred).grad_fn is None
    assert not deferred.accumulators()
    y = D.deferred_linear(x, w.detach(), deferred)  # weight without grad: nothing to defer
    assert y.grad_fn is None and not deferred.accumulators()
    assert type(D.deferred_linear(x, w, None).grad_fn).__name__ != "BackwardCFunction"


def test_bf16_weight_sums_rows_in_fp32_and_rounds_once():
    """Repeated rows of a 16-bit weight: summed in fp32 (as the CUDA kernel's atomics), one rounding."""
    g = torch.Generator().manual_seed(2)
    w64 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([3] * 64 + [5, 1])
    up = torch.randn(66, 4, generator=g, dtype=torch.float64)
    w = w64.to(torch.bfloat16).requires_grad_()
    deferred = D.DeferredWeightGrads()
    (D.deferred_gather_rows(w, index, deferred) * up.to(torch.bfloat16)).sum().backward()
    truth = torch.zeros_like(w64).index_add_(0, index, up.to(torch.bfloat16).double())
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad.double(), truth.to(torch.bfloat16).double(), rtol=0, atol=0)


def test_accumulator_rejects_pieces_that_do_not_fit():
    acc = D.WeightGradAccumulator(torch.zeros(6, 3))
    with pytest.raises(ValueError, match="does not fit"):
        acc.add_dense(torch.zeros(2, 7), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="do not fit"):
        acc.add_rows(torch.tensor([0, 1]), torch.zeros(3, 3))


# ------------------------------------------------------------------------------------ the fusion op
@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("top_p", [0.5, 1.0])  # kept rows / the dense pair
def test_fusion_op_calls_sharing_an_accumulator_equal_plain_calls(impl, top_p, events):
    """Three "passes" of the op on one E with more rows than the vocabulary (the dense pair then
    covers only the first V rows), leading dims, a pass whose hidden needs no grad and one where only E does."""
    from ltscale.ops import context_prediction_fusion

    if impl == "fused":
        require_fused()
    g = torch.Generator().manual_seed(3)
    V, d, extra = 40, 6, 3
    E0 = torch.randn(V + extra, d, generator=g, dtype=torch.float64)
    inputs = [
        (
            torch.randn(2, 3, d, generator=g, dtype=torch.float64),
            3 * torch.randn(2, 3, V, generator=g, dtype=torch.float64),
        )
        for _ in range(3)
    ]

    def run(deferred):
        E = E0.clone().requires_grad_()
        leaves, outs = [], []
        for k, (h0, l0) in enumerate(inputs):
            h, lg = h0.clone().requires_grad_(k == 0), l0.clone().requires_grad_(k != 2)
            leaves += [h, lg]
            outs.append(
                context_prediction_fusion(
                    h,
                    lg,
                    E,
                    alpha=0.4,
                    temperature=0.8,
                    top_p=top_p,
                    exclude_token_id=2,
                    impl=impl,
                    deferred=deferred,
                )
            )
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
        loss.backward()
        return [E.grad] + [t.grad for t in leaves]

    deferred = D.DeferredWeightGrads()
    got, want = run(deferred), run(None)
    assert len(deferred.accumulators()) == 1
    kinds = [k for _, k in events]
    assert kinds.count("build") == 1 and kinds.count("add_rows" if top_p < 1 else "add_dense") == 3, kinds
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert got[0][V:].abs().max() == 0  # rows past the vocabulary get nothing


# ------------------------------------------------------------------------------------ LatentLM parity
def _step(lm: LatentLM, ids, mask, labels, *, defer: bool | None):
    """Loss and grads of one fusion forward+backward (``defer=None``: the naive reference)."""
    lm.zero_grad(set_to_none=True)
    lm.defer_weight_grads = bool(defer)
    out = reference_forward(lm, ids, mask, labels) if defer is None else lm(ids, mask, labels)
    out.loss.backward()
    return out.loss.detach(), grads(lm)


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("adapter", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("packed", ["auto", "off"])
def test_latent_lm_grads_equal_plain_and_reference(impl, tie, adapter, checkpointing, packed, events):
    if impl == "fused":
        require_fused()
    # V = 1024 >> K * d: E's gradient takes the kept-rows form (the flat test below: the dense pair)
    from tests.helpers import make_tiny_llama

    base = make_tiny_llama(
        1024, kv_heads=2, tie=tie, max_positions=256, isolated_rng=False, record_dtype=False
    )
    lm = LatentLM(
        base,
        THINK,
        mode="fusion",
        alpha=0.6,
        temperature=0.03,  # the tiny model's logits are flat: sharpen so that E gets kept rows
        top_p=0.9,
        adapter=adapter,
        adapter_hidden=16,
        gradient_checkpointing=checkpointing,
        fusion_impl=impl,
        packed_passes=packed,
    )
    lm.double().train()
    ids, mask, labels = batch("mixed")
    loss_on, g_on = _step(lm, ids, mask, labels, defer=True)
    # one gradient per vocabulary matrix for the step (tied: head and E share one accumulator)
    assert vocab_events(lm, events, "build") == (["E"] if tie else ["E", "head"])
    assert "E" in vocab_events(lm, events, "add_rows")  # E's kept rows (not the flat case's dense pair)
    n_events = len(vocab_events(lm, events, "build"))
    loss_off, g_off = _step(lm, ids, mask, labels, defer=False)
    loss_ref, g_ref = _step(lm, ids, mask, labels, defer=None)
    assert len(vocab_events(lm, events, "build")) == n_events  # the plain paths defer nothing
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-13, atol=0)
    torch.testing.assert_close(loss_on, loss_ref, rtol=1e-12, atol=0)
    assert_grads_close(g_on, g_off, rtol=1e-12)
    assert_grads_close(g_on, g_ref)
    assert any(k.startswith("adapter.") for k in g_on) == adapter


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_flat_distribution_takes_the_dense_pair(impl, events):
    """top_p = 1 keeps every token: E's deferred gradient is the dense pair, not gathered rows."""
    if impl == "fused":
        require_fused()
    lm = LatentLM(tiny_base(tie=True), THINK, mode="fusion", alpha=0.3, top_p=1.0, fusion_impl=impl).train()
    ids, mask, labels = batch("mixed")
    loss_on, g_on = _step(lm, ids, mask, labels, defer=True)
    loss_ref, g_ref = _step(lm, ids, mask, labels, defer=None)
    assert vocab_events(lm, events, "build") == ["E"]
    assert vocab_events(lm, events, "add_rows") == []
    torch.testing.assert_close(loss_on, loss_ref, rtol=1e-12, atol=0)
    assert_grads_close(g_on, g_ref)


# ------------------------------------------------------------------------------------ one V x d per step
class _FreshShapeCounter(TorchDispatchMode):
    """Counts ops that return a new tensor of ``shape`` (in-place ops and views excluded)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        mutates = any(a.alias_info is not None for a in schema.arguments) or any(
            r.alias_info is not None for r in schema.returns
        )
        if not mutates:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.count += sum(isinstance(t, torch.Tensor) and t.shape == self.shape for t in outs)
        return out


def _backward_vd_count(lm: LatentLM, n_latents: int) -> int:
    """Fresh V x d tensors created by the backward of one step with ``n_latents`` in a row."""
    ids = torch.randint(1, 60, (2, 12), generator=torch.Generator().manual_seed(5))
    ids[0, 2 : 2 + n_latents] = lm.thinking_token_id
    ids[1, 3] = lm.thinking_token_id
    lm.zero_grad(set_to_none=True)
    loss = lm(ids, torch.ones_like(ids), ids.clone()).loss
    weight = lm.base.get_input_embeddings().weight
    counter = _FreshShapeCounter(weight.shape)
    with counter:
        loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    return counter.count


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_one_vocab_gradient_per_step_whatever_the_passes(impl, events):
    if impl == "fused":
        require_fused()
    # V = 96 x d = 32: no other parameter or activation of the model has that shape
    from tests.helpers import make_tiny_llama

    base = make_tiny_llama(
        96, kv_heads=2, tie=True, max_positions=256, isolated_rng=False, record_dtype=False
    )
    lm = LatentLM(base, 95, mode="fusion", top_p=0.9, fusion_impl=impl).train()
    deferred = {n: _backward_vd_count(lm, n) for n in (1, 6)}
    assert vocab_events(lm, events, "build") == ["E", "E"]  # one per step (tied: head and E share it)
    lm.defer_weight_grads = False
    plain = {n: _backward_vd_count(lm, n) for n in (1, 6)}
    assert deferred[1] == deferred[6], deferred  # independent of the number of passes
    assert plain[6] >= plain[1] + 5, plain  # the plain path adds V x d gradients per pass


# ------------------------------------------------------------------------------------ lifecycle
def test_accumulators_live_only_in_a_training_forward_and_its_graph(monkeypatch):
    lm = LatentLM(tiny_base(), THINK, mode="fusion").train()
    ids, mask, labels = batch("mixed")
    registries, accs = [], []
    real = D.DeferredWeightGrads.slot

    def slot(self, weight):
        token, acc = real(self, weight)
        registries.append(weakref.ref(self))
        accs.append(weakref.ref(acc))
        return token, acc

    monkeypatch.setattr(D.DeferredWeightGrads, "slot", slot)
    out = lm(ids, mask, labels)
    assert lm._deferred is None and registries and registries[0]() is None  # not kept on the module
    assert all(a() is not None for a in accs)  # ... but in the graph, for its backward
    del out  # a forward without backward: the accumulators go with its graph (no reference cycle)
    assert all(a() is None for a in accs)
    n = len(accs)
    with torch.no_grad():
        lm(ids, mask, labels)
    assert len(accs) == n  # no_grad (generation, eval): plain path, no accumulator
    # latent_input outside a forward (generation / analysis hand in logits): plain path too
    h = torch.randn(2, 32, dtype=torch.float64)
    lm.latent_input(h, lm.lm_head(h)).sum().backward()
    lm.latent_input(h).sum().backward()
    assert len(accs) == n


def test_zero3_external_parameters_cover_both_heads_once():
    untied = LatentLM(tiny_base(), THINK, mode="fusion")
    tied = LatentLM(tiny_base(tie=True), THINK, mode="fusion")
    ext = untied.zero3_external_parameters()
    assert [m for m, _ in ext] == [untied.fusion, untied.fusion]
    assert {id(p) for _, p in ext} == {
        id(untied.base.get_input_embeddings().weight),
        id(untied.base.get_output_embeddings().weight),
    }
    assert [p for _, p in tied.zero3_external_parameters()] == [tied.base.get_input_embeddings().weight]


# ------------------------------------------------------------------------------------ bounded stash
def test_stash_folds_into_a_buffer_once_it_outgrows_the_weight():
    """Twelve uses whose pieces together hold ~3x the weight: the stash never holds more than the
    weight plus one piece, the buffer takes the rest, and the gradient equals plain autograd's
    (fp64: the fold only regroups the same sums, 1e-13)."""
    g = torch.Generator().manual_seed(7)
    V, d, n = 40, 16, 3
    w0 = torch.randn(V, d, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(12)]
    index = torch.randint(0, V, (n, 4), generator=g)

    def loss_of(w, deferred):
        outs = [D.deferred_linear(x, w, deferred).sin().sum() for x in xs]
        outs.append(D.deferred_gather_rows(w, index, deferred).cos().sum())
        return sum(outs) + (w**2).sum()

    ref = w0.clone().requires_grad_()
    loss_of(ref, None).backward()
    w = w0.clone().requires_grad_()
    deferred = D.DeferredWeightGrads()
    loss = loss_of(w, deferred)
    (acc,) = deferred.accumulators()
    piece = n * (V + d) * 8
    loss.backward()
    assert acc.folds >= 2 and acc.builds == 1 and acc.buffer is None and acc.stash_bytes == 0
    assert 12 * piece > 2 * acc.weight_bytes, "the unfolded stash would outgrow the weight"
    assert acc.peak_stash_bytes <= acc.weight_bytes + piece
    torch.testing.assert_close(w.grad, ref.grad, rtol=1e-13, atol=1e-13)


def test_folded_16bit_rows_are_summed_in_fp32():
    """A bf16 weight whose stash folds (three uses of 22 rows x 4, each bigger than the 64-byte
    weight): rows are summed in an fp32 buffer and rounded once, as without folding. The values are
    multiples of 1/8 (exact in bf16, summed exactly in fp32), so the result is bit-exact."""
    g = torch.Generator().manual_seed(2)
    w64 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([3] * 64 + [5, 1])
    up = torch.randint(-8, 8, (66, 4), generator=g).double() / 8
    w = w64.to(torch.bfloat16).requires_grad_()
    deferred = D.DeferredWeightGrads()
    parts = [slice(22 * p, 22 * p + 22) for p in range(3)]
    loss = sum(
        (D.deferred_gather_rows(w, index[s], deferred) * up[s].to(torch.bfloat16)).sum() for s in parts
    )
    loss.backward()
    (acc,) = deferred.accumulators()
    assert acc.folds >= 2
    truth = torch.zeros_like(w64).index_add_(0, index, up)
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad.double(), truth.to(torch.bfloat16).double(), rtol=0, atol=0)


def test_latent_lm_step_folds_decoder_stashes_with_the_same_gradients(monkeypatch):
    """Packed passes defer every decoder Linear: at this batch (54 tokens, 32 x 32 weights) their
    stashes fold; gradients equal the plain per-pass path (fp64, 1e-12) and no stash ever held more
    than its weight plus one pass's piece."""
    accs: list[D.WeightGradAccumulator] = []
    real_init = D.WeightGradAccumulator.__init__

    def tracked_init(self, weight):
        real_init(self, weight)
        accs.append(self)

    monkeypatch.setattr(D.WeightGradAccumulator, "__init__", tracked_init)
    lm = LatentLM(tiny_base(), THINK, mode="hidden").train()
    ids, mask, labels = batch("mixed")
    loss_on, g_on = _step(lm, ids, mask, labels, defer=True)
    folded = [a for a in accs if a.folds]
    assert folded, "no stash outgrew its weight: the test would not exercise folding"
    widest_piece = int(mask.sum()) * 2 * 64 * 8  # one pass's (n x (in + out)) fp64 pair, n <= all tokens
    assert all(a.peak_stash_bytes <= a.weight_bytes + widest_piece for a in accs)
    loss_off, g_off = _step(lm, ids, mask, labels, defer=False)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-13, atol=0)
    assert_grads_close(g_on, g_off, rtol=1e-12)


# ------------------------------------------------------------------------------------ sparse mixtures
@pytest.mark.parametrize("vocab,d", [(50, 4), (12, 6)])  # rows (K*d <= V), dense pair (K*d > V)
@pytest.mark.parametrize("defer", [False, True])
def test_mixture_equals_gather_einsum_in_both_gradient_forms(vocab, d, defer, events):
    g = torch.Generator().manual_seed(11)
    n, k = 5, 3
    E0 = torch.randn(vocab + 2, d, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    w0 = torch.rand(n, k, generator=g, dtype=torch.float64)
    up = torch.randn(n, d, generator=g, dtype=torch.float64)

    def run(fn):
        E, w = E0.clone().requires_grad_(), w0.clone().requires_grad_()
        (fn(E, w) * up).sum().backward()
        return E.grad, w.grad

    want = run(lambda E, w: torch.einsum("nk,nkd->nd", w, E[index]))
    deferred = D.DeferredWeightGrads() if defer else None
    got = run(lambda E, w: D.deferred_mixture(E, index, w, vocab, deferred))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    kinds = [kind for _, kind in events]
    if defer:
        assert kinds == (["add_rows", "build"] if k * d <= vocab else ["add_dense", "build"])
    assert torch.autograd.gradcheck(
        lambda E, w: D.deferred_mixture(E, index, w, vocab, None),
        (E0.clone().requires_grad_(), w0.clone().requires_grad_()),
    )


def test_torch_fusion_does_not_keep_the_gathered_rows_for_backward():
    """Tensors one sparse fusion call saves for backward: the kept set (N x K), the probabilities
    (N x V) and E itself, never the N x K x d gathered rows (here larger than anything else)."""
    from ltscale.ops import fusion_sparse_torch, fusion_weights_dense

    g = torch.Generator().manual_seed(5)
    n, V, d = 4, 2000, 256
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    logits = (2 * torch.randn(n, V, generator=g, dtype=torch.float64)).requires_grad_()
    E = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(alpha=0.6, temperature=1.0, top_p=0.9, exclude_token_id=None)
    k = int(
        (fusion_weights_dense(logits.detach(), **{x: kw[x] for x in kw if x != "alpha"}) > 0).sum(-1).max()
    )
    rows_bytes = n * k * d * 8
    assert 4 * k <= V and rows_bytes > 4 * n * V * 8, f"K={k}: the test needs the gathered-rows path"
    saved: list[int] = []

    def pack(t):
        if t.untyped_storage().data_ptr() != E.untyped_storage().data_ptr():
            saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fusion_sparse_torch(h, logits, E, **kw)
    assert max(saved) < rows_bytes, (max(saved), rows_bytes)
    out.sum().backward()
    assert E.grad is not None and h.grad is not None and logits.grad is not None
