"""Every compared method in one engine, selected by the config key ``method:``.

A method differs from the others only in (a) how a stage's training sequences are built (where the
latent slots are, which labels are masked), (b) which latent function fills the slots (the
``LatentLM`` mode of each stage), (c) extra tokens / modules it needs, (d) how it decodes, and
(e) how ``ltscale compare`` runs it. The trainer, the KV-cached rollout, the DeepSpeed engine, the
decode loop and the evaluator are shared: a method never adds engine code, and the trainer and
``compare`` know methods only through the hooks of :class:`Method`. One file per method; this
module is the registry and the interface.

Why methods may rewrite the config (``resolve``): "one switch" means ``method=pause`` on any
LT-Tuning config gives the pause ablation. The rewrite is idempotent, logged, and the rewritten
config is what the run dir's ``config.resolved.yaml`` records.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltscale import rundir
from ltscale.config import ConfigError, RunConfig, validate

if TYPE_CHECKING:
    import torch

    from ltscale.data import Encoded, Examples, TrainSet
    from ltscale.model.generation import DecodeRule

log = logging.getLogger(__name__)

# name -> "module:Class"; modules are imported on first use (SoftCoT pulls in more than the rest).
REGISTRY: dict[str, str] = {
    "lt_tuning": "ltscale.methods.lt_tuning:LTTuning",
    "cot": "ltscale.methods.cot:CoT",
    "cot_same_steps": "ltscale.methods.cot_same_steps:CoTSameSteps",
    "pause": "ltscale.methods.pause:Pause",
    "no_stage3": "ltscale.methods.no_stage3:NoStage3",
    "adapter": "ltscale.methods.adapter:Adapter",
    "coconut": "ltscale.methods.coconut:Coconut",
    "soft_thinking": "ltscale.methods.soft_thinking:SoftThinking",
    "softcot": "ltscale.methods.softcot:SoftCoT",
}
METHOD_NAMES = tuple(REGISTRY)

Collective = Callable[[object], list]


@dataclass
class StageContext:
    """What a method needs to build one stage's training sequences."""

    cfg: RunConfig
    stage_index: int  # 1-based
    run_dir: Path
    tokenizer: Any
    thinking_id: int
    special_ids: dict[str, int]
    #: ``(input_ids, attention_mask) -> logits`` of the current weights, a plain causal forward in
    #: eval mode (LT-Tuning's confidence scoring); under ZeRO-3 every rank must call it equally often.
    forward_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rank: int
    world_size: int
    all_gather: Collective
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stage_dir(self) -> Path:
        return rundir.stage_dir(self.run_dir, self.stage_index)


@dataclass
class Checkpoint:
    """A checkpoint loaded for decoding: what a method builds its decoding from."""

    lm: Any  # the LatentLM rebuilt from the HF dir
    tokenizer: Any
    meta: dict[str, Any]  # its latent meta (rundir.inference_meta), command-line options merged in
    path: Path | None = None  # the HF dir (extra weights of the method live there)


@dataclass
class Decoding:
    """How a checkpoint decodes under a method."""

    model: Any  # the module decoded: the checkpoint's LatentLM or the method's module around its base
    rule: DecodeRule | None = None  # None: greedy latent decoding (``generation.Greedy``)
    prompt_suffix: list[int] = field(default_factory=list)  # ids after every prompt (Coconut's <bot>)
    without_thinking: bool = False  # free decoding never chooses <thinking>
    meta: dict[str, Any] = field(default_factory=dict)  # the method's decoding settings, for results


class Method:
    """Defaults = explicit decoding of whatever the stage trained; subclasses override pieces."""

    name = "base"
    #: LT-Tuning's confidence-driven <thinking> insertion (the config's tau/max_sites rules apply).
    confidence_insertion = False
    #: ``configs/`` file of the method's run on the tiny default (``ltscale compare``).
    tiny_config = "tiny.yaml"
    #: False: the method decodes a trained checkpoint as it is (``ltscale compare`` trains nothing).
    trains = True

    def resolve(self, cfg: RunConfig) -> RunConfig:
        """Rewrite/validate the config for this method (idempotent); raise ConfigError naming keys."""
        return cfg

    def extra_tokens(self, cfg: RunConfig) -> list[str]:
        """Tokens added to the tokenizer after ``<thinking>`` (e.g. Coconut's markers)."""
        return []

    def init_model(
        self, base: torch.nn.Module, tokenizer: Any, cfg: RunConfig, special_ids: dict[str, int]
    ) -> None:
        """Initialise rows of the extra tokens on a fresh base model."""

    def wrap_model(self, lm: Any, cfg: RunConfig, data: Any) -> Any:
        """The module the engine trains (SoftCoT: base frozen + projection)."""
        return lm

    def latent_slots(self, cfg: RunConfig, stage_index: int) -> int:
        """The most ``<thinking>`` slots one training row of stage ``stage_index`` (1-based) can hold
        (``ltscale plan`` sizes passes and memory by it): confidence insertion places at most
        ``max_sites`` sites, each at most doubled."""
        return 2 * cfg.stages[stage_index - 1].max_sites

    def check_data(self, cfg: RunConfig, train: TrainSet) -> None:
        """Data-dependent config errors, raised before the engine is built. ``train`` is the
        memory-mapped training set: read its per-example arrays (``n_steps``, ``lengths``), not
        every example."""

    def stage_examples(self, examples: Sequence[Encoded], ctx: StageContext) -> tuple[Examples, dict]:
        """The stage's training sequences: ``examples`` (the ones its sampler draws, an
        :class:`~ltscale.data.Examples` over the run's training set) rewritten lazily with
        ``Examples.map``, which also records each sequence's latent slots; and stats for the log."""
        from ltscale.data import Examples

        return Examples.of(examples), {"latent_tokens": 0}

    def prepare_stage(self, module: Any, examples: Sequence[Encoded], ctx: StageContext) -> None:
        """Fit the trained module (``wrap_model``'s) to the stage's sequences before its first step
        (SoftCoT: the assistant's thoughts of their prompts); every rank calls it."""

    def checkpoint_meta(
        self, cfg: RunConfig, stage_index: int, special_ids: dict[str, int]
    ) -> dict[str, Any]:
        """Extra keys saved in the stage's latent meta (what decoding needs).

        None for LT-Tuning and its ablations: they decode as the checkpoint's latent mode says, and
        a checkpoint without a ``method`` key is an LT-Tuning one (``ltscale export`` writes none).
        """
        return {}

    def decoding(self, ckpt: Checkpoint, cfg: RunConfig | None = None) -> Decoding:
        """``cfg``: the run's config when the trainer or ``compare`` evaluates (else the checkpoint's
        meta decides the method's settings)."""
        return Decoding(model=ckpt.lm)

    def from_cot_checkpoint(self, raw: dict[str, Any], root: Path) -> dict[str, Any]:
        """The method's raw ``tiny_config`` as a fine-tuning of the CoT-SFT checkpoint (``ltscale
        compare``): its latent stages only, since that checkpoint is LT-Tuning's stage 1. Relative
        paths in ``raw`` are relative to the repository ``root``."""
        raw["stages"] = [st for st in raw["stages"] if st.get("mode") != "cot"]
        return raw

    def stage_budget(self, raw: dict[str, Any], epochs: list[float]) -> dict[str, Any]:
        """The method's raw ``tiny_config`` with the training budget ``epochs`` = LT-Tuning's
        (stage 1, stage 2, stage 3) epochs (``ltscale compare --stage-epochs``, docs/study.md).

        Default: the config's stages are LT-Tuning's first ones (CoT = stage 1; the ablations and
        cot_same_steps keep the curriculum's layout), so stage ``i`` gets ``epochs[i]``."""
        stages = raw.get("stages") or []
        if len(stages) > len(epochs):
            raise ConfigError(
                f"--stage-epochs: {len(epochs)} value(s) for the {len(stages)} stages of {self.tiny_config}"
            )
        raw["stages"] = [{**st, "epochs": e} for st, e in zip(stages, epochs)]
        return raw


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ConfigError naming the key."""
    if name not in REGISTRY:
        raise ConfigError(f"method: {name!r} is not one of {', '.join(METHOD_NAMES)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def resolve_method(cfg: RunConfig) -> RunConfig:
    """``cfg`` rewritten by its method, then checked by the cross-field rules that depend on it."""
    method = get_method(cfg.method)
    cfg = method.resolve(cfg)
    validate(cfg, confidence_insertion=method.confidence_insertion)
    return cfg


__all__ = [
    "METHOD_NAMES",
    "REGISTRY",
    "Checkpoint",
    "Decoding",
    "Method",
    "StageContext",
    "get_method",
    "resolve_method",
]
