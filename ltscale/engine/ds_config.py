"""DeepSpeed config rendering: templates hold engine knobs, the run config owns the numbers.

Why: raw DeepSpeed does not resolve ``"auto"`` (its pydantic sub-configs silently drop such
entries and fall back to defaults, and top-level batch keys then fail deep inside DeepSpeed's
batch assertions). HF Trainer resolves them from its own arguments; ltscale does the same here,
from the run config, so the batch size, accumulation, clipping and precision exist in exactly
one place (the ltscale YAML) and the JSON templates in ``ds_configs/`` only carry ZeRO knobs.

Rules (mirroring ``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig``):

* ``"auto"`` values of the managed keys are filled from the arguments;
* explicit (non-auto) values of managed keys must agree with the arguments, else ``ValueError``
  naming the key (silently preferring one of two disagreeing sources hides mistakes);
* ``train_batch_size == train_micro_batch_size_per_gpu * gradient_accumulation_steps * world``;
* any ``"auto"`` left after resolution is an error listing its dotted key;
* keys starting with ``_`` (``_comment``) are documentation and are stripped.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "TEMPLATE_NAMES",
    "render_ds_config",
    "resolve_template",
    "load_template",
    "write_ds_config",
    "template_search_dirs",
    "zero_stage",
    "resolve_precision",
]

AUTO = "auto"
TEMPLATE_NAMES = ("zero2", "zero3", "zero3_offload")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def template_search_dirs() -> list[Path]:
    """Where named templates are looked up, in order.

    1. ``<repo>/ds_configs`` (a source checkout or an editable install: this file lives in
       ``<repo>/ltscale/engine/``), 2. ``$LTSCALE_DS_CONFIGS`` if set, 3. ``<prefix>/share/ltscale/ds_configs``
       (where a wheel's data-files land). No copy of the JSON is kept inside the package.
    """
    dirs = [Path(__file__).resolve().parents[2] / "ds_configs"]
    env = os.environ.get("LTSCALE_DS_CONFIGS")
    if env:
        dirs.insert(0, Path(env))
    dirs.append(Path(sys.prefix) / "share" / "ltscale" / "ds_configs")
    return dirs


def resolve_template(name_or_path: str | Path) -> Path:
    """``"zero3"`` -> ``ds_configs/zero3.json``; an existing path is returned as is."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    name = str(name_or_path)
    stem = name[: -len(".json")] if name.endswith(".json") else name
    if "/" not in stem and os.sep not in stem:
        for d in template_search_dirs():
            cand = d / f"{stem}.json"
            if cand.is_file():
                return cand
    searched = ", ".join(str(d) for d in template_search_dirs())
    raise FileNotFoundError(
        f"DeepSpeed config template {name_or_path!r} not found: not a file, and not one of "
        f"{list(TEMPLATE_NAMES)} in [{searched}]"
    )


def load_template(template: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the template dict (never mutates the caller's dict)."""
    if isinstance(template, dict):
        return copy.deepcopy(template)
    path = resolve_template(template)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON in DeepSpeed config template: {e.msg}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: DeepSpeed config template must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _strip_comments(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: _strip_comments(v) for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))
        }
    if isinstance(obj, list):
        return [_strip_comments(v) for v in obj]
    return obj


def _apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Deep-merge ``overrides`` into ``cfg``; dotted keys (``"zero_optimization.stage"``) are allowed."""
    for key, value in overrides.items():
        parts = key.split(".") if isinstance(key, str) else [key]
        node = cfg
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ValueError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is {nxt!r}, not a section")
            node = nxt
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _apply_overrides(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)


def _find_autos(obj: Any, prefix: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _find_autos(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _find_autos(v, f"{prefix}[{i}]")
    elif obj == AUTO:
        found.append(prefix)
    return found


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> bf16 on a CUDA device that supports it, fp32 otherwise (CPU runs are fp32,
    including ``DS_ACCELERATOR=cpu`` on a machine that has a GPU): the rule of
    :func:`ltscale.model.device.resolve_precision`, which also ties it to ``model.dtype``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    from ltscale.model.device import auto_is_bf16

    return "bf16" if auto_is_bf16() else "fp32"


def _fill(cfg: dict[str, Any], key: str, value: Any, source: str, where: str) -> None:
    """Set an auto key, or check that an explicit one agrees with the run config."""
    cur = cfg.get(key, AUTO)
    if cur == AUTO:
        cfg[key] = value
        return
    if isinstance(value, bool) or isinstance(cur, bool):
        same = bool(cur) == bool(value)
    elif isinstance(value, (int, float)) and isinstance(cur, (int, float)):
        same = float(cur) == float(value)
    else:
        same = cur == value
    if not same:
        raise ValueError(
            f"DeepSpeed config key {where}{key!r} = {cur!r} conflicts with {source} = {value!r}; "
            f'set it to "auto" in the template (ltscale fills it) or make them agree'
        )


def render_ds_config(
    template: str | Path | dict[str, Any],
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete DeepSpeed config dict for this run (see the module docstring for the rules).

    ``overrides`` are merged before resolution, so a test can e.g. pass
    ``{"zero_optimization.stage3_param_persistence_threshold": 0}``.
    """
    for name, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if grad_clip is None or float(grad_clip) < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip!r}")
    prec = resolve_precision(precision)

    cfg = _strip_comments(load_template(template))
    if overrides:
        _apply_overrides(cfg, overrides)

    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch, "micro_batch", "")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, "grad_accum", "")
    # train_batch_size: fill if auto/missing, then check the arithmetic below (explicit values allowed).
    if cfg.get("train_batch_size", AUTO) == AUTO:
        cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    _fill(cfg, "gradient_clipping", float(grad_clip), "grad_clip", "")

    for section, on in (("bf16", prec == "bf16"), ("fp16", prec == "fp16")):
        sec = cfg.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ValueError(f"DeepSpeed config key {section!r} must be an object, got {sec!r}")
        _fill(sec, "enabled", on, f"precision={precision!r} (resolved {prec!r})", f"{section}.")

    tbs, mbs, gas = (
        cfg[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (tbs, mbs, gas)):
        raise ValueError(
            "DeepSpeed config keys 'train_batch_size', 'train_micro_batch_size_per_gpu', "
            f"'gradient_accumulation_steps' must be ints, got {tbs!r}, {mbs!r}, {gas!r}"
        )
    if tbs != mbs * gas * world_size:
        raise ValueError(
            f"DeepSpeed config batch arithmetic: 'train_batch_size' = {tbs} != "
            f"'train_micro_batch_size_per_gpu' ({mbs}) x 'gradient_accumulation_steps' ({gas}) "
            f"x world_size ({world_size}) = {mbs * gas * world_size}"
        )

    left = _find_autos(cfg)
    if left:
        raise ValueError(
            f'DeepSpeed config still has "auto" at {left}: ltscale only fills batch size, '
            "accumulation, gradient_clipping and bf16/fp16.enabled; give explicit values for the rest"
        )
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    """ZeRO stage of a rendered config (0 when there is no ``zero_optimization`` section)."""
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def write_ds_config(cfg: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved config (JSON, atomically) so a run dir records exactly what ran."""
    from .checkpoint import write_json_atomic

    return write_json_atomic(path, cfg)
