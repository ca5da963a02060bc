"""Packed rollout passes: a pass's Linear layers see only its real tokens.

A padded pass is ``(B, W_k)`` with ``W_k`` the widest row segment of pass ``k``; on scored data
most of those slots are padding (bench P2 measures 62%), and every projection and MLP pays for
them. Attention is the only op in a decoder layer that needs to know which row a token belongs
to. So a packed pass runs the decoder on a single row ``(1, n_k)`` of real tokens and swaps in an
attention function (registered with transformers' ``AttentionInterface``) that scatters the queries
into ``(B, W_k)``, gathers each row's keys from the layer's packed K/V history into ``(B, T_k)``
(``T_k`` = the longest row so far, not the sum of padded pass widths) and runs the model's own
attention kernel under a causal mask by true position. Key ``j`` of row ``b`` *is* the row's token
at true position ``j``, so the mask is just ``j <= query position``.

The pass's ``nn.Linear`` layers also defer their weight gradients (``ltscale/ops/deferred.py``):
with a handful of tokens per pass, each pass's ``dW = g^T x`` is a skinny GEMM that writes a full
weight-sized output (10x slower per byte than the forward's read of the weight at SmolLM2 shape),
and autograd then adds it into the running sum. Deferred, every weight gets one GEMM over the real
tokens of all passes, as in a single-pass step.

Grouped-query attention (``H`` query heads over ``H_kv`` K/V heads, ``G = H / H_kv``): the kernels
given a mask repeat K/V up to ``H`` heads (HF's ``repeat_kv``; SDPA's own GQA path does not take a
mask on CUDA), ``G`` times the K/V traffic of every pass. Instead the ``G`` query heads that share
a K/V head are folded into the query length, ``(B, H_kv, G * W, hd)`` against ``(B, H_kv, T, hd)``,
with the mask repeated along the folded length (``folded_mask``): the same dot products, no copy
of K/V. ``fold_gqa=False`` keeps the unfolded computation (the parity reference).

Only models whose attention is plain masked dot-product attention (``sdpa`` / ``eager``, no logit
soft-capping) are packed (``packing_supported``); others keep the padded passes. A model whose
decoder does not route attention through ``AttentionInterface`` with its kwargs is caught after the
first call instead of giving silently wrong numbers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ltscale.model.families import KERNELS
from ltscale.ops.deferred import DeferredWeightGrads, deferred_linear

PACKED_ATTENTION = "ltscale_packed"


def packing_supported(config) -> bool:
    """Whether packed passes compute exactly what the model's own attention would."""
    return config._attn_implementation in KERNELS and not getattr(config, "attn_logit_softcapping", None)


def gqa_groups(config) -> int:
    """Query heads per K/V head (1 without grouped-query attention)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads // kv_heads


def folded_mask(positions: torch.Tensor, span: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, G * W, T) additive mask: key ``j`` is visible to the query at true position ``p`` iff
    ``j <= p``; row ``g * W + w`` of the folded query length is query slot ``w`` of group ``g``.
    Padding slots (position 0) see key 0 only, so their softmax rows stay finite."""
    pos = positions.repeat(1, groups) if groups > 1 else positions
    keys = torch.arange(span, device=positions.device)
    allowed = keys[None, None, :] <= pos[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class _OneGroup:
    """The attention module as a kernel sees it after the fold: one query head per K/V head."""

    num_key_value_groups = 1

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


@dataclass
class PackedLayout:
    """One packed pass's row structure, shared by all its layers (built once per pass)."""

    bsz: int
    width: int  # W_k: padded query slots per row
    span: int  # T_k: keys per row (longest row so far)
    groups: int  # G: query heads folded into the query length per K/V head (1: no fold)
    q_slots: torch.Tensor  # (B*W,) packed query index of each padded slot (any valid index on padding)
    q_real: torch.Tensor  # (n,) the padded slots that hold the packed queries, in packed order
    k_slots: torch.Tensor  # (B*T,) history index of row b's token at true position j
    past: tuple[torch.Tensor, ...]  # earlier passes' (k0, v0, k1, v1, ...) chunks, layer-major per pass
    n_layers: int
    inner: str  # the model's own attention implementation
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def history(self, layer: int, current: torch.Tensor, which: int) -> torch.Tensor:
        """(1, H_kv, G, hd): this layer's keys (``which=0``) or values (1) of every pass so far."""
        n_chunks = len(self.past) // (2 * self.n_layers)
        parts = [self.past[(c * self.n_layers + layer) * 2 + which] for c in range(n_chunks)]
        return torch.cat([*parts, current], dim=2) if parts else current


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     ltscale_layout: PackedLayout | None = None, **kwargs):
    """``AttentionInterface`` function for packed passes: (1, H, n, hd) queries in, (1, n, H, hd) out."""
    lay = ltscale_layout
    if lay is None:
        raise RuntimeError(
            f"{type(module).__name__}: packed attention called without its layout; this model's decoder does "
            "not pass attention kwargs through (set engine.packed_passes: off)")
    layer = module.layer_idx
    lay.new_kv[layer] = (key, value)
    keys, values = lay.history(layer, key, 0), lay.history(layer, value, 1)
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[-1]
    bsz, width, groups = lay.bsz, lay.width, lay.groups
    q = query[0].index_select(1, lay.q_slots)  # (H, B * W, hd); head h = kv_head * G + g
    k = keys[0].index_select(1, lay.k_slots).view(kv_heads, bsz, lay.span, head_dim).transpose(0, 1)
    v = values[0].index_select(1, lay.k_slots).view(kv_heads, bsz, lay.span, head_dim).transpose(0, 1)
    kernel = ALL_ATTENTION_FUNCTIONS[lay.inner] if lay.inner != "eager" else _eager()
    if groups > 1:
        if heads != kv_heads * groups:
            raise RuntimeError(f"packed attention: {heads} query heads are not {groups} x {kv_heads} K/V heads")
        q = q.view(kv_heads, groups, bsz, width, head_dim).permute(2, 0, 1, 3, 4)
        q = q.reshape(bsz, kv_heads, groups * width, head_dim)
        out, _ = kernel(_OneGroup(module), q, k, v, attention_mask, dropout=dropout, scaling=scaling)
        out = out.view(bsz, groups, width, kv_heads, head_dim).permute(0, 2, 3, 1, 4)  # (B, W, H_kv, G, hd)
    else:
        q = q.view(heads, bsz, width, head_dim).transpose(0, 1)
        out, _ = kernel(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling)  # (B, W, H, hd)
    out = out.reshape(bsz * width, heads, head_dim).index_select(0, lay.q_real)
    return out.unsqueeze(0), None


def _eager():
    # The model's own eager kernel: import lazily from the model's module is not generic, and every
    # HF decoder's eager path is the same masked softmax(QK^T)V with GQA expansion.
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def folded_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     ltscale_inner: str | None = None, **kwargs):
    """``AttentionInterface`` function for the padded passes: the model's kernel with the query
    groups folded into the query length (``(B, H, Q, hd)`` -> ``(B, H_kv, G * Q, hd)``, the
    ``(B, 1, Q, K)`` mask repeated ``G`` times along ``Q``) instead of K/V repeated ``G`` times."""
    if ltscale_inner is None:
        raise RuntimeError(
            f"{type(module).__name__}: folded attention called without its inner kernel; this model's decoder "
            "does not pass attention kwargs through")
    kernel = ALL_ATTENTION_FUNCTIONS[ltscale_inner] if ltscale_inner != "eager" else _eager()
    bsz, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if groups == 1 or attention_mask is None or attention_mask.shape[1] != 1:
        return kernel(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q = query.reshape(bsz, kv_heads, groups * q_len, head_dim)  # head h = kv_head * G + g
    mask = attention_mask.repeat(1, 1, groups, 1)
    out, _ = kernel(_OneGroup(module), q, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    out = out.view(bsz, groups, q_len, kv_heads, head_dim).permute(0, 2, 3, 1, 4)
    return out.reshape(bsz, q_len, heads, head_dim), None


FOLDED_ATTENTION = "ltscale_folded"
AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionInterface.register(FOLDED_ATTENTION, folded_attention)


@contextmanager
def _attention_swapped(config, name: str = PACKED_ATTENTION):
    original = config._attn_implementation
    config._attn_implementation = name
    try:
        yield original
    finally:
        config._attn_implementation = original


@contextmanager
def gqa_folded(config, fold: bool):
    """Decoder calls under this use ``folded_attention`` (``fold`` and grouped-query attention on a
    plain kernel, ``packing_supported``); yields the kwargs to pass the decoder."""
    if not (fold and gqa_groups(config) > 1 and packing_supported(config)):
        yield {}
        return
    with _attention_swapped(config, FOLDED_ATTENTION) as inner:
        yield {"ltscale_inner": inner}


def _linear_forward(module: torch.nn.Linear, deferred: DeferredWeightGrads, x: torch.Tensor) -> torch.Tensor:
    out = deferred_linear(x, module.weight, deferred)
    return out if module.bias is None else out + module.bias


def _dummy_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x[..., :1].expand(*x.shape[:-1], module.out_features) * 0.0


@contextmanager
def linears_routed(decoder: torch.nn.Module, deferred: DeferredWeightGrads | None, dummy: bool = False):
    """Route the decoder's ``nn.Linear`` calls while a pass runs.

    ``deferred``: through ``deferred_linear`` (one weight gradient per step). ``dummy`` (an empty
    lockstep pass, whose one token is multiplied by 0): zeros of the output's shape, without reading
    the weight. A Linear's weight read is most of a one-token pass; the module is still called, so
    its hooks (ZeRO-3's gathers, in forward and in backward through the output) run as on every rank.

    An instance attribute shadows ``Linear.forward`` only for this call (and for its recompute under
    checkpointing, which calls the pass function again).
    """
    if not dummy and (deferred is None or not torch.is_grad_enabled()):
        yield
        return
    linears = [m for m in decoder.modules() if type(m) is torch.nn.Linear]
    for m in linears:
        m.forward = partial(_dummy_linear_forward, m) if dummy else partial(_linear_forward, m, deferred)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def run_packed_pass(decoder: torch.nn.Module, config, deferred: DeferredWeightGrads | None, dummy: bool,
                    embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                    shape: tuple[int, int, int, int], q_slots: torch.Tensor, q_real: torch.Tensor,
                    k_slots: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One decoder call on a packed row; same contract as ``rollout.run_decoder_pass``.

    ``shape``: ``(B, W, T, G)``; ``mask``: ``folded_mask`` for that ``G``.
    Returns ``(last_hidden_state, new_k0, new_v0, ...)``: this pass's K/V chunks per layer, which the
    next passes get back as ``past`` (explicit tensors, so a checkpointed pass saves each once).
    ``deferred``: the step's collector for the decoder's Linear weight gradients (``None``: plain).
    ``dummy``: an empty lockstep pass (``linears_routed``).
    """
    n_layers = config.num_hidden_layers
    with _attention_swapped(config) as inner, linears_routed(decoder, deferred, dummy):
        layout = PackedLayout(bsz=shape[0], width=shape[1], span=shape[2], groups=shape[3], q_slots=q_slots,
                              q_real=q_real, k_slots=k_slots, past=past, n_layers=n_layers, inner=inner)
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False,
                      ltscale_layout=layout)
    if len(layout.new_kv) != n_layers:
        raise RuntimeError(
            f"packed pass: {len(layout.new_kv)} of {n_layers} attention layers went through the packed attention "
            f"({type(decoder).__name__} computes attention its own way); set engine.packed_passes: off")
    new_kv: list[torch.Tensor] = []
    for layer in range(n_layers):
        new_kv.extend(layout.new_kv[layer])
    return (out.last_hidden_state, *new_kv)
