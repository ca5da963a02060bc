"""The Hugging Face model families ``LatentLM`` supports, and what it must know about each.

``LatentLM`` drives an untouched HF model through its pieces (input-embedding module, decoder,
output head; ``latent_lm.py``), never through the model's own ``forward``. Whatever a family's
``forward`` does around those pieces has to be reproduced here, and a family whose quirks have not
been checked is refused at model build (``attach``) instead of being trained with wrong numbers.
Every family listed in ``FAMILIES`` is covered by ``tests/unit/test_families.py`` (values and
gradients against the naive reference, single-pass logits and loss against the model's own
``forward``, batched against one-at-a-time decoding); the README's "Supported models" table is
the user-facing copy of this list.

What differs between the supported families, and where it is handled:

* **Final logits.** Granite divides the head's output by ``logits_scaling`` in ``forward``;
  Gemma 2 (and Gemma 3 when configured) soft-caps it (``final_logit_softcapping``):
  :meth:`ModelFamily.final_logits`.
* **Input embeddings.** Gemma 1/2/3 multiply the embedding rows by sqrt(d) *inside* the embedding
  module (``Gemma*TextScaledWordEmbedding``), so token inputs already carry it and latent inputs
  (passed as ``inputs_embeds``) are not rescaled. The fusion's expected embedding is the embedding
  module's output under the predicted distribution, ``s * sum_w P(w) E(w)``:
  :meth:`ModelFamily.embedding_scale` (docs/method.md §6). Granite scales
  ``inputs_embeds`` *in the decoder* (``embedding_multiplier``), i.e. tokens and latents alike.
* **Attention kernels.** ``sdpa`` and ``eager`` everywhere except Gemma 2, whose attention-logit
  soft-capping exists only in ``eager`` (transformers refuses ``sdpa``); soft-capped attention also
  rules out packed passes (``packed.packing_supported``).
* **Sliding-window attention** (Mistral's and Phi-3's configs, Gemma 2/3's local layers). Rollout,
  packed passes and decoding hand the decoder their own 4D masks, which transformers applies as
  given, without the window. That is exact while no query is ``sliding_window`` or more key
  slots away from its first key; a longer call is refused by a guard on the decoder
  (:func:`attach`), never computed with the wrong window. Rotary embeddings whose frequencies
  depend on the call's longest position (Phi-3 128k's ``longrope``, ``dynamic``) get the same
  guard at the length where they start to change (:func:`exact_length_limit`).
* **Mixture of experts** (Qwen3-MoE): the expert GEMM takes fp32/bf16/fp16 only (fp64 needs
  ``config._experts_implementation = "eager"``). The model's ``forward`` adds
  ``router_aux_loss_coef`` times the load-balancing loss of all its tokens when
  ``config.output_router_logits`` is set; ``LatentLM`` calls the decoder once per pass, so
  :class:`RouterAuxLoss` collects each pass's router logits of its real tokens and computes the
  loss once over all tokens of the step, as that single forward would (not once per pass, and
  not dropped).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

KERNELS = ("sdpa", "eager")


class UnsupportedModelError(ValueError):
    """The base model is of a family (or in a configuration) ``LatentLM`` has not been checked on."""


@dataclass(frozen=True)
class Family:
    name: str  # as the README table spells it
    kernels: tuple[str, ...] = KERNELS  # the attention implementations checked for it


# Keyed by ``config.model_type``. Their limits are in the README table; attach() refuses the calls
# that would compute wrong numbers.
FAMILIES: dict[str, Family] = {
    "llama": Family("Llama (Llama 2/3, SmolLM2, TinyLlama)"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2 / Qwen2.5"),
    "qwen3": Family("Qwen3"),
    "qwen3_moe": Family("Qwen3-MoE"),
    "phi3": Family("Phi-3"),
    "olmo2": Family("OLMo-2"),
    "granite": Family("Granite"),
    "gemma": Family("Gemma"),
    "gemma2": Family("Gemma 2", kernels=("eager",)),  # attention soft-capping: eager only
    "gemma3_text": Family("Gemma 3 (text)"),
}

# Families users ask for that are refused with a pointer instead of the generic message.
_REFUSED = {
    "gemma3": "the multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not supported; the text-only "
    "checkpoints (model_type gemma3_text, e.g. google/gemma-3-1b-it, google/gemma-3-270m) are",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_of(config) -> Family:
    """The checked family of a model config, or ``UnsupportedModelError`` naming it."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = _REFUSED.get(
        model_type,
        f"model family {model_type!r} ({type(config).__name__}) has not been checked "
        "with ltscale's latent rollout",
    )
    raise UnsupportedModelError(
        f"{why}. Supported model_type values: {', '.join(supported_model_types())} (README: Supported models). "
        "A family is added by listing it in ltscale/model/families.py and covering it in tests/unit/test_families.py."
    )


def check_config(config, attn_implementation: str | None = None) -> Family:
    """Family and attention kernel checks that need only the config (run before loading weights)."""
    family = family_of(config)
    kernel = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    if kernel not in family.kernels:
        extra = (
            " (its attention-logit soft-capping exists only in eager; transformers refuses sdpa for it)"
            if config.model_type == "gemma2"
            else ""
        )
        raise UnsupportedModelError(
            f"model.attn_implementation: {kernel!r} is not supported for {family.name} "
            f"(model_type {config.model_type}){extra}; use one of {', '.join(family.kernels)}"
        )
    return family


def sliding_window(config) -> int | None:
    """The smallest attention window of any layer (``None``: every layer attends to all keys)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    _, per_layer = get_layer_types_and_kwargs(config)
    windows = [kw["sliding_window"] for kw in per_layer if kw.get("sliding_window")]
    return min(windows) if windows else None


def _rope_limit(config) -> int | None:
    """Longest row whose rotary frequencies do not depend on the call (``None``: any length).

    ``longrope`` (Phi-3 128k) and ``dynamic`` rotary embeddings pick their frequencies from the
    largest position *in each call*: past that length, a pass or a decode step would rotate its
    queries differently from the keys cached by earlier calls, and from a single full forward.
    """
    params = getattr(config, "rope_parameters", None) or {}
    nested = bool(params) and all(isinstance(v, dict) for v in params.values())  # per layer type (Gemma 3)
    limits = []
    for p in params.values() if nested else [params]:
        kind = p.get("rope_type", "default")
        if kind == "longrope":
            limits.append(p["original_max_position_embeddings"])
        elif "dynamic" in kind:
            limits.append(config.max_position_embeddings)
    return min(limits) if limits else None


def exact_length_limit(config) -> tuple[int, str] | None:
    """``(tokens, why)``: the longest decoder call ltscale's own masks and caches reproduce exactly."""
    limits = []
    window = sliding_window(config)
    if window is not None:
        limits.append((window, f"sliding-window attention (window {window})"))
    rope = _rope_limit(config)
    if rope is not None:
        limits.append((rope, f"position-dependent rotary frequencies (constant up to {rope} tokens)"))
    return min(limits) if limits else None


def embedding_scale(embedding: nn.Module) -> float:
    """The factor the input-embedding module multiplies its rows by, in the weight's dtype.

    Gemma's ``*ScaledWordEmbedding`` multiplies by ``embed_scale.to(weight.dtype)`` (a buffer made
    in fp32 from ``scalar_embed_scale``); the same rounding is reproduced on the host so that a
    one-token expected embedding equals the module's output bit for bit, with no device sync.
    """
    if type(embedding) is nn.Embedding:
        return 1.0
    scale = getattr(embedding, "scalar_embed_scale", None)
    if not isinstance(scale, (int, float)) or not isinstance(embedding, nn.Embedding):
        raise UnsupportedModelError(
            f"input embedding module {type(embedding).__name__} is neither nn.Embedding nor a known scaled embedding: "
            "the fusion's expected input embedding cannot be computed for it"
        )
    return float(torch.tensor(float(scale), dtype=torch.float32).to(embedding.weight.dtype))


class RouterAuxLoss:
    """A mixture-of-experts model's router load-balancing loss over the real tokens of a rollout.

    Between :meth:`begin` and :meth:`end`, a forward hook on every router keeps its logits (the
    module and output index the model itself records as ``router_logits``). Each decoder call (one
    per pass) runs every router once, in layer order. :meth:`loss` keeps, per pass, the rows that are real
    tokens (a padded pass also routes its padding; an empty lockstep pass routes one dummy) and
    applies the model's own ``load_balancing_loss_func`` to all of them at once. Hooks fire again
    when a checkpointed pass is recomputed in backward; by then the collection has ended.
    """

    def __init__(self, base_model: nn.Module):
        config = base_model.config
        decoder = base_model.get_decoder()
        recorder = getattr(decoder, "_can_record_outputs", {}).get("router_logits")
        self.loss_fn = getattr(sys.modules[type(base_model).__module__], "load_balancing_loss_func", None)
        if recorder is None or self.loss_fn is None:
            raise UnsupportedModelError(
                f"{type(base_model).__name__}: no router logits to build its aux loss from"
            )
        self.routers = [m for m in decoder.modules() if isinstance(m, recorder.target_class)]
        self.index = recorder.index
        self.coef = float(config.router_aux_loss_coef)
        self.num_experts, self.top_k = int(config.num_experts), int(config.num_experts_per_tok)
        self.calls: list[torch.Tensor] = []
        self._handles: list = []

    def begin(self) -> None:
        """Start collecting (a fresh list; hooks left by a collection that raised are replaced)."""
        self.end()
        self.calls = []
        self._handles = [r.register_forward_hook(self._keep) for r in self.routers]

    def end(self) -> list[torch.Tensor]:
        """Stop collecting; the logits of every router call since :meth:`begin` (pass-major, layer-minor)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.calls

    def _keep(self, module: nn.Module, args: tuple, out: tuple) -> None:
        self.calls.append(out[self.index])

    def loss(self, calls: list[torch.Tensor], real_rows: list[torch.Tensor | None]) -> torch.Tensor:
        """``coef * load_balancing_loss`` of the real tokens; ``real_rows[k]``: the rows of pass ``k``'s
        decoder call that are real tokens (a bool mask or indices; ``None``: all of them)."""
        n_layers = len(self.routers)
        if len(calls) != n_layers * len(real_rows):
            raise RuntimeError(
                f"router aux loss: {len(calls)} router calls for {len(real_rows)} passes "
                f"x {n_layers} MoE layers (was the decoder called outside the rollout?)"
            )
        per_layer = []
        for layer in range(n_layers):
            rows = [calls[k * n_layers + layer] for k in range(len(real_rows))]
            rows = [r if sel is None else r[sel] for r, sel in zip(rows, real_rows)]
            per_layer.append(torch.cat(rows))
        return self.coef * self.loss_fn(tuple(per_layer), self.num_experts, self.top_k)


class ModelFamily:
    """What ``LatentLM`` needs to know about its base model's family (made by :func:`attach`)."""

    def __init__(self, base_model: nn.Module, family: Family):
        self.family = family
        self._base = base_model  # looked up per call: resize_token_embeddings replaces the module
        self.embedding_scale()  # refuse an unknown embedding module now, not in stage 3
        self._router_aux: RouterAuxLoss | None = None

    @property
    def router_aux(self) -> RouterAuxLoss | None:
        """The router aux loss the model's own ``forward`` would add (``None``: it adds none)."""
        if not getattr(self._base.config, "output_router_logits", False):
            return None
        if self._router_aux is None:
            self._router_aux = RouterAuxLoss(self._base)
        return self._router_aux

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's output turned into the logits the model's own ``forward`` returns."""
        config = self._base.config
        scaling = getattr(config, "logits_scaling", None)  # Granite
        if scaling is not None and scaling != 1:
            logits = logits / scaling
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        return torch.tanh(logits / cap) * cap if cap else logits

    def embedding_scale(self) -> float:
        """``s`` in the expected input embedding ``s * sum_w P(w) E(w)`` (1 for plain embeddings)."""
        return embedding_scale(self._base.get_input_embeddings())


def real_rows_per_pass(plan, packed: bool) -> list[torch.Tensor | None]:
    """For :meth:`RouterAuxLoss.loss`: which rows of each pass's decoder call are real tokens.

    A padded pass routes its ``(B, W_k)`` slots row-major, padding included (its real ones: the
    plan's ``q_real``, ascending); a packed pass routes exactly its real tokens; an empty lockstep
    pass routes one dummy, no real row (``rollout_plan.py``). Indices, not masks: no device sync.
    """
    rows: list[torch.Tensor | None] = []
    for spec in plan.passes:
        if spec.empty:
            rows.append(spec.q_real[:0])
        else:
            rows.append(None if packed else spec.q_real)
    return rows


def _length_guard(name: str, limit: int, why: str):
    """A decoder pre-hook. A 4D mask's key slots bound every query's position (a padded pass or a
    decode batch counts padded slots too), so checking its width needs no device sync."""

    def guard(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[-1] > limit:
            raise ValueError(
                f"{name}: this decoder call attends over {mask.shape[-1]} key slots, but the model's {why} is "
                f"reproduced by ltscale's own masks and caches only up to {limit}: shorten the sequences "
                "(data.max_length, eval.max_new_tokens, eval.batch_size) or use packed passes "
                "(engine.packed_passes: auto), whose key slots are true positions"
            )

    return guard


def attach(base_model: nn.Module) -> ModelFamily:
    """``LatentLM``'s construction hook: refuse an unchecked model, guard a windowed one.

    Idempotent per base model (several wrappers may be built around one model).
    """
    config = base_model.config
    family = check_config(config)
    limit = exact_length_limit(config)
    decoder = base_model.get_decoder()
    if limit is not None and not getattr(decoder, "_ltscale_length_guard", False):
        decoder.register_forward_pre_hook(_length_guard(family.name, *limit), with_kwargs=True)
        decoder._ltscale_length_guard = True
        log.info("%s: %s; decoder calls over %d key slots are refused", family.name, limit[1], limit[0])
    return ModelFamily(base_model, family)
