"""Typed run configuration: the schema, YAML + dotted ``key=value`` overrides -> ``RunConfig``.

Why dataclasses and not a free dict: a typo in a 40-key YAML must fail before a 3-stage job is
queued, with the dotted key in the message (``stages.2.alpha``), and the resolved config written
into the run dir must be exactly what ran. Unknown keys are errors, scalar types are checked, and
cross-field rules live in one ``validate()``.

This module is the schema only (``typed_yaml`` builds it from YAML), beneath everything: the method's
rewrite of a config (``ltscale.methods``) and the whole load (``ltscale.run_config.load_config``)
build on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ltscale import rundir
from ltscale.fsutil import atomic_write_text
from ltscale.precision import precision_names
from ltscale.typed_yaml import ConfigError, build_dataclass, parse_yaml, set_dotted

__all__ = ["LATENT_MODES", "ConfigError", "RunConfig", "build_config", "parse_yaml", "read_config", "validate"]

#: The latent input functions of ``LatentLM`` (``ltscale/model/latent_lm.py`` says what each does).
LATENT_MODES = ("cot", "hidden", "fusion", "pause")


@dataclass
class ModelConfig:
    # HF hub name or local HF dir; None means "build a random model from `init`" (the tiny default).
    name_or_path: str | None = None
    gguf_file: str | None = None
    # LlamaConfig kwargs for a randomly initialised model (used when name_or_path is None).
    init: dict[str, Any] = field(default_factory=dict)
    # Tokenizer source: None -> same as name_or_path; "sentencepiece" -> train one on the training text.
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 256
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 | fp64
    attn_implementation: str = "sdpa"
    thinking_token: str = "<thinking>"
    # docs/method.md §11.13: the new row is copied from this token's embedding (EOS when it is not one token).
    thinking_init_token: str = "emm"
    # Embedding rows are padded to a multiple of this when tokens are added (a 128,257-row head is
    # an unaligned GEMM); padded rows are never a token (model/builder.py fit_vocab).
    pad_vocab_to_multiple_of: int = 64
    adapter: bool = False
    adapter_hidden: int = 1024
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    use_chat_template: bool | None = None


@dataclass
class SyntheticConfig:
    n_train: int = 4000
    n_test: int = 200
    seed: int = 1234
    min_steps: int = 1
    max_steps: int = 5
    max_value: int = 99
    max_operand: int = 20


@dataclass
class DataConfig:
    # "synthetic", a local JSONL file/dir, or a hub dataset name ("openai/gsm8k:main").
    train: str = "synthetic"
    train_split: str | None = "train"
    eval: str = "synthetic"
    eval_split: str | None = "test"
    eval_limit: int | None = None
    train_limit: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_length: int = 512
    strict: bool = True


@dataclass
class StageConfig:
    """One curriculum stage. Defaults are the official code's (docs/method.md §3)."""

    mode: str = "cot"
    epochs: float = 1.0
    tau: float = 0.0
    max_sites: int = 0
    insert_prob: float = 0.0
    double_insert_prob: float = 0.0
    alpha: float = 0.6
    temperature: float = 1.0
    top_p: float = 0.9
    # Multiplies the LR schedule during this stage (1.0 = the official single schedule).
    lr_scale: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    # "continue": one optimizer and one LR schedule across all stages (the official code);
    # "reset": fresh optimizer state and schedule at every stage boundary (Coconut-style).
    stage_strategy: str = "continue"


@dataclass
class TrainConfig:
    micro_batch_size: int = 8  # with global_batch_size: the cap on one rank's micro-batch
    grad_accum: int = 1
    # Samples per optimizer step on any world size that divides it: micro-batch and accumulation
    # are derived per launch (ltscale/batching.py) and recorded in config.resolved.yaml.
    global_batch_size: int | None = None
    seed: int = 42
    log_every: int = 10
    save_every: int | None = None
    keep_last_n: int = 2
    max_steps_per_stage: int | None = None
    scoring_batch_size: int = 32
    # Steps with a non-finite loss/gradient on any rank are skipped (no weight change); after
    # this many in a run, training stops with a checkpoint and an error (docs/RELIABILITY.md).
    max_skipped_steps: int = 10


@dataclass
class EngineConfig:
    ds_config: str = "zero3"
    precision: str = "auto"
    fused: str = "auto"  # auto | on | off  (fused fusion op; the torch path is the reference)
    # auto: rollout passes run on their real tokens only when the model's attention allows it
    # (ltscale/model/packed.py); off: padded (B, W) passes, the path every HF decoder takes.
    packed_passes: str = "auto"
    # A collective waiting longer than this (a dead or hung rank) fails instead of hanging.
    collective_timeout_s: float = 600.0
    # Waits for file-system work (rank 0's export and analyses, checkpoint writes, hashes and
    # rotation) run outside the collectives above with this bound; null: sized to the model
    # (ltscale/engine/io_wait.py, docs/GPU.md).
    io_timeout_s: float | None = None


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_new_tokens: int = 128
    after_each_stage: bool = True
    # The eval after each stage uses only the first `subset` eval records (null: all of them);
    # `ltscale eval` on the exported checkpoint gives the full-set number.
    subset: int | None = None
    # The paper's analyses (ltscale/eval/analysis.py) on rank 0 after each stage's eval: numbers as
    # TensorBoard scalars (latent/...), PCA / difficulty / entropy-attention plots as images.
    analysis: bool = True
    analysis_samples: int = 16  # problems decoded one by one (with attention) for the curves and collapse
    probe_steps: int = 6  # forced latent steps of the collapse probe (0: off)


@dataclass
class CoconutConfig:
    """``method: coconut`` (docs/baselines.md §3): stage ``s`` replaces the first ``s`` steps by ``s*c_thought``
    continuous thoughts between begin/end markers; stages past ``max_latent_stage`` drop every step."""

    c_thought: int = 2
    max_latent_stage: int = 3
    # Coconut stage of the first configured stage: 0 = CoT with markers inside the run (ProsQA
    # recipe); 1 = the run starts from a CoT checkpoint (GSM8K recipe, model.name_or_path).
    start_stage: int = 0
    # Past max_latent_stage every sample gets max_latent_stage*c thoughts (the original's flag).
    pad_latent_to_max: bool = True
    # Marker rows are copied from this token (the original copies "<<"; EOS when not one token).
    init_token: str = "<<"


@dataclass
class SoftThinkingConfig:
    """Soft-Thinking decoding (docs/baselines.md §4), training-free; ``ltscale eval --method soft_thinking``."""

    temperature: float = 0.6
    top_k: int = 10
    top_p: float = 0.95
    # Cold Stop: after the entropy stays below the threshold for this many steps, decode explicitly.
    entropy_threshold: float = 0.01
    cold_stop_steps: int = 256
    # Soft mode also ends when the top-1 token is this one (our CoT format has no </think>).
    think_end: str | None = None


@dataclass
class SoftCoTConfig:
    """``method: softcot`` (docs/baselines.md §5): a frozen assistant's soft thoughts, projected."""

    # An HF dir / hub name sharing the main model's tokenizer, or a run-config YAML whose
    # model.init builds a random assistant over the main tokenizer (tests: configs/tiny-assistant.yaml).
    assistant: str | None = None
    n_thoughts: int = 4
    train_base: bool = False


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    method: str = "lt_tuning"
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    soft_thinking: SoftThinkingConfig = field(default_factory=SoftThinkingConfig)
    softcot: SoftCoTConfig = field(default_factory=SoftCoTConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: default_lt_stages())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # "auto": resume from the run dir's latest checkpoint when there is one; "never"; "must".
    resume: str = "auto"
    # A damaged latest checkpoint (checksum mismatch): true resumes from the newest intact older one.
    resume_fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_lt_stages() -> list[StageConfig]:
    """The official LT-Tuning schedule for 1B/3B (docs/method.md §3): CoT, hidden-state latents, fusion."""
    return [
        StageConfig(mode="cot", epochs=1),
        StageConfig(mode="hidden", epochs=2, tau=0.3, max_sites=6, insert_prob=0.85, double_insert_prob=0.15),
        StageConfig(mode="fusion", epochs=7, tau=0.2, max_sites=8, insert_prob=0.95, double_insert_prob=0.20,
                    alpha=0.6, temperature=1.0, top_p=0.9),
    ]


# ----------------------------------------------------------------------------- building from dicts


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML (or the built-in tiny default when ``path`` is None) + ``key=value`` overrides, checked
    against the schema only: ``ltscale.run_config.load_config`` is what a run uses."""
    if path is None:
        path = default_config_path()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return build_config(raw, overrides)


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """``raw`` + overrides as a ``RunConfig`` (types and keys checked; no cross-field rules)."""
    _check_removed(raw)
    # Overrides are applied to the merged (defaults + file) tree so that list items such as
    # stages.2.* exist even when the file does not spell them out.
    merged = build_dataclass(RunConfig, raw).to_dict()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        if key.strip() in _REMOVED:
            raise ConfigError(f"{key.strip()}: {_REMOVED[key.strip()]}")
        set_dotted(merged, key.strip(), parse_yaml(text), merged)
    return build_dataclass(RunConfig, merged)


# Keys that look like settings but are not, rejected with the reason (a bare "unknown key" would
# leave the user guessing).
_REMOVED = {
    "model.hidden_layer": "not a key: the latent input is always the last layer's post-norm hidden "
    "state; remove it",
}


def _check_removed(raw: dict[str, Any]) -> None:
    for dotted, why in _REMOVED.items():
        *parents, leaf = dotted.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            raise ConfigError(f"{dotted}: {why}")


def default_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def validate(cfg: RunConfig, *, confidence_insertion: bool) -> None:
    """Cross-field rules; each error names the key. ``confidence_insertion``: the method places
    ``<thinking>`` by LT-Tuning's confidence insertion, so its stage rules apply."""
    if not cfg.stages:
        raise ConfigError("stages: at least one stage is required")
    for i, st in enumerate(cfg.stages):
        k = f"stages.{i}"
        if st.mode not in LATENT_MODES:
            raise ConfigError(f"{k}.mode: {st.mode!r} is not one of {LATENT_MODES}")
        check_alpha(st.alpha, f"{k}.alpha")
        check_top_p(st.top_p, f"{k}.top_p")
        if st.temperature <= 0:
            raise ConfigError(f"{k}.temperature: must be > 0")
        if st.epochs <= 0:
            raise ConfigError(f"{k}.epochs: must be > 0")
        if st.lr_scale <= 0:
            raise ConfigError(f"{k}.lr_scale: must be > 0")
        for name in ("tau", "insert_prob", "double_insert_prob"):
            v = getattr(st, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{k}.{name}: {v} outside [0, 1]")
        if st.max_sites < 0:
            raise ConfigError(f"{k}.max_sites: must be >= 0")
        if st.mode != "cot" and confidence_insertion and (st.max_sites == 0 or st.insert_prob == 0 or st.tau == 0):
            raise ConfigError(f"{k}: a latent stage ({st.mode}) needs tau, max_sites and insert_prob > 0")
        if st.mode == "cot" and st.max_sites > 0:
            raise ConfigError(f"{k}.max_sites: a cot stage inserts no <thinking> tokens; set mode or max_sites=0")
    if confidence_insertion:
        _check_stage_order(cfg)
    _check_ranges(cfg)
    t = cfg.train
    if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * t.grad_accum):
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"micro_batch_size*grad_accum = {t.micro_batch_size * t.grad_accum}")
    if cfg.optim.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.schedule: {cfg.optim.schedule!r} not in cosine|linear|constant")
    if cfg.optim.stage_strategy not in ("continue", "reset"):
        raise ConfigError(f"optim.stage_strategy: {cfg.optim.stage_strategy!r} not in continue|reset")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError("optim.warmup_ratio: must be in [0, 1)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas: expected two numbers")
    if cfg.engine.fused not in ("auto", "on", "off"):
        raise ConfigError(f"engine.fused: {cfg.engine.fused!r} not in auto|on|off")
    if cfg.engine.packed_passes not in ("auto", "off"):
        raise ConfigError(f"engine.packed_passes: {cfg.engine.packed_passes!r} not in auto|off")
    if cfg.engine.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"engine.precision: {cfg.engine.precision!r} not in auto|fp32|bf16|fp16")
    if cfg.resume not in ("auto", "never", "must"):
        raise ConfigError(f"resume: {cfg.resume!r} not in auto|never|must")
    if t.max_skipped_steps < 0:
        raise ConfigError("train.max_skipped_steps: must be >= 0")
    if cfg.engine.collective_timeout_s <= 0:
        raise ConfigError("engine.collective_timeout_s: must be > 0")
    if cfg.engine.io_timeout_s is not None and cfg.engine.io_timeout_s <= 0:
        raise ConfigError("engine.io_timeout_s: must be > 0 (or null: sized to the model)")
    _check_precision(cfg)
    if cfg.model.name_or_path is None and not cfg.model.init:
        raise ConfigError("model.init: a model built from scratch (no model.name_or_path) needs init kwargs")
    if cfg.model.name_or_path is None and cfg.model.tokenizer is None:
        raise ConfigError("model.tokenizer: required when model.name_or_path is not set ('sentencepiece' trains one)")
    if cfg.model.adapter and cfg.model.adapter_hidden < 1:
        raise ConfigError("model.adapter_hidden: must be >= 1")
    from ltscale.model.families import KERNELS  # noqa: PLC0415 - the kernels the rollout computes exactly

    if cfg.model.attn_implementation not in KERNELS:
        raise ConfigError(f"model.attn_implementation: {cfg.model.attn_implementation!r} is not supported by the "
                          f"latent rollout (its 4D masks); use one of {', '.join(KERNELS)}")


def _check_precision(cfg: RunConfig) -> None:
    """``model.dtype`` and ``engine.precision`` must name one precision (the rule and its reasons:
    ``ltscale.precision.precision_names``); checked here, before a job is queued."""
    try:
        precision_names(cfg.model.dtype, cfg.engine.precision)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_alpha(alpha: float, key: str = "alpha") -> None:
    """The fusion weight of the hidden state: in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"{key}: {alpha} outside [0, 1]")


def check_top_p(top_p: float, key: str = "top_p") -> None:
    """A nucleus mass (the fusion's, Soft-Thinking's): in (0, 1]."""
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{key}: {top_p} outside (0, 1]")


# (dotted key, lowest allowed, allow equal): numeric keys with a simple bound; None values skip.
_LOWER_BOUNDS = (
    ("train.micro_batch_size", 1, True), ("train.grad_accum", 1, True), ("train.global_batch_size", 1, True),
    ("train.log_every", 1, True), ("train.save_every", 1, True), ("train.keep_last_n", 1, True),
    ("train.max_steps_per_stage", 1, True), ("train.scoring_batch_size", 1, True), ("optim.lr", 0, False),
    ("optim.eps", 0, False), ("optim.weight_decay", 0, True), ("optim.max_grad_norm", 0, True),
    ("data.max_length", 1, True), ("eval.batch_size", 1, True), ("eval.max_new_tokens", 1, True),
    ("eval.subset", 1, True), ("eval.analysis_samples", 1, True), ("eval.probe_steps", 0, True),
    ("model.tokenizer_vocab_size", 1, True), ("model.pad_vocab_to_multiple_of", 1, True),
)  # fmt: skip


def _check_ranges(cfg: RunConfig) -> None:
    for key, low, equal_ok in _LOWER_BOUNDS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and (value < low or (value == low and not equal_ok)):
            raise ConfigError(f"{key}: {value} must be {'>=' if equal_ok else '>'} {low}")
    for i, beta in enumerate(cfg.optim.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas.{i}: {beta} outside [0, 1)")


_MODE_ORDER = {"cot": 0, "hidden": 1, "fusion": 2}


def _check_stage_order(cfg: RunConfig) -> None:
    """LT-Tuning's curriculum only moves towards latents: cot -> hidden -> fusion (docs/method.md §3).

    A stage starts from the previous stage's weights and its <thinking> sites come from that
    model's confidence, so e.g. a cot stage after a fusion stage would train away what the
    latent stages taught. Methods without confidence insertion define their own stage modes.
    """
    prev = None
    for i, st in enumerate(cfg.stages):
        rank = _MODE_ORDER.get(st.mode)
        if rank is None:
            continue
        if prev is not None and rank < _MODE_ORDER[cfg.stages[prev].mode]:
            raise ConfigError(f"stages.{i}.mode: {st.mode!r} after stages.{prev}.mode {cfg.stages[prev].mode!r}; "
                              "the curriculum order is cot -> hidden -> fusion")
        prev = i


def diff_configs(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved-config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += diff_configs(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in diff_configs(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


def save_resolved(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the config that actually ran; a resumed run compares against it."""
    return atomic_write_text(Path(run_dir) / rundir.CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
