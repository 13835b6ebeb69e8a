"""Config helpers: `key=value` overrides on ml_collections ConfigDicts, with clear errors."""
from __future__ import annotations

import ast

import ml_collections


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as `adamw`


def _coerce(key: str, old, new):
    """Converts `new` to the type of the existing value `old` where that is lossless."""
    if old is None or new is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        if isinstance(new, str) and new.lower() in ("true", "false"):
            return new.lower() == "true"
        raise ValueError(f"config key {key!r} expects true/false, got {new!r}")
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return type(old)(new)
    if isinstance(old, str) and not isinstance(new, str):
        return str(new)
    if type(old) is not type(new):
        raise ValueError(
            f"config key {key!r} expects {type(old).__name__} (current value {old!r}), got {new!r}")
    return new


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `a.b=value` strings to `cfg` in place. Unknown keys raise KeyError naming them."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like key=value (e.g. train.steps=100)")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node, path = cfg, []
        for part in parents:
            path.append(part)
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise KeyError(_unknown(cfg, ".".join(path)))
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(_unknown(cfg, key.strip()))
        value = _parse_value(text.strip())
        with node.ignore_type():
            node[leaf] = _coerce(key, node[leaf], value)
    return cfg


def _unknown(cfg, key: str) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node = cfg
    for part in parent.split(".") if parent else []:
        node = node.get(part, {}) if isinstance(node, ml_collections.ConfigDict) else {}
    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    where = f" under {parent!r}" if parent else ""
    return f"unknown config key {key!r}; known keys{where}: {', '.join(known)}"
