"""Activation memory of a training step: bytes held for backward per token, as a formula.

``ltscale plan`` sizes a run with it; bench/activation_memory.py checks it against the bytes a real
step saves for backward (saved-tensor hooks, unique storages) on the tiny and SmolLM2 shapes.

Derivation (one Llama decoder layer, a packed pass, ``sdpa``; ``b`` = bytes of the model dtype,
``d`` hidden, ``f`` MLP width, ``H`` / ``H_kv`` query / K/V heads of width ``hd``). What autograd
keeps per token of the layer:

* each RMSNorm (two): its fp32 input (``4d``; the layer input itself in fp32), ``rsqrt`` of the
  mean square (4), the normalised fp32-then-model-dtype rows multiplied by the weight (``b d``) and
  the product, which the next Linear keeps as its input (``b d``): ``4d + 2bd + 4``;
* the attention output that ``o_proj`` keeps as its input: ``H hd b``;
* the MLP: gate, ``silu(gate)``, up and their product (``down``'s input): ``4 f b``;
* attention (``packed.py``), per pass and not per token: the folded queries and the output over the
  pass's ``B x W_k`` query slots (``2 H hd b`` each slot) plus the fp32 log-sum-exp (``4H``), and
  each row's gathered keys and values over its ``T_k`` positions (``2 H_kv hd b`` per key slot).
  Per token these are ``query_slots_per_token = sum_k B W_k / N`` (1 without padding) and
  ``keys_per_token = sum_k B T_k / N`` (at most about ``passes``: every pass gathers each row's
  keys so far).

So, per token per layer::

    2 (4d + 2bd + 4) + H hd b + 4 f b + q (2 H hd b + 4 H) + k (2 H_kv hd b)      (q, k as above)

With per-pass gradient checkpointing a pass keeps only its inputs: the K/V history of the earlier
passes (``2 H_kv hd b`` per token per layer, for the tokens of every pass but the last:
``kv_held_fraction``), and backward recomputes one pass at a time (that pass's no-checkpointing
bytes are a transient on top, not counted here).

Outside the layers, per token: the final norm (``4d + 2bd + 4``), the loss's fp32 log-softmax
(``4V``), the rotary ``cos``/``sin`` of each pass (``2 hd b``) and the pass masks
(``mask_elems_per_token * b``, shared by all layers); with checkpointing each pass's input and
output rows (``2 b d``), its mask and the log-softmax. Each latent slot of a ``fusion`` pass adds
the latent function's head input (``b d``) and its softmax, sort and mixture over the vocabulary:
``(17 + b) V`` on a device (the dense product; on CPU the kept-rows path keeps less). The plan's
index tensors (a few int64 per token) are left out.

Measured agreement (bench/RESULTS.md, "Activation memory"): exact per layer on CPU; a GPU's
attention kernel may pad the log-sum-exp, which this does not model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        """From an HF config (object or dict): ``hidden_size``, ``intermediate_size``, heads, layers, vocab."""
        get = (
            config.get if isinstance(config, Mapping) else lambda k, default=None: getattr(config, k, default)
        )
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            layers=int(get("num_hidden_layers")),
            vocab=int(get("vocab_size")),
        )


def layer_bytes_per_token(
    config: Any,
    *,
    dtype_bytes: int,
    checkpointing: bool,
    query_slots_per_token: float = 1.0,
    keys_per_token: float = 1.0,
    kv_held_fraction: float = 1.0,
) -> float:
    """Bytes one decoder layer keeps for backward per token (module docstring)."""
    s, b = Shape.of(config), dtype_bytes
    if checkpointing:
        return kv_held_fraction * 2 * s.kv_heads * s.head_dim * b
    norms = 2 * (4 * s.hidden + 2 * b * s.hidden + 4)
    o_proj = s.heads * s.head_dim * b
    mlp = 4 * s.intermediate * b
    queries = query_slots_per_token * (2 * s.heads * s.head_dim * b + 4 * s.heads)
    keys = keys_per_token * 2 * s.kv_heads * s.head_dim * b
    return norms + o_proj + mlp + queries + keys


def fixed_bytes_per_token(
    config: Any,
    *,
    dtype_bytes: int,
    checkpointing: bool,
    mode: str = "cot",
    latent_fraction: float = 0.0,
    mask_elems_per_token: float = 0.0,
) -> float:
    """Bytes kept per token outside the decoder layers (module docstring)."""
    s, b = Shape.of(config), dtype_bytes
    loss = 4 * s.vocab
    latent = latent_fraction * ((17 + b) * s.vocab + b * s.hidden) if mode == "fusion" else 0.0
    masks = mask_elems_per_token * b
    if checkpointing:
        return 2 * b * s.hidden + masks + loss + latent
    final_norm = 4 * s.hidden + 2 * b * s.hidden + 4
    rotary = 2 * s.head_dim * b
    return final_norm + rotary + masks + loss + latent


def activation_bytes_per_token(
    config: Any,
    *,
    dtype_bytes: int,
    checkpointing: bool,
    mode: str,
    passes: int,
    seq_len: int | None = None,
    latent_fraction: float | None = None,
    query_slots_per_token: float = 1.0,
    keys_per_token: float | None = None,
    kv_held_fraction: float | None = None,
) -> float:
    """Bytes a training step keeps for backward per token: every layer plus what lies outside them.

    ``passes``: the rollout's sequential passes (1 for ``cot``/``pause``). ``seq_len``: the longest
    row (for the pass masks; ``None`` leaves them out). Defaults are upper bounds for unpadded rows:
    ``keys_per_token = passes`` (each pass gathers every earlier position), ``kv_held_fraction = 1``,
    ``latent_fraction = (passes - 1) / seq_len`` for ``fusion`` (one latent slot per row and pass);
    ``query_slots_per_token`` is 1 without padding (bench P2 measures real batches).
    Multiply by the tokens of a micro-batch for bytes; add one pass's non-checkpointed bytes as the
    recompute transient when ``checkpointing``.
    """
    if passes < 1:
        raise ValueError(f"passes={passes} must be >= 1")
    if keys_per_token is None:
        keys_per_token = float(passes)
    if kv_held_fraction is None:
        kv_held_fraction = 1.0 if passes > 1 else 0.0
    if latent_fraction is None:
        latent_fraction = (passes - 1) / seq_len if seq_len and mode == "fusion" else 0.0
    shape = Shape.of(config)
    # sum_k B G W_k T_k per token, with every T_k <= seq_len
    mask = shape.heads // shape.kv_heads * query_slots_per_token * seq_len if seq_len else 0.0
    per_layer = layer_bytes_per_token(
        config,
        dtype_bytes=dtype_bytes,
        checkpointing=checkpointing,
        query_slots_per_token=query_slots_per_token,
        keys_per_token=keys_per_token,
        kv_held_fraction=kv_held_fraction,
    )
    fixed = fixed_bytes_per_token(
        config,
        dtype_bytes=dtype_bytes,
        checkpointing=checkpointing,
        mode=mode,
        latent_fraction=latent_fraction,
        mask_elems_per_token=mask,
    )
    return shape.layers * per_layer + fixed


def plan_stats(plan: Any, groups: int) -> dict[str, float]:
    """The per-token quantities of the formula for one planned batch of packed passes
    (``rollout_plan.RolloutPlan``): the exact inputs of ``layer_bytes_per_token`` /
    ``fixed_bytes_per_token`` for that batch (``groups``: query heads per K/V head)."""
    n = plan.n_tokens
    real = [p for p in plan.passes if not p.empty]
    return {
        "passes": len(plan.passes),
        "query_slots_per_token": sum(p.bsz * p.width for p in plan.passes) / n,
        "keys_per_token": sum(p.bsz * p.span for p in plan.passes) / n,
        "kv_held_fraction": sum(p.n for p in real[:-1]) / n,
        "mask_elems_per_token": sum(groups * p.bsz * p.width * p.span for p in plan.passes) / n,
        "latent_fraction": sum(p.latent_at.numel() if not p.empty else 1 for p in plan.passes[1:]) / n,
    }
