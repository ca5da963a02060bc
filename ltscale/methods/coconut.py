"""Coconut (Hao et al., arXiv 2412.06769; docs/baselines.md §3) in the shared engine.

Data (the original's ``get_cot_latent_dataset``): at Coconut stage ``s`` a sample is
``prompt, <bot>, s*c latents, <eot>, steps s+1.., answer, EOS``; past ``max_latent_stage`` every
step is dropped and the sample gets ``max_latent_stage*c`` latents (``pad_latent_to_max``). As in
the original, ``s`` is not capped at the sample's own step count (a 2-step sample at stage 3 gets
``3c`` latents and no steps). Labels are -100 on the prompt, both markers and every latent; the
remaining steps, the answer and EOS are supervised. Config stage ``i`` (1-based) is Coconut stage
``coconut.start_stage + i - 1``: stage 0 is CoT with markers (mode ``cot``), later stages use
mode ``hidden``.

Latent function: the previous position's last-layer post-norm hidden state, no projection -- the
``LatentLM`` ``hidden`` mode, run by the shared KV-cached rollout (``1 + latents`` passes per
batch, no per-position Python loop). Latent slots are ``<thinking>`` ids, so the rollout, the
lockstep pass count and the latent-token metrics need nothing Coconut-specific.

Optimizer: the original re-creates AdamW at every epoch; here ``optim.stage_strategy: reset``
(the Coconut configs) resets it at every stage boundary, ``continue`` keeps one -- configurable.

Decoding: the prompt ends with ``<bot>``; the decoder is forced through the stage's fixed number
of latents and ``<eot>``, then decodes greedily with ``<thinking>`` masked (the model never learned
to emit it).

Our response text (``## Step i: ...``, ``The final answer is:\\n### N``) replaces the original's
``step\\n`` / ``### N`` so one extractor scores every method; skipped steps keep their numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ltscale.config import ConfigError, RunConfig
from ltscale.data.formatting import IGNORE_INDEX, Encoded, encode_plain
from ltscale.data.trainset import Examples
from ltscale.methods import Checkpoint, Decoding, Method, StageContext
from ltscale.methods.lt_tuning import rewrite_stages
from ltscale.model.builder import init_thinking_embedding
from ltscale.model.generation import Greedy

BOT = "<|start-latent|>"
EOT = "<|end-latent|>"

Tokenize = Callable[[list[str]], list[list[int]]]


def stage_layout(
    stage: int, n_steps: int, *, c_thought: int, max_latent_stage: int, pad_latent_to_max: bool = True
) -> tuple[int, int]:
    """(steps dropped, latent slots) of a sample with ``n_steps`` steps at Coconut stage ``stage``."""
    if stage > max_latent_stage:
        n = max_latent_stage if pad_latent_to_max else min(n_steps, max_latent_stage)
        return n_steps, n * c_thought
    return min(stage, n_steps), stage * c_thought


def build_example(
    record_id: str,
    steps: Sequence[str],
    answer: str,
    prompt: Sequence[int],
    tokenize: Tokenize,
    *,
    stage: int,
    c_thought: int,
    max_latent_stage: int,
    pad_latent_to_max: bool,
    bot_id: int,
    eot_id: int,
    latent_id: int,
    eos_id: int,
) -> Encoded:
    """One Coconut training sequence (see the module docstring for the layout)."""
    skip, n_latent = stage_layout(
        stage,
        len(steps),
        c_thought=c_thought,
        max_latent_stage=max_latent_stage,
        pad_latent_to_max=pad_latent_to_max,
    )
    lines = [f"## Step {i}: {s}\n" for i, s in enumerate(steps, 1)][skip:] + [
        f"The final answer is:\n### {answer}"
    ]
    response = [t for ids in tokenize(lines) for t in ids] + [eos_id]
    head = list(prompt) + [bot_id] + [latent_id] * n_latent + [eot_id]
    return Encoded(
        input_ids=head + response,
        labels=[IGNORE_INDEX] * len(head) + response,
        prompt_len=len(prompt),
        id=record_id,
    )


def _tokenizer_fn(tokenizer: Any) -> Tokenize:
    def tokenize(texts: list[str]) -> list[list[int]]:
        return encode_plain(tokenizer, texts)

    return tokenize


class Coconut(Method):
    name = "coconut"
    tiny_config = "tiny-coconut.yaml"

    def coconut_stage(self, cfg: RunConfig, stage_index: int) -> int:
        return cfg.coconut.start_stage + stage_index - 1

    def latent_slots(self, cfg: RunConfig, stage_index: int) -> int:
        c = cfg.coconut
        return c.c_thought * min(self.coconut_stage(cfg, stage_index), c.max_latent_stage)

    def resolve(self, cfg: RunConfig) -> RunConfig:
        c = cfg.coconut
        if c.c_thought < 1:
            raise ConfigError(f"coconut.c_thought: {c.c_thought} must be >= 1")
        if c.max_latent_stage < 1:
            raise ConfigError(f"coconut.max_latent_stage: {c.max_latent_stage} must be >= 1")
        if c.start_stage < 0:
            raise ConfigError(f"coconut.start_stage: {c.start_stage} must be >= 0")
        if c.start_stage + len(cfg.stages) - 1 < 1:
            raise ConfigError(
                f"stages: {len(cfg.stages)} stage(s) from coconut.start_stage={c.start_stage} "
                "never reach a latent stage; add stages"
            )
        stages = []
        for i, st in enumerate(cfg.stages, 1):
            mode = "cot" if self.coconut_stage(cfg, i) == 0 else "hidden"
            stages.append(
                dataclasses.replace(
                    st, mode=mode, tau=0.0, max_sites=0, insert_prob=0.0, double_insert_prob=0.0
                )
            )
        return rewrite_stages(cfg, stages, "stage modes set from the Coconut curriculum")

    def extra_tokens(self, cfg: RunConfig) -> list[str]:
        return [BOT, EOT]

    def init_model(self, base, tokenizer, cfg: RunConfig, special_ids: dict[str, int]) -> None:
        """Marker rows copied from ``coconut.init_token`` (the original's ``"<<"``)."""
        for tok in (BOT, EOT):
            init_thinking_embedding(base, tokenizer, special_ids[tok], cfg.coconut.init_token)

    def check_data(self, cfg: RunConfig, train) -> None:
        longest = int(train.n_steps.max()) if len(train.n_steps) else 0
        if longest < cfg.coconut.max_latent_stage:
            raise ConfigError(
                f"coconut.max_latent_stage: {cfg.coconut.max_latent_stage} stages, but the longest example of "
                f"data.train={cfg.data.train!r} has {longest} reasoning step(s): stages past {longest} would "
                f"replace steps that do not exist; lower coconut.max_latent_stage"
            )

    def stage_examples(self, examples: Sequence[Encoded], ctx: StageContext) -> tuple[Examples, dict]:
        c, tok = ctx.cfg.coconut, ctx.tokenizer
        stage = self.coconut_stage(ctx.cfg, ctx.stage_index)
        tokenize = _tokenizer_fn(tok)
        examples = Examples.of(examples)

        def build(j: int, e: Encoded) -> Encoded:
            r = examples.record(j)
            return build_example(
                e.id,
                r.steps,
                r.answer,
                e.input_ids[: e.prompt_len],
                tokenize,
                stage=stage,
                c_thought=c.c_thought,
                max_latent_stage=c.max_latent_stage,
                pad_latent_to_max=c.pad_latent_to_max,
                bot_id=ctx.special_ids[BOT],
                eot_id=ctx.special_ids[EOT],
                latent_id=ctx.thinking_id,
                eos_id=tok.eos_token_id,
            )

        # latent slots per example: a function of its step count only (stage_layout)
        steps = examples.steps_counts()
        slots = {
            int(s): stage_layout(stage, int(s), c_thought=c.c_thought, max_latent_stage=c.max_latent_stage,
                                 pad_latent_to_max=c.pad_latent_to_max)[1]
            for s in np.unique(steps)
        }  # fmt: skip
        n = np.array([slots[int(s)] for s in steps], dtype=np.int64)
        return examples.map(build, n), {
            "latent_tokens": int(n.sum()),
            "latent_per_sample": float(n.sum()) / max(len(n), 1),
            "coconut_stage": stage,
        }

    def checkpoint_meta(
        self, cfg: RunConfig, stage_index: int, special_ids: dict[str, int]
    ) -> dict[str, Any]:
        c = cfg.coconut
        stage = self.coconut_stage(cfg, stage_index)
        _, n_latent = stage_layout(
            stage,
            c.max_latent_stage,
            c_thought=c.c_thought,
            max_latent_stage=c.max_latent_stage,
            pad_latent_to_max=True,
        )
        return {
            "method": self.name,
            "coconut": {
                "stage": stage,
                "n_latent": n_latent,
                "bot_id": special_ids[BOT],
                "eot_id": special_ids[EOT],
            },
        }

    def decoding(self, ckpt: Checkpoint, cfg: RunConfig | None = None) -> Decoding:
        info = ckpt.meta.get("coconut")
        if not info:
            raise ValueError(
                "--method coconut: the checkpoint has no coconut entry in ltscale_latent.json "
                "(it was not trained with method: coconut)"
            )
        lm = ckpt.lm
        forced = torch.tensor([lm.thinking_token_id] * int(info["n_latent"]) + [int(info["eot_id"])])
        return Decoding(
            model=lm,
            rule=Greedy(without_thinking=True, forced=forced),
            prompt_suffix=[int(info["bot_id"])],
            without_thinking=True,
            meta=info,
        )

    def stage_budget(self, raw: dict[str, Any], epochs: list[float]) -> dict[str, Any]:
        """Stage 0 (CoT) gets LT-Tuning's stage-1 epochs; the latent stages share the curriculum's
        latent epochs (stages 2 + 3) in the proportions of the config (docs/study.md)."""
        first, *latent = raw["stages"]
        total = sum(float(st.get("epochs", 1.0)) for st in latent)
        share = sum(epochs[1:])
        raw["stages"] = [{**first, "epochs": epochs[0]}] + [
            {**st, "epochs": share * float(st.get("epochs", 1.0)) / total} for st in latent
        ]
        return raw

    def from_cot_checkpoint(self, raw: dict[str, Any], root) -> dict[str, Any]:
        """The GSM8K recipe: Coconut stage 1 onwards from the CoT checkpoint (its stage 0 is CoT)."""
        raw["stages"] = raw["stages"][1:]
        raw["coconut"] = {**raw.get("coconut", {}), "start_stage": 1}
        return raw
