"""Deferred weight gradients: many uses of one large weight in a step, one ``V x d`` gradient.

Why: the stage-3 rollout runs ``P`` sequential passes per step, and before every pass the fusion
latent function reads the ``V x d`` vocabulary matrices twice (the LM head on the previous hidden
state, the fusion's ``E^T P-hat``). With plain autograd each of those uses returns its own dense
``V x d`` weight gradient in backward (a zero-filled buffer, or a ``V x B x d`` GEMM), and autograd
adds them up one by one: ``O(P * V * d)`` memory traffic for ``O(P * B * d)`` (head) or
``O(P * B * K * d)`` (fusion) useful numbers. At SmolLM2-135M shape that is ~5 s of a 9.6 s step.

How: a collector node sits between the weight and its uses.

* ``DeferredWeightGrads.slot(weight)`` (first call for a weight in a step) runs ``_Collect`` on the
  weight; it returns a dummy scalar *token* and an accumulator.
* Every deferred use is an autograd Function that also takes the token. Its backward returns the
  gradients it owes its other inputs, ``None`` for the weight and the token, and stashes its
  weight-gradient contribution in the accumulator: dense pairs (``dW[:a.shape[1]] += a^T b``) or
  sparse rows (``dW[index] += values``).
* Every use depends on the token, so the autograd engine runs ``_Collect.backward`` only after the
  backwards of all uses reachable from the loss, in whatever order they ran. It builds the single
  ``V x d`` gradient (one GEMM over the concatenated dense pairs, one ``index_add_`` of all sparse
  rows) and returns it for the weight; autograd adds it to the weight's other gradients once.

``_Collect`` keeps only the weight's shape, dtype and device, never the weight: under ZeRO-3 the
parameter's data is a partition outside the forward/backward of a module that gathered it, and the
collector needs none of it. The token is created inside the module forward that reads the weight.

Bounded memory: the stash holds each use's pieces (its input rows and output gradients) from that
use's backward until the collector's, i.e. until pass 0's backward: it grows with the step's tokens.
Once it would hold more bytes than the weight itself, it is folded into a weight-sized buffer (one
GEMM over the stashed pairs, one ``index_add_`` of the stashed rows) and emptied, so a weight's
deferred gradient never costs more than about twice the weight (buffer + stash; an fp32 buffer for
a 16-bit weight whose stash holds rows). A step that never folds computes exactly what it did
without the buffer; folding only regroups the same sums (tests/unit/test_deferred_grads.py states the
tolerance).

Lifetime: one ``DeferredWeightGrads`` per training forward (``LatentLM.forward`` makes it). The
accumulators live in the autograd graph (the collector's and the uses' contexts), so a forward
without a backward frees them with its graph; nothing carries over to the next step.

Each op below has the plain torch computation as its fallback (``deferred=None``, grad mode off, or
a weight that does not require grad); values and gradients match it (tests/unit/test_deferred_grads.py).
"""

from __future__ import annotations

import torch

__all__ = [
    "DeferredWeightGrads",
    "WeightGradAccumulator",
    "deferred_gather_rows",
    "deferred_linear",
    "deferred_matmul",
    "deferred_mixture",
    "deferred_slot",
    "mixture_weight_grad",
]


class WeightGradAccumulator:
    """One weight's stashed gradient pieces for one step; ``build()`` turns them into one tensor."""

    def __init__(self, weight: torch.Tensor):
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        # 16-bit weights: sparse rows are summed in fp32 and rounded once (as the CUDA kernel's fp32
        # atomics do); a GEMM over the dense pairs accumulates in fp32 by itself.
        self.work_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.device = weight.device
        self.dense: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.weight_bytes = weight.numel() * weight.element_size()
        self.stash_bytes = 0  # what the stashed pieces hold
        self.buffer: torch.Tensor | None = None  # the folded part of the gradient
        self.builds = 0  # how many V x d gradients this accumulator materialised (tests count them)
        self.folds = 0  # how many times the stash was folded into the buffer
        self.peak_stash_bytes = 0

    def add_dense(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """``dW[:a.shape[-1]] += a^T @ b`` for ``a`` (n, rows') and ``b`` (n, cols)."""
        a = a.reshape(-1, a.shape[-1])
        b = b.reshape(-1, b.shape[-1])
        if a.shape[0] != b.shape[0] or a.shape[1] > self.shape[0] or b.shape[1] != self.shape[1]:
            raise ValueError(
                f"deferred dense pair {tuple(a.shape)} x {tuple(b.shape)} does not fit a weight "
                f"of shape {self.shape}"
            )
        self.dense.append((a, b))
        self._grew(a, b)

    def add_rows(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """``dW[index[i]] += values[i]`` (repeated indices are summed)."""
        index = index.reshape(-1)
        values = values.reshape(-1, values.shape[-1])
        if values.shape[0] != index.shape[0] or values.shape[1] != self.shape[1]:
            raise ValueError(
                f"deferred rows {tuple(values.shape)} with {index.shape[0]} indices do not fit a "
                f"weight of shape {self.shape}"
            )
        self.rows.append((index, values))
        self._grew(index, values)

    def _grew(self, *parts: torch.Tensor) -> None:
        self.stash_bytes += sum(t.numel() * t.element_size() for t in parts)
        self.peak_stash_bytes = max(self.peak_stash_bytes, self.stash_bytes)
        if self.stash_bytes > self.weight_bytes:
            self.fold()

    def fold(self) -> None:
        """Add the stash into the buffer and empty it (bounded memory; see the module docstring)."""
        dense, rows = self.dense, self.rows
        self.dense, self.rows, self.stash_bytes = [], [], 0
        if not dense and not rows:
            return
        self.folds += 1
        if self.buffer is None:
            self.buffer = self._sum(dense, rows, self.work_dtype if rows else self.dtype)
            return
        if rows and self.buffer.dtype != self.work_dtype:
            self.buffer = self.buffer.to(self.work_dtype)  # rows are summed in fp32 (16-bit weights)
        self._sum(dense, rows, self.buffer.dtype, into=self.buffer)

    def build(self) -> torch.Tensor | None:
        """The summed gradient (``None`` when no use stashed anything); empties the stash."""
        if self.buffer is not None:
            self.fold()
            grad, self.buffer = self.buffer, None
            self.builds += 1
            return grad.to(self.dtype)
        dense, rows = self.dense, self.rows
        self.dense, self.rows, self.stash_bytes = [], [], 0
        if not dense and not rows:
            return None
        self.builds += 1
        return self._sum(dense, rows, self.work_dtype if rows else self.dtype).to(self.dtype)

    def _sum(
        self,
        dense: list[tuple[torch.Tensor, torch.Tensor]],
        rows: list[tuple[torch.Tensor, torch.Tensor]],
        dtype: torch.dtype,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``into`` (or a new tensor) ``+=`` the pieces, in ``dtype``: one GEMM per row-count of the
        dense pairs, one ``index_add_`` of all rows."""

        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([t.to(dtype) for t in parts])

        widths: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for a, b in dense:
            widths.setdefault(a.shape[1], []).append((a, b))
        grad = into
        if grad is None:
            full = widths.pop(self.shape[0], None)
            if full is not None:  # the GEMM writes every element: no zero fill of the V x d buffer
                grad = torch.mm(cat([a for a, _ in full]).t(), cat([b for _, b in full]))
            else:
                grad = torch.zeros(self.shape, dtype=dtype, device=self.device)
        for width, pairs in widths.items():
            grad[:width].addmm_(cat([a for a, _ in pairs]).t(), cat([b for _, b in pairs]))
        if rows:
            grad.index_add_(0, torch.cat([i for i, _ in rows]), cat([v for _, v in rows]))
        return grad


class _Collect(torch.autograd.Function):
    """weight -> token. Backward (after every use's backward) returns the weight's deferred gradient."""

    @staticmethod
    def forward(ctx, weight, acc):
        ctx.set_materialize_grads(False)  # uses return None for the token: do not build zeros
        ctx.acc = acc  # the accumulator only: no reference to the weight (ZeRO-3) or the token (no cycle)
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_token):
        return ctx.acc.build(), None


class DeferredWeightGrads:
    """The accumulators of one training forward, one per weight (keyed by identity)."""

    def __init__(self):
        self._slots: dict[int, tuple[torch.Tensor, WeightGradAccumulator, torch.Tensor]] = {}

    def active_for(self, weight: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and weight.requires_grad

    def slot(self, weight: torch.Tensor) -> tuple[torch.Tensor, WeightGradAccumulator]:
        """``(token, accumulator)`` for ``weight``; the first call of the step runs the collector, so
        make it inside the module forward that reads ``weight`` (ZeRO-3)."""
        entry = self._slots.get(id(weight))
        if entry is None or entry[0] is not weight:
            acc = WeightGradAccumulator(weight)
            entry = (weight, acc, _Collect.apply(weight, acc))
            self._slots[id(weight)] = entry
        return entry[2], entry[1]

    def accumulators(self) -> list[WeightGradAccumulator]:
        return [acc for _, acc, _ in self._slots.values()]


# ---------------------------------------------------------------------------------------------- uses
class _Linear(torch.autograd.Function):
    """``x @ W^T`` whose weight gradient ``g^T x`` is deferred."""

    @staticmethod
    def forward(ctx, x, weight, token, acc):
        ctx.save_for_backward(x, weight)
        ctx.acc = acc
        return x @ weight.t()

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            ctx.acc.add_dense(g, x)
        return (g @ weight if ctx.needs_input_grad[0] else None), None, None, None


class _Matmul(torch.autograd.Function):
    """``a @ W[:a.shape[-1]]`` whose weight gradient ``a^T g`` is deferred."""

    @staticmethod
    def forward(ctx, a, weight, token, acc):
        ctx.save_for_backward(a, weight)
        ctx.acc = acc
        return a @ weight[: a.shape[-1]]

    @staticmethod
    def backward(ctx, g):
        a, weight = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            ctx.acc.add_dense(a, g)
        return (g @ weight[: a.shape[-1]].t() if ctx.needs_input_grad[0] else None), None, None, None


class _GatherRows(torch.autograd.Function):
    """``W[index]`` whose weight gradient (rows ``index`` += ``g``) is deferred."""

    @staticmethod
    def forward(ctx, weight, index, token, acc):
        ctx.save_for_backward(index)
        ctx.acc = acc
        return weight[index]

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            ctx.acc.add_rows(index, g)
        return None, None, None, None


def deferred_slot(
    deferred: DeferredWeightGrads | None, weight: torch.Tensor
) -> tuple[torch.Tensor, WeightGradAccumulator] | None:
    """``deferred.slot(weight)`` when this call defers ``weight``'s gradient (grad enabled and
    ``weight`` trainable), else ``None``: the plain op, with autograd's own gradient."""
    if deferred is None or not deferred.active_for(weight):
        return None
    return deferred.slot(weight)


def deferred_linear(
    x: torch.Tensor, weight: torch.Tensor, deferred: DeferredWeightGrads | None
) -> torch.Tensor:
    """``x @ weight^T`` (``F.linear`` without bias)."""
    slot = deferred_slot(deferred, weight)
    return torch.nn.functional.linear(x, weight) if slot is None else _Linear.apply(x, weight, *slot)


def deferred_matmul(
    a: torch.Tensor, weight: torch.Tensor, deferred: DeferredWeightGrads | None
) -> torch.Tensor:
    """``a @ weight[:a.shape[-1]]`` (a dense mixture of the first rows of ``weight``)."""
    slot = deferred_slot(deferred, weight)
    return a @ weight[: a.shape[-1]] if slot is None else _Matmul.apply(a, weight, *slot)


def deferred_gather_rows(
    weight: torch.Tensor, index: torch.Tensor, deferred: DeferredWeightGrads | None
) -> torch.Tensor:
    """``weight[index]`` (an embedding lookup)."""
    slot = deferred_slot(deferred, weight)
    return weight[index] if slot is None else _GatherRows.apply(weight, index, *slot)


# ------------------------------------------------------------------------------- sparse mixtures
def mixture_weight_grad(
    acc: WeightGradAccumulator | None,
    weight: torch.Tensor,
    index: torch.Tensor,
    coef: torch.Tensor,
    g: torch.Tensor,
    vocab: int,
) -> torch.Tensor | None:
    """``W``'s gradient of ``out[n] = sum_k coef[n, k] W[index[n, k]]`` given ``g = dL/dout``.

    Either as rows (``dW[index[n, k]] += coef[n, k] g[n]``: ``N x K x d`` values) or as the dense pair
    (``dW[:vocab] += C^T g`` with ``C`` the ``N x vocab`` scatter of ``coef``: ``N x (vocab + d)``),
    whichever holds fewer numbers: rows while ``K * d <= vocab``. Into ``acc`` when given (returns
    ``None``), else returned as a dense gradient. 16-bit weights: summed in fp32, rounded once.
    """
    n, k = index.shape
    d = g.shape[-1]
    work = (
        acc.work_dtype
        if acc is not None
        else (torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype)
    )
    g = g.to(work)
    coef = coef.to(work)
    if k * d > vocab:
        dense = torch.zeros((n, vocab), dtype=work, device=g.device).scatter_add_(1, index, coef)
        if acc is not None:
            acc.add_dense(dense, g)
            return None
        grad = torch.zeros(weight.shape, dtype=work, device=g.device)
        grad[:vocab].addmm_(dense.t(), g)
        return grad.to(weight.dtype)
    values = coef[:, :, None] * g[:, None, :]
    if acc is not None:
        acc.add_rows(index, values)
        return None
    grad = torch.zeros(weight.shape, dtype=work, device=g.device)
    return grad.index_add_(0, index.reshape(-1), values.reshape(-1, d)).to(weight.dtype)


class _Mixture(torch.autograd.Function):
    """``out[n] = sum_k w[n, k] W[index[n, k]]``; saves ``index`` and ``w`` only (the gathered
    ``N x K x d`` rows are recomputed in backward, not kept), and returns ``W``'s gradient as rows or
    the dense pair (``mixture_weight_grad``), deferred to ``acc`` when given."""

    @staticmethod
    def forward(ctx, weight, index, w, vocab, token, acc):
        ctx.save_for_backward(weight, index, w)
        ctx.vocab, ctx.acc = vocab, acc
        return torch.einsum("nk,nkd->nd", w.to(weight.dtype), weight[index])

    @staticmethod
    def backward(ctx, g):
        weight, index, w = ctx.saved_tensors
        grad_w = grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_w = torch.einsum("nkd,nd->nk", weight[index], g).to(w.dtype)
        if ctx.needs_input_grad[0]:
            grad_weight = mixture_weight_grad(ctx.acc, weight, index, w, g, ctx.vocab)
        return grad_weight, None, grad_w, None, None, None


def deferred_mixture(
    weight: torch.Tensor,
    index: torch.Tensor,
    w: torch.Tensor,
    vocab: int,
    deferred: DeferredWeightGrads | None,
) -> torch.Tensor:
    """``einsum("nk,nkd->nd", w, weight[index])`` (a sparse mixture of rows of ``weight``, ``index``
    below ``vocab``) without keeping the ``N x K x d`` gathered rows for backward."""
    token, acc = deferred_slot(deferred, weight) or (None, None)
    return _Mixture.apply(weight, index, w, vocab, token, acc)
