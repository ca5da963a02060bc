"""Typed dataclasses from YAML: the one way every config, override and saved config is parsed.

Generic (it knows no ltscale key): YAML 1.2 booleans, a dataclass tree built from a nested dict
with each scalar's type checked, and dotted ``key=value`` overrides that address list items by
index (``stages.2.alpha``). Every error is a :class:`ConfigError` whose message starts with the
dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted key that caused it."""


class _Yaml12Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans: only true/false.

    Why: knobs such as ``engine.fused: on|off|auto`` are strings, and YAML 1.1 would silently
    turn on/off/yes/no into booleans; a bool field written as ``yes`` gets a clear error instead.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    """Parse config YAML (files, ``key=value`` overrides) the one way every entry point uses."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(inner, value, key)
    origin = typing.get_origin(inner)
    if origin is list:
        (elem,) = typing.get_args(inner)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, elem, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if inner is Any:
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {inner!r}")  # pragma: no cover - schema bug


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], where)
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, defaults: dict[str, Any]) -> None:
    """Apply one override to the raw dict; list items are addressed by index (``stages.2.alpha``)."""
    parts = dotted.split(".")
    node: Any = tree
    ref: Any = defaults
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(ref, list):
            if not part.isdigit() or int(part) >= len(ref):
                raise ConfigError(f"{where}: no such list index (have {len(ref)} items)")
            idx = int(part)
            if last:
                node[idx] = value
                return
            node, ref = node[idx], ref[idx]
            continue
        if not isinstance(ref, dict) or part not in ref:
            raise ConfigError(f"{where}: unknown key")
        if last:
            node[part] = value
            return
        if part not in node or node[part] is None:
            node[part] = (
                ref[part]
                if not isinstance(ref[part], (dict, list))
                else yaml.safe_load(yaml.safe_dump(ref[part]))
            )
        node, ref = node[part], ref[part]
