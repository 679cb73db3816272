"""YAML files read strictly: PyYAML keeps the last of two equal keys in a mapping without a word, so a spec or trial
config that sets a key twice would run with whichever came last; here a repeated key is an error naming its dotted
path and lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (merged ``<<`` keys may still be overridden)."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the whole composed document first, where the dotted path of every key is still known.
        _refuse_repeated_keys(self, node, "", set())
        return super().construct_document(node)


def _refuse_repeated_keys(loader: StrictLoader, node: yaml.Node, where: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: checked where its anchor was (and a recursive anchor would never end)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(loader, item, _join(where, i), seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                _refuse_repeated_keys(loader, value_node, where, seen)
                continue
            if isinstance(key_node, yaml.ScalarNode):
                # compared as constructed, as the mapping will be: 1 and 1.0, or 1 and true, are the same key
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKeyError(f"{_join(where, key)}: key given twice (lines {first_line[key]} and "
                                            f"{line}); YAML would silently keep only the last value")
                first_line[key] = line
                _refuse_repeated_keys(loader, value_node, _join(where, key), seen)
            else:
                _refuse_repeated_keys(loader, value_node, where, seen)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def read_yaml(path: Path) -> Any:
    """The YAML file's data; a file that is not UTF-8, a syntax error or a repeated key is a one-line ConfigError
    naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          f"save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from None
