"""Loading a checkpoint for decoding, the one way: the trainer's per-stage eval, ``ltscale eval``,
``ltscale generate``, ``ltscale analyze``, ``ltscale compare`` and the lm-eval backend all call
:func:`load_for_inference`.

The checkpoint's own method (``ltscale_latent.json``) decides how it decodes unless ``method``
overrides it (Soft-Thinking decodes any checkpoint); the method's ``decoding`` hook says which module
decodes, with which :class:`~ltscale.model.generation.DecodeRule`, and what follows every prompt.
Everything then runs through the one decode loop (``ltscale.model.generation.generate_many``,
continuous batching).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ltscale import rundir
from ltscale.config import RunConfig, parse_yaml
from ltscale.data.formatting import prompt_ids
from ltscale.methods import Checkpoint, get_method
from ltscale.model import io as model_io
from ltscale.model.generation import DecodeRule, GenerationOutput, Greedy, generate_many

__all__ = ["Inference", "inference_for", "load_for_inference", "parse_method_options"]

#: The method of a checkpoint whose meta names none (LT-Tuning and its ablations, ``ltscale export``).
DEFAULT_METHOD = "lt_tuning"


@dataclass
class Inference:
    """A checkpoint ready to decode under a method."""

    model: Any  # the module decoded (a LatentLM, or the method's subclass of it)
    tokenizer: Any
    method: str
    rule: DecodeRule = field(default_factory=Greedy)
    without_thinking: bool = False  # the method never lets free decoding choose <thinking>
    chat: bool | None = None  # prompts use the tokenizer's chat template (None: when it has one)
    prompt_suffix: list[int] = field(default_factory=list)  # the method's ids after every prompt
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's latent meta
    settings: dict[str, Any] = field(default_factory=dict)  # the method's decoding settings
    path: Path | None = None  # the HF dir it was loaded from

    @property
    def thinking_token_id(self) -> int:
        return int(self.model.thinking_token_id)

    def prompt_ids(self, question: str) -> list[int]:
        """The ids a question is decoded from: the formatted prompt plus the method's suffix."""
        return list(prompt_ids(self.tokenizer, question, use_chat_template=self.chat)) + self.prompt_suffix

    @torch.no_grad()
    def generate_many(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        slots: int,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        without_thinking: bool = False,
        on_finish: Callable[[int], None] | None = None,
        stop: Callable[[int, list[int]], bool] | None = None,
    ) -> GenerationOutput:
        """Decode ``prompts`` (unpadded ids, e.g. from :meth:`prompt_ids`) with the method's rule and
        at most ``slots`` rows in flight; outputs in prompt order, on the CPU.

        ``without_thinking``: free decoding never chooses ``<thinking>`` (pure explicit decoding).
        ``pad_token_id`` (after EOS): the tokenizer's pad, else EOS. ``stop``: ends a row early
        (``ltscale.model.generation.generate_many``).
        """
        if pad_token_id is None:
            pad_token_id = self.tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos_token_id
        rule = self.rule
        if without_thinking and isinstance(rule, Greedy) and not rule.without_thinking:
            rule = dataclasses.replace(rule, without_thinking=True)
        was_training = bool(self.model.training)
        self.model.eval()
        try:
            out = generate_many(
                self.model,
                prompts,
                max_new_tokens,
                slots=slots,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                rule=rule,
                on_finish=on_finish,
                stop=stop,
            )
        finally:
            self.model.train(was_training)
        return out.cpu()


def inference_for(
    lm: Any,
    tokenizer: Any,
    *,
    method: str | None = None,
    meta: dict[str, Any] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    path: str | os.PathLike[str] | None = None,
    chat: bool | None = None,
    cfg: RunConfig | None = None,
) -> Inference:
    """Decoding of a loaded model: ``method`` (else the one ``meta`` names, else LT-Tuning).

    ``options``: ``{section: {key: value}}`` merged over the meta's method sections (the command
    line's ``--method-option``); ``cfg``: the run's config when the trainer or ``compare`` evaluates
    (its method sections and ``model.use_chat_template`` decide).
    """
    meta = dict(meta or {})
    for section, values in (options or {}).items():
        meta[section] = {**meta.get(section, {}), **values}
    name = method or meta.get(rundir.METHOD_KEY) or DEFAULT_METHOD
    if cfg is not None:
        chat = cfg.model.use_chat_template
    hf = Path(path) if path is not None else None
    decoding = get_method(name).decoding(Checkpoint(lm=lm, tokenizer=tokenizer, meta=meta, path=hf), cfg)
    return Inference(
        model=decoding.model,
        tokenizer=tokenizer,
        method=name,
        rule=decoding.rule or Greedy(),
        without_thinking=decoding.without_thinking,
        chat=chat,
        prompt_suffix=list(decoding.prompt_suffix),
        meta=meta,
        settings=decoding.meta,
        path=hf,
    )


def load_for_inference(
    path: str | os.PathLike[str],
    method: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    *,
    mode: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    chat: bool | None = None,
    cfg: RunConfig | None = None,
) -> Inference:
    """Load the HF dir behind ``path`` (an HF, stage or run dir) and build its decoding.

    ``mode`` overrides the checkpoint's latent mode; ``device`` defaults to CUDA when there is one.
    The global torch RNG is left seeded with 0 whatever building the method's modules drew, so
    what a caller draws next (the trainer's next stage) does not depend on the method or on how
    the checkpoint was loaded.
    """
    hf = rundir.resolve_checkpoint(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, tokenizer = model_io.load_latent_model(hf, mode=mode, device=device, dtype=dtype)
    inf = inference_for(
        lm,
        tokenizer,
        method=method,
        meta=rundir.inference_meta(hf),
        options=options,
        path=hf,
        chat=chat,
        cfg=cfg,
    )
    torch.manual_seed(0)
    return inf


def parse_method_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``SECTION.KEY=VALUE`` strings (YAML values) -> ``{section: {key: value}}``; ValueError names a bad one."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise ValueError(f"{item!r}: expected SECTION.KEY=VALUE, e.g. soft_thinking.top_k=5")
        options.setdefault(section, {})[name] = parse_yaml(text)
    return options
