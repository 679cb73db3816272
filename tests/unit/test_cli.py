"""The command line: --version, dotted overrides of a sweep spec (in the plan and its config hash), -v and the
library settings a command runs with."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import launcher.cli
from launcher.cli import QUIET_ENV, main, parse_args
from launcher.spec import expand, load_spec

ROOT = Path(__file__).resolve().parents[2]
BASE = {"data": {"name": "synthetic", "train_size": 100, "quiz_size": 16, "validation_size": 20, "test_size": 20},
        "optim": {"max_steps": 10}, "metadistil": {"quiz_batch_size": 8}}
SPEC = {"name": "cli", "base": BASE,
        "teachers": {"bert": {"checkpoint": "bert-base-uncased", "label": "BERT"}},
        "teacher_sets": {"bert": ["bert"]},
        "students": {"distil": {"name": "distilbert-base-uncased"}},
        "grid": {"algorithm": ["finetune", "kd"], "seed": [1, 2]}}


def write(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_version_is_the_installed_packages():
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = subprocess.run([str(Path(sys.executable).parent / "metadistil"), "--version"], check=False,
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"metadistil {expected}\n", "")


def test_sweep_overrides_reach_the_spec_and_the_trials(tmp_path):
    storage = tmp_path / "elsewhere"
    spec, base = load_spec(write(tmp_path, SPEC), ["base.optim.max_steps=4", "grid.seed=[7]",
                                                   f"storage_path={storage}", "max_concurrent_trials=1"])
    assert (spec.grid.seed, spec.storage_path, spec.max_concurrent_trials) == ([7], str(storage), 1)
    plan = expand(spec, base)
    assert len(plan.trials) == 2 and {t.config.seed for t in plan.trials} == {7}
    assert {t.config.optim.max_steps for t in plan.trials} == {4}
    assert all(Path(t.config.output.dir).is_relative_to(storage) for t in plan.trials)


def test_an_override_is_an_edit_of_the_file_for_the_config_hash(tmp_path):
    """--resume compares config hashes: a sweep rerun with an override must see the change, exactly as if the
    spec file had been edited."""
    plain = expand(*load_spec(write(tmp_path, SPEC)))
    overridden = expand(*load_spec(write(tmp_path, SPEC), ["base.optim.max_steps=4"]))
    edited = expand(*load_spec(write(tmp_path, {**SPEC, "base": {**BASE, "optim": {"max_steps": 4}}}, "edited.yaml")))
    assert overridden.config_hash == edited.config_hash != plain.config_hash


def test_base_keys_reach_a_base_given_as_a_file(tmp_path):
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(BASE))
    _, base = load_spec(write(tmp_path, {**SPEC, "base": "trial.yaml"}), ["base.optim.max_steps=3"])
    assert base["optim"]["max_steps"] == 3 and base["data"] == BASE["data"]


def test_overrides_may_follow_options_on_the_command_line(tmp_path, capsys):
    assert main(["sweep", str(write(tmp_path, SPEC)), "--dry-run", "grid.seed=[5]", "grid.algorithm=[finetune]"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "distil" in line]
    assert len(rows) == 1 and rows[0][1] == "finetune" and rows[0][-2] == "5"


@pytest.mark.parametrize(("override", "message"), [
    ("foo=1", "foo: Extra inputs are not permitted"),
    ("grid.bogus=[1]", "grid.bogus: Extra inputs are not permitted"),
    ("foo", "override 'foo': expected dotted.key=value"),
    ("=1", "override '=1': expected dotted.key=value"),
    ("grid.seed=[1", "override grid.seed: value '[1' is not valid YAML"),
    ("grid.seed.0.x=1", "override grid.seed.0.x: grid.seed.0 is a value (1), not a section"),
    ("base.optim.lrr=1", "optim.lrr: unknown key"),
])
def test_a_bad_override_is_one_line_naming_the_key(tmp_path, capsys, override, message):
    assert main(["sweep", str(write(tmp_path, SPEC)), override, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(("argv", "verbose"), [
    (["sweep", "s.yaml"], 0), (["-v", "sweep", "s.yaml"], 1), (["sweep", "s.yaml", "-v", "a=1"], 1),
    (["--verbose", "train", "c.yaml"], 1), (["explain", "-vv"], 2),
])
def test_verbose_before_or_after_the_command(argv, verbose):
    assert parse_args(argv).verbose == verbose


@pytest.fixture
def seen_env(monkeypatch):
    """The environment `metadistil explain` runs with (the command stands in for any)."""
    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    seen = {}
    monkeypatch.setattr(launcher.cli, "_explain", lambda args: seen.update(os.environ) or 0)
    return seen


def test_commands_run_quiet_unless_verbose_and_leave_the_environment_as_it_was(seen_env):
    assert main(["explain"]) == 0
    assert {key: seen_env.get(key) for key in QUIET_ENV} == QUIET_ENV
    assert not set(QUIET_ENV) & set(os.environ), "the command's settings outlived it"
    seen_env.clear()
    assert main(["-v", "explain"]) == 0
    assert not set(QUIET_ENV) & set(seen_env)


def test_a_library_setting_given_by_the_user_wins(seen_env, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    assert main(["explain"]) == 0
    assert seen_env["TRANSFORMERS_VERBOSITY"] == "info" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
