"""``LatentLM``: an untouched Hugging Face causal LM plus what makes ``<thinking>`` slots latent.

The wrapper owns no transformer code. It decides, per mode, what a latent slot's input embedding
is (the method's *latent function*) and runs the KV-cached rollout (``rollout.py``) for training
and the batched latent decoder (``generation.py``) for inference.

Modes (docs/method.md §5; ``pause``: docs/baselines.md §6):
  ``hidden``  stage 2 / Coconut-style: the previous position's last-layer, post-norm hidden state.
  ``fusion``  stage 3: Context-Prediction Fusion ``a*h + (1-a)*E^T P-hat``.
  ``pause``   ablation "w/o latent": the slot keeps the learned ``<thinking>`` embedding (one pass).
  ``cot``     no latents expected; a plain forward.
An optional adapter MLP (docs/method.md §7) is applied after the latent function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from ltscale import rundir
from ltscale.config import LATENT_MODES, check_alpha, check_top_p
from ltscale.model.families import attach, real_rows_per_pass
from ltscale.model.generation import DecodeRule, GenerationOutput, generate_batched, generate_many
from ltscale.model.packed import packing_supported
from ltscale.model.rollout import count_passes, latent_rollout
from ltscale.ops import context_prediction_fusion, fused_device_problem
from ltscale.ops.deferred import DeferredWeightGrads, deferred_linear

MODES = LATENT_MODES


@dataclass
class LatentLMOutput(ModelOutput):
    """A ``ModelOutput`` (a dict) so DeepSpeed's ZeRO-3 hooks can find the tensors in it."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    n_passes: int | None = None
    n_targets: int | None = None
    aux_loss: torch.Tensor | None = None  # mixture of experts: router load balancing, already in ``loss``


class FusionHead(nn.Module):
    """Computes the fused latent embedding inside its own ``forward``.

    It owns no parameters; it reads the input-embedding weight and, when it is not handed the
    logits, the output-embedding weight (the rollout's per-pass head call happens here). Under ZeRO-3
    those weights are partitions outside their modules' forwards, so the engine registers them as
    *external parameters* of this module (``LatentLM.zero3_external_parameters``) and DeepSpeed
    gathers them here.

    In a training forward (``owner._deferred`` set) both reads defer their ``V x d`` weight gradients
    to the step's accumulators (``ltscale/ops/deferred.py``): one gradient per weight per step
    instead of one per pass.
    """

    def __init__(self, owner: LatentLM):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: avoids a second path to the base

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        owner = self._owner
        deferred = owner._deferred
        if logits is None:  # LatentLM.lm_head's computation, from the weights
            head = owner.base.get_output_embeddings()
            logits = deferred_linear(hidden, head.weight, deferred)
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias
            logits = owner.mask_padded_rows(owner.family.final_logits(logits))
        weight = owner.base.get_input_embeddings().weight
        # The expected *input* embedding: the embedding module's own scale (Gemma: sqrt(d)) applies.
        return context_prediction_fusion(
            hidden, logits, weight, alpha=owner.alpha, temperature=owner.temperature, top_p=owner.top_p,
            exclude_token_id=owner.thinking_token_id, impl=owner.fusion_impl, deferred=deferred,
            embed_scale=owner.family.embedding_scale())


class LatentAdapter(nn.Module):
    """``LayerNorm(W2 GELU(W1 v + b1) + b2)``, d -> hidden -> d (the official ``thinking_mlp``)."""

    def __init__(self, dim: int, hidden: int = 1024):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(nn.functional.gelu(self.up(v))))


class LatentLM(nn.Module):
    # Defer weight gradients used by several passes (the fusion's V x d reads, the packed passes'
    # Linear layers) to one per step (ops/deferred.py). False: plain per-pass gradients (parity
    # tests and before/after measurements).
    defer_weight_grads: bool = True

    def __init__(self, base_model: nn.Module, thinking_token_id: int, mode: str = "hidden", alpha: float = 0.6,
                 temperature: float = 1.0, top_p: float = 0.9, *, adapter: bool = False,
                 adapter_hidden: int = 1024, gradient_checkpointing: bool = False, fusion_impl: str = "auto",
                 packed_passes: str = "auto", vocab_tokens: int | None = None):
        super().__init__()
        self.family = attach(base_model)  # refuses a model family or kernel that has not been checked (families.py)
        self.base = base_model
        self.thinking_token_id = int(thinking_token_id)
        self.fusion = FusionHead(self)
        dim = base_model.get_input_embeddings().embedding_dim  # also when ZeRO-3 partitioned the weight
        self.adapter = LatentAdapter(dim, adapter_hidden) if adapter else None
        self.gradient_checkpointing = gradient_checkpointing
        self.fusion_impl = fusion_impl
        self._check_fused_kernel()
        if packed_passes not in ("auto", "off"):
            raise ValueError(f"packed_passes={packed_passes!r} not in auto|off")
        self.packed_passes = packed_passes
        # The tokenizer's size: embedding rows past it are vocabulary padding (model/builder.py
        # fit_vocab), never a token. None: every row is a token.
        self.vocab_tokens = vocab_tokens
        self.mode = "cot"
        self._deferred: DeferredWeightGrads | None = None  # set for the duration of a training forward
        self.set_latent_mode(mode, alpha=alpha, temperature=temperature, top_p=top_p)

    # ------------------------------------------------------------------ configuration
    def _check_fused_kernel(self) -> None:
        """``engine.fused=on``: fail at construction and at every placement (``.to(device)``), not
        when stage 3 first calls the op: the kernel must exist for where the model is and, on a
        machine with a GPU, for the current GPU (where DeepSpeed will put it)."""
        if self.fusion_impl != "fused":
            return
        devices = {self.base.get_input_embeddings().weight.device}
        if torch.cuda.is_available():
            devices.add(torch.device("cuda", torch.cuda.current_device()))
        for device in devices:
            why = fused_device_problem(device)
            if why is not None:
                raise RuntimeError(f"engine.fused=on but the compiled fusion op cannot run on {device}: {why} "
                                   "(set engine.fused=auto to fall back to torch; see `ltscale env`)")

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._check_fused_kernel()
        return out

    def set_latent_mode(self, mode: str, *, alpha: float | None = None, temperature: float | None = None,
                        top_p: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} not in {MODES}")
        self.mode = mode
        if alpha is not None:
            check_alpha(alpha)
            self.alpha = float(alpha)
        if temperature is not None:
            self.temperature = float(temperature)
        if top_p is not None:
            check_top_p(top_p)
            self.top_p = float(top_p)

    def latent_config(self) -> dict:
        """The checkpoint's latent meta (``ltscale_latent.json``): what rebuilds this wrapper."""
        return rundir.latent_meta(mode=self.mode, alpha=self.alpha, temperature=self.temperature, top_p=self.top_p,
                                  thinking_token_id=self.thinking_token_id, adapter=self.adapter is not None,
                                  adapter_hidden=self.adapter.up.out_features if self.adapter is not None else None)

    @property
    def uses_rollout(self) -> bool:
        """Only modes whose slot input depends on the previous state need sequential passes."""
        return self.mode in ("hidden", "fusion")

    def zero3_external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """What ``FusionHead.forward`` reads: the input embedding, the output head (tied: once)."""
        params = [self.base.get_input_embeddings().weight]
        head = self.base.get_output_embeddings()
        if head is not None:
            params += [p for p in (head.weight, getattr(head, "bias", None)) if isinstance(p, nn.Parameter)]
        unique = list({id(p): p for p in params}.values())
        return [(self.fusion, p) for p in unique]

    # ------------------------------------------------------------------ pieces of the base model
    def decoder(self) -> nn.Module:
        return self.base.get_decoder()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the model's own ``forward`` computes (Granite's scaling, Gemma's soft-cap included)."""
        return self.mask_padded_rows(self.family.final_logits(self.base.get_output_embeddings()(hidden)))

    def mask_padded_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of padded vocabulary rows set to the dtype's lowest value, in place.

        Why: softmax then gives them exactly 0, so the loss normaliser, the fusion's top-p set, argmax
        decoding and entropies are those of the tokenizer's vocabulary, as without padding. A finite
        value rather than -inf keeps ``p * log p`` at 0 for them. In place on the head's output (which
        no backward saves), a write of ``tokens x padding`` elements; their gradient is 0.
        """
        n = self.vocab_tokens
        if n is not None and logits.shape[-1] > n:
            logits[..., n:] = torch.finfo(logits.dtype).min
        return logits

    def latent_input(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The method's latent function: what a ``<thinking>`` slot is fed.

        ``logits=None``: compute the previous position's logits here, only when the mode needs them.
        """
        if self.mode == "hidden":
            out = hidden
        elif self.mode == "fusion":
            out = self.fusion(hidden, logits)  # logits=None: the head runs inside the fusion module
        else:
            raise RuntimeError(f"mode {self.mode!r} has no latent function (slots keep their token embedding)")
        return self.adapter(out) if self.adapter is not None else out

    def count_passes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        if not self.uses_rollout:
            return 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return count_passes(input_ids, attention_mask, self.thinking_token_id)

    # ------------------------------------------------------------------ training forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, min_passes: int = 1,
                return_logits: bool = True) -> LatentLMOutput:
        """Token-mean cross-entropy over non-ignored labels (HF convention), via the KV-cached rollout.

        ``min_passes``: run at least this many sequential passes (ZeRO-3 lockstep across ranks).
        The ids, mask and labels may stay on CPU (as the collator makes them): the rollout is planned
        there and shipped to the model's device in one copy (``rollout_plan.py``).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Modes without a latent function run the same code path with no latent slots: one pass,
        # identical masking and position handling.
        rollout = self.uses_rollout
        # One deferred-gradient accumulator per weight for this step, shared by the fusion head and
        # the packed passes' Linear layers (made lazily at first use); dropped after the rollout:
        # calls outside a training forward take the plain path.
        self._deferred = DeferredWeightGrads() if self.defer_weight_grads and torch.is_grad_enabled() else None
        router_aux = self.family.router_aux if labels is not None else None  # mixture of experts (families.py)
        if router_aux is not None:
            router_aux.begin()
        res = latent_rollout(
            decoder=self.decoder(), config=self.base.config, embed=self.embed, lm_head=self.lm_head,
            latent_input=self.latent_input, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
            thinking_token_id=self.thinking_token_id if rollout else -1, min_passes=min_passes if rollout else 1,
            gradient_checkpointing=self.gradient_checkpointing and self.training, return_logits=return_logits,
            packed=self.packed_passes == "auto" and packing_supported(self.base.config), deferred=self._deferred,
            device=self.base.get_input_embeddings().weight.device)
        self._deferred = None  # the accumulators live on in the graph until its backward
        loss = aux = None
        if labels is not None:
            loss = res.loss_sum / max(res.n_targets, 1)
        if router_aux is not None:  # one load-balancing loss over the real tokens of all passes
            aux = router_aux.loss(router_aux.end(), real_rows_per_pass(res.plan, res.plan.packed))
            loss = loss + aux
        return LatentLMOutput(loss=loss, logits=res.logits, n_passes=res.n_passes, n_targets=res.n_targets,
                              aux_loss=aux)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 256, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 without_thinking: bool = False, forced: torch.Tensor | None = None,
                 rule: DecodeRule | None = None) -> GenerationOutput:
        """A padded batch decoded together (``generation.generate_batched``)."""
        return generate_batched(self, input_ids, attention_mask, max_new_tokens, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id, without_thinking=without_thinking, forced=forced,
                                rule=rule)

    @torch.no_grad()
    def generate_many(self, prompts, max_new_tokens: int = 256, *, slots: int, eos_token_id: int | None = None,
                      pad_token_id: int | None = None, without_thinking: bool = False,
                      forced: torch.Tensor | None = None, rule: DecodeRule | None = None,
                      on_finish=None) -> GenerationOutput:
        """Continuous batching over unpadded prompts (``generation.generate_many``)."""
        return generate_many(self, prompts, max_new_tokens, slots=slots, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, without_thinking=without_thinking, forced=forced,
                             rule=rule, on_finish=on_finish)
