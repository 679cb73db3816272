"""Every YAML config the project ships loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "trial").glob("*.yaml"))


def test_trial_configs_exist():
    assert {p.name for p in CONFIGS} >= {"metadistil.yaml", "kd.yaml", "finetune.yaml", "finetune_teacher.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_trial_config_validates(path):
    cfg = load_config(path)
    assert cfg.algorithm in path.stem
    assert cfg.deepspeed.enabled
