"""A planned trial of a sweep and the pieces every planner (grid, teachers, search) builds trials with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, TrialConfig, parse_config
from trainer.distributed import check_workers


@dataclass
class Trial:
    id: str
    axes: dict[str, Any]
    config: TrialConfig
    teachers: list[str] = field(default_factory=list)
    workers: int = 1
    phase: str | None = None  # "search" or "confirm" in a sweep with a search section


def token_cache_dir(storage_path: str | Path) -> str:
    """One folder per storage path: token ids depend only on the tokenizer and the texts, so sweeps share it."""
    return str(Path(storage_path) / "tokenized")


def absolute(value: str, must_exist: bool = True) -> str:
    """An existing local path (or, with must_exist=False, any non-URI path) made absolute; anything else as is."""
    if "://" in value or value.startswith("package:") or (must_exist and not Path(value).exists()):
        return value
    return str(Path(value).resolve())


def check_trial_workers(cfg: TrialConfig, workers: int, where: str) -> None:
    try:
        check_workers(cfg, workers)
    except ConfigError as err:
        raise ConfigError(f"trial {where} {err}") from None


def validated(raw: dict[str, Any], where: str) -> TrialConfig:
    try:
        return parse_config(raw)
    except ConfigError as err:
        raise ConfigError(f"trial {where}: {err}") from None
