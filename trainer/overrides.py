"""Dotted ``KEY=VALUE`` overrides of a config mapping (``metadistil train CONFIG optim.lr=1e-4``, sweep specs and
their grids), before validation."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from trainer.errors import ConfigError
from trainer.strict_yaml import StrictLoader


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a copy of ``raw``.

    List items are addressed by index (``teachers.0.name=...``); a whole list can be given as YAML
    (``student.init_layers=[0,2]``).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid trial config: the top level must be a mapping, got {type(raw).__name__}")
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        # "teachers[0].name" (the form some error messages use) means the same as "teachers.0.name"
        key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
        parts = key.split(".")
        if not sep or not key or not all(parts):
            raise ConfigError(f"override {item!r}: expected dotted.key=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.load(text, Loader=StrictLoader) if text.strip() else ""
        except yaml.YAMLError as err:  # surfaced as a ConfigError naming the key, not a YAML traceback
            reason = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({reason})") from None
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, key, ".".join(parts[: depth + 1]), parts[depth + 1])
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key, ".".join(parts[:-1]))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:  # e.g. "seed.x=1": assigning into a scalar used to raise a bare TypeError
            raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is a value ({node!r}), not a section")
    return out


def _child(node: Any, part: str, key: str, path: str, next_part: str) -> Any:
    """Step into ``part`` of ``node`` for the override ``key``; ``path`` is the dotted path up to and with part."""
    parent = path.rpartition(".")[0]
    if isinstance(node, list):
        return node[_index(node, part, key, parent)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {key}: {parent} is a value ({node!r}), not a section")
    if part not in node or node[part] is None:
        if next_part.isdigit():
            # an index into a list that does not exist: creating {"0": ...} would fail later, far less clearly
            raise ConfigError(f"override {key}: {path} has no items to index; give the whole list as YAML, "
                              f"e.g. {path}=[{{name: ...}}]")
        node[part] = {}
    return node[part]


def _index(node: list, part: str, key: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        allowed = f"0..{len(node) - 1}" if node else "none, the list is empty"
        raise ConfigError(f"override {key}: {part!r} is not an index into {path} (allowed: {allowed})")
    return int(part)
