"""Every YAML config the project ships loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.spec import expand, load_spec
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "trial").glob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))


def test_trial_configs_exist():
    assert {p.name for p in CONFIGS} >= {"metadistil.yaml", "kd.yaml", "finetune.yaml", "finetune_teacher.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_trial_config_validates(path):
    cfg = load_config(path)
    assert cfg.algorithm in path.stem
    assert cfg.deepspeed.enabled


def test_sweep_configs_exist():
    assert {p.name for p in SWEEPS} >= {"demo.yaml", "sst2_cpu.yaml", "paper_table1.yaml"}


CELL_SPECS = {"sst2_cpu_metadistil.yaml": "sst2_cpu.yaml"}  # one cell of a grid, to rerun it alone


@pytest.mark.parametrize("path", [p for p in SWEEPS if p.name not in CELL_SPECS], ids=lambda p: p.name)
def test_sweep_config_expands(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths inside configs are relative to the repository root, where users run them
    plan = expand(*load_spec(path))
    assert plan.trials and {t.axes["algorithm"] for t in plan.trials} == {"finetune", "kd", "metadistil"}
    assert any(len(t.teachers) == 2 for t in plan.trials)


@pytest.mark.parametrize("cell, grid", CELL_SPECS.items())
def test_a_cell_spec_runs_exactly_its_cell_of_the_grid(cell, grid, monkeypatch):
    """Its trials are the grid's trials of that cell (same configs but for the sweep's folder) and its teachers hit
    the grid's teacher cache, so its results stand beside the grid's."""
    monkeypatch.chdir(ROOT)
    part, whole = (expand(*load_spec(ROOT / "configs" / "sweep" / name)) for name in (cell, grid))
    by_id = {t.id: t for t in whole.trials}
    assert part.trials and all(t.id in by_id for t in part.trials)
    for trial in part.trials:
        ours, theirs = trial.config.model_dump(), by_id[trial.id].config.model_dump()
        assert ours.pop("output") != theirs.pop("output")  # the folder names the sweep
        assert ours == theirs, trial.id
    assert {n: t.config.output.dir for n, t in part.teacher_trials.items()} == \
        {n: whole.teacher_trials[n].config.output.dir for n in part.teacher_trials}


def test_demo_sweep_exercises_every_axis(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = expand(*load_spec(ROOT / "configs" / "sweep" / "demo.yaml"))
    axes = {key: {t.axes[key] for t in plan.trials} for key in ("teacher_set", "student", "warmup", "noise")}
    assert len(axes["teacher_set"] - {None}) >= 2 and len(axes["student"]) >= 2
    assert len(axes["warmup"]) >= 2 and len(axes["noise"]) >= 2
    assert plan.teacher_trials, "the demo fine-tunes its teachers"
