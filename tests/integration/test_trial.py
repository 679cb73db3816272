"""Whole trials on tiny local models and the generated sentiment set: every algorithm learns."""

from __future__ import annotations

import json

import pytest

from trainer.config import parse_config
from trainer.loop import run_trial


def trial(tmp_path, **sections):
    raw = {
        "seed": 0,
        "data": {"name": "synthetic", "train_size": 600, "quiz_size": 40, "validation_size": 200, "test_size": 200,
                 "max_length": 32},
        "optim": {"lr": 3e-3, "batch_size": 16, "epochs": 10, "max_steps": 200},
        "eval": {"every_steps": 50},
        "deepspeed": {"enabled": False},
        "output": {"dir": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw)


@pytest.fixture(scope="session")
def trained_teacher(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = trial(out, algorithm="finetune", student={"name": model_dirs["bert"]})
    result = run_trial(cfg, progress=False)
    assert result.metrics["best_val_accuracy"] > 0.9
    return str(result.output_dir / "student")


@pytest.mark.parametrize("algorithm", ["finetune", "kd", "metadistil"])
def test_each_algorithm_learns(tmp_path, model_dirs, trained_teacher, algorithm):
    teachers = [] if algorithm == "finetune" else [{"name": trained_teacher}]
    cfg = trial(tmp_path, algorithm=algorithm, student={"name": model_dirs["distilbert"]}, teachers=teachers,
                metadistil={"pilot_lr": 1e-2, "teacher_lr": 1e-4, "quiz_batch_size": 8})
    result = run_trial(cfg, progress=False)
    assert result.metrics["best_val_accuracy"] > 0.8, result.metrics
    saved = json.loads((result.output_dir / "metrics.json").read_text())
    assert saved["test_accuracy"] == result.metrics["test_accuracy"]
    assert (result.output_dir / "student" / "model.safetensors").is_file()
