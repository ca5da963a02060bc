"""Every compared method in one engine, selected by the config key ``method:``.

A method differs from the others only in (a) how a stage's training sequences are built (where the
latent slots are, which labels are masked), (b) which latent function fills the slots (the
``LatentLM`` mode of each stage), (c) extra tokens / modules it needs, and (d) how it decodes. The
trainer, the KV-cached rollout, the DeepSpeed engine and the evaluator are shared: a method never
adds engine code. One file per method; this module is the registry and the interface.

Why methods may rewrite the config (``resolve``): "one switch" means ``method=pause`` on any
LT-Tuning config gives the pause ablation. The rewrite is idempotent, logged, and the rewritten
config is what the run dir's ``config.resolved.yaml`` records.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltscale.config import ConfigError, RunConfig

if TYPE_CHECKING:
    import torch

    from ltscale.data import Encoded, Record

log = logging.getLogger(__name__)

# name -> "module:Class"; modules are imported on first use (SoftCoT pulls in more than the rest).
REGISTRY: dict[str, str] = {
    "lt_tuning": "ltscale.methods.lt_tuning:LTTuning",
    "cot": "ltscale.methods.cot:CoT",
    "pause": "ltscale.methods.pause:Pause",
    "no_stage3": "ltscale.methods.no_stage3:NoStage3",
    "adapter": "ltscale.methods.adapter:Adapter",
    "coconut": "ltscale.methods.coconut:Coconut",
    "soft_thinking": "ltscale.methods.soft_thinking:SoftThinking",
    "softcot": "ltscale.methods.softcot:SoftCoT",
}
METHOD_NAMES = tuple(REGISTRY)
METHOD_META_KEY = "method"
LATENT_CONFIG_FILE = "ltscale_latent.json"  # = ltscale.model.io.LATENT_CONFIG_FILE (no model import here)


@dataclass
class StageContext:
    """What a method needs to build one stage's training sequences."""

    cfg: RunConfig
    stage_index: int  # 1-based
    stage_dir: Path
    tokenizer: Any
    thinking_id: int
    special_ids: dict[str, int]
    records_by_id: dict[str, Record]
    compute_sites: Callable[[], list[list[int]]]  # LT-Tuning's distributed confidence pass
    is_main: bool
    barrier: Callable[[], None]
    model: Any = None  # the module inside the engine (SoftCoT fills its thought cache)


@dataclass
class Inference:
    """How a checkpoint decodes under a method: the object ``evaluate`` calls ``generate`` on,
    the prompt builder and whether ``<thinking>`` is masked in free decoding."""

    model: Any
    prompt_fn: Callable[[Any, str], list[int]] | None = None
    without_thinking: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


class Method:
    """Defaults = explicit decoding of whatever the stage trained; subclasses override pieces."""

    name = "base"
    #: LT-Tuning's confidence-driven <thinking> insertion (the config's tau/max_sites rules apply).
    confidence_insertion = False

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

    def check_data(self, cfg: RunConfig, records: Sequence[Record]) -> None:
        """Data-dependent config errors, raised before the engine is built."""

    def stage_examples(self, examples: Sequence[Encoded], ctx: StageContext) -> tuple[list[Encoded], dict]:
        return list(examples), {"latent_tokens": 0}

    def checkpoint_meta(
        self, cfg: RunConfig, stage_index: int, special_ids: dict[str, int]
    ) -> dict[str, Any]:
        """Extra keys saved in the stage's ``ltscale_latent.json`` (what inference needs).

        None for LT-Tuning and its ablations: they decode as the checkpoint's latent mode says, and
        a checkpoint without a ``method`` key is an LT-Tuning one (older runs, ``ltscale export``).
        """
        return {}

    def inference(
        self,
        lm: Any,
        tokenizer: Any,
        meta: dict[str, Any],
        cfg: RunConfig | None = None,
        *,
        chat: bool | None = None,
    ) -> Inference:
        """``cfg``: the run's config when the trainer evaluates (else the checkpoint's meta decides);
        ``chat``: use the tokenizer's chat template (None = auto)."""
        return Inference(model=lm)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ConfigError naming the key."""
    if name not in REGISTRY:
        raise ConfigError(f"method: {name!r} is not one of {', '.join(METHOD_NAMES)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def resolve_method(cfg: RunConfig) -> RunConfig:
    return get_method(cfg.method).resolve(cfg)


def read_meta(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / LATENT_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def inference_for(
    lm: Any,
    tokenizer: Any,
    hf_dir: str | Path,
    *,
    method: str | None = None,
    cfg: RunConfig | None = None,
    chat: bool | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> Inference:
    """Decoding for a checkpoint: its own method (saved in ``ltscale_latent.json``) unless ``method``
    overrides it (Soft-Thinking runs on any checkpoint)."""
    meta = read_meta(hf_dir)
    source = meta.get("source") or {}
    if METHOD_META_KEY not in meta and source.get("checkpoint"):
        # an `ltscale export` of stageN/ckpt/<tag>: the method entries live in that stage's own export
        for key, value in read_meta(Path(source["checkpoint"]).parent.parent / "hf").items():
            meta.setdefault(key, value)
    meta["_dir"] = str(hf_dir)  # where a method finds its extra weights (SoftCoT's projection)
    for section, values in (options or {}).items():  # e.g. {"soft_thinking": {"top_k": 5}} from the CLI
        meta[section] = {**meta.get(section, {}), **values}
    name = method or meta.get(METHOD_META_KEY) or "lt_tuning"
    if cfg is not None:
        chat = cfg.model.use_chat_template
    return get_method(name).inference(lm, tokenizer, meta, cfg, chat=chat)


__all__ = [
    "METHOD_NAMES",
    "REGISTRY",
    "Inference",
    "Method",
    "StageContext",
    "get_method",
    "inference_for",
    "read_meta",
    "resolve_method",
]
