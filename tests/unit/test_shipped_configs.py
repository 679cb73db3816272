"""Every YAML config the project ships loads and validates; the quick start's configs run on the data shipped in the
repository, and `make demo` runs what the README says it runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.spec import expand, load_spec
from trainer.config import load_config
from trainer.data import load_splits

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sst2-sample"
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
GLUE_SPECS = {"glue_cpu.yaml": ["cola", "mrpc", "rte", "stsb"],  # one teacher per task, no teacher sets of two
              "paper_glue.yaml": ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]}


SEARCH_SPECS = {"sst2_search_cpu.yaml"}  # one teacher set; its trials are confirm trials


@pytest.mark.parametrize("path", [p for p in SWEEPS if p.name not in {*CELL_SPECS, *GLUE_SPECS, *SEARCH_SPECS}],
                         ids=lambda p: p.name)
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


def test_demo_sweep_exercises_every_axis_on_the_shipped_sample(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = expand(*load_spec(ROOT / "configs" / "sweep" / "demo.yaml"))
    axes = {key: {t.axes[key] for t in plan.trials} for key in ("algorithm", "teacher_set", "warmup", "noise", "seed")}
    assert axes["algorithm"] == {"finetune", "kd", "metadistil"}
    assert len(axes["teacher_set"] - {None}) >= 2 and len(axes["warmup"]) >= 2 and len(axes["noise"]) >= 2
    assert plan.teacher_trials, "the demo fine-tunes its teachers"
    # the quick start's time: a small grid, one seed (README, Quick start: measured minutes on 2 CPUs)
    assert len(plan.trials) <= 8 and len(axes["seed"]) == 1
    for trial in [*plan.trials, *plan.teacher_trials.values()]:
        assert Path(trial.config.data.path).resolve() == SAMPLE, trial.id


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_trial_config_draws_its_splits_from_the_shipped_sample(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert Path(cfg.data.path).resolve() == SAMPLE
    sizes = load_splits(cfg.data, cfg.seed).sizes()
    assert sizes == {"train": cfg.data.train_size, "quiz": cfg.data.quiz_size, "validation": 436,
                     "test": cfg.data.test_size}


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^## Quick start\n(.*?)^## ", readme, re.DOTALL | re.MULTILINE)
    assert found, "README.md has no Quick start section"
    return found[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")
def test_make_demo_runs_the_sweep_the_readme_names():
    out = subprocess.run(["make", "--no-print-directory", "-n", "demo"], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sweeps = [line for line in out.stdout.splitlines() if " sweep " in line]
    assert len(sweeps) == 1 and sweeps[0].endswith("/metadistil sweep configs/sweep/demo.yaml"), out.stdout
    text = quick_start()
    assert "make demo" in text and "`metadistil sweep configs/sweep/demo.yaml`" in text
    # ./mlflow.db even where MLFLOW_TRACKING_URI names a server, as the README says; the UI command reads it back
    assert sweeps[0].startswith("env -u MLFLOW_TRACKING_URI ") and "sqlite:///mlflow.db" in out.stdout
    assert "sqlite:///mlflow.db" in text


@pytest.mark.parametrize("name, tasks", GLUE_SPECS.items())
def test_glue_sweeps_distil_each_task_from_its_own_teacher(name, tasks, monkeypatch, capsys):
    from launcher.cli import main

    monkeypatch.chdir(ROOT)
    plan = expand(*load_spec(ROOT / "configs" / "sweep" / name))
    teachers = {t.config.data.task: t for t in plan.teacher_trials.values()}
    assert list(teachers) == tasks and all(t.config.algorithm == "finetune" for t in teachers.values())
    cells = {(t.axes["algorithm"], t.axes["distill.hidden.beta"]) for t in plan.trials}
    assert {("finetune", 0), ("kd", 0), ("metadistil", 0), ("metadistil", 100)} <= cells
    assert ("finetune", 100) not in cells
    for trial in plan.trials:
        task = trial.config.data.task
        assert trial.axes["data.task"] == task
        assert [m.name for m in trial.config.teachers] == \
            ([] if trial.axes["algorithm"] == "finetune" else [f"{teachers[task].config.output.dir}/student"])
        hidden = trial.config.distill.hidden
        assert (hidden is not None and hidden.beta == 100) == (trial.axes["distill.hidden.beta"] == 100)
    seeds = {t.axes["seed"] for t in plan.trials}
    assert len(plan.trials) == len(tasks) * len(seeds) * len(cells) and len(seeds) == 3
    assert main(["sweep", str(ROOT / "configs" / "sweep" / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(tasks)} teacher fine-tuning trials, {len(plan.trials)} trials" in out
    assert " task " in out.splitlines()[len(tasks) + 1] and " beta" in out.splitlines()[len(tasks) + 1]


def test_the_search_sweep_searches_each_algorithm_and_confirms_on_five_seeds(monkeypatch, capsys):
    from launcher.cli import main

    monkeypatch.chdir(ROOT)
    path = ROOT / "configs" / "sweep" / "sst2_search_cpu.yaml"
    plan, grid = expand(*load_spec(path)), expand(*load_spec(ROOT / "configs" / "sweep" / "sst2_cpu.yaml"))
    cells = {c.id.partition("__")[0]: c for c in plan.search.cells}
    assert {k: sorted(c.space) for k, c in cells.items()} == {
        "finetune": ["optim.lr"], "kd": ["distill.alpha", "distill.temperature", "optim.lr"],
        "metadistil": ["metadistil.pilot_lr", "metadistil.teacher_lr", "optim.lr"]}
    assert all(len(c.trials) == 10 and [t.config.seed for t in c.confirm] == [1, 2, 3, 4, 5] for c in cells.values())
    assert all(t.config.optim.max_steps == 80 for t in [*plan.search.trials, *plan.trials])
    # sst2_cpu's data and teacher: the same fine-tuned teacher (cache folder) serves both sweeps
    assert plan.teacher_trials["teacher__minilm"].config.output.dir == \
        grid.teacher_trials["teacher__minilm"].config.output.dir
    assert plan.trials[0].config.data == grid.trials[0].config.data
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("search then confirm: 30 search trials + 15 confirm trials (their searched values chosen by search) = 45 "
            "trials") in out
    assert "scheduler asha per cell (grace_period 1, reduction_factor 3)" in out
