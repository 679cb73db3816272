"""Sweep spec inputs beyond their keys' types: repeated YAML keys, the storage folder, exclude patterns that drop
nothing, output folders that would leave storage_path; each refused (or warned about) before Ray starts."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import yaml

import launcher.spec
import launcher.spec_checks
from launcher.cli import main
from launcher.spec import expand, load_spec
from launcher.spec_checks import prepare_storage
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SPEC_TEXT = """\
name: inputs
base:
  data: {name: synthetic, train_size: 100, quiz_size: 16, validation_size: 20, test_size: 20}
  metadistil: {quiz_batch_size: 8}
teachers:
  bert: {checkpoint: bert-base-uncased, label: BERT}
teacher_sets:
  bert: [bert]
students:
  distil: {name: distilbert-base-uncased}
grid:
  algorithm: [finetune, kd]
  seed: [1, 2]
"""
FINETUNE_ONLY = {"name": "ft", "students": {"distil": {"name": "distilbert-base-uncased"}},
                 "grid": {"algorithm": ["finetune"], "seed": [1, 2]}}


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def plan_of(tmp_path: Path, spec: dict):
    return expand(*load_spec(write(tmp_path, yaml.safe_dump(spec))))


@pytest.mark.parametrize(("text", "message"), [
    (SPEC_TEXT + "  seed: [3]\n", "grid.seed: key given twice (lines 13 and 14); YAML would silently keep only the"),
    (SPEC_TEXT + "name: other\n", "name: key given twice (lines 1 and 14)"),
    (SPEC_TEXT.replace("label: BERT}", "label: BERT, label: B}"), "teachers.bert.label: key given twice (lines 6 and"),
    (SPEC_TEXT + "include:\n  - {algorithm: kd, seed: 1, seed: 2}\n", "include.0.seed: key given twice (lines 15 and"),
    (SPEC_TEXT + "  extra: {distill.alpha: [0.5], distill.alpha: [0.9]}\n",
     "grid.extra.distill.alpha: key given twice"),
])
def test_a_repeated_yaml_key_is_refused_naming_its_path_and_lines(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(f"sweep.yaml: {message}")):
        load_spec(write(tmp_path, text))


def test_a_repeated_key_in_the_base_trial_file_is_refused(tmp_path):
    write(tmp_path, "optim:\n  lr: 1.0e-4\n  lr: 1.0e-3\n", "trial.yaml")
    spec = write(tmp_path, "name: x\nbase: trial.yaml\nstudents: {s: {name: x}}\ngrid: {algorithm: [finetune]}\n")
    with pytest.raises(ConfigError, match=re.escape("trial.yaml: optim.lr: key given twice (lines 2 and 3)")):
        load_spec(spec)


def test_merge_keys_may_still_be_overridden(tmp_path):
    text = SPEC_TEXT.replace("students:\n  distil: {name: distilbert-base-uncased}\n",
                             "students:\n  distil: &d {name: distilbert-base-uncased, label: A}\n"
                             "  distil2:\n    <<: *d\n    label: B\n")
    spec, _ = load_spec(write(tmp_path, text))
    assert (spec.students["distil"].label, spec.students["distil2"].label) == ("A", "B")


def test_invalid_yaml_is_one_line_naming_the_place(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.yaml: not valid YAML at line 3, column 1: expected ','") as err:
        load_spec(write(tmp_path, "name: x\nstudents: {s: {name: x}\n"))
    assert "\n" not in str(err.value)


def test_a_spec_or_base_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {spec}: not UTF-8 text (byte 0xe9")
    base = tmp_path / "base.yaml"
    base.write_bytes("seed: 1 # \u00e9\n".encode("latin-1"))
    spec.write_text(yaml.safe_dump({**FINETUNE_ONLY, "base": str(base)}))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(base))}: not UTF-8 text"):
        load_spec(spec)


def test_storage_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match=re.escape(f"storage_path: '{tmp_path / 'taken'}' is a file")):
        plan_of(tmp_path, {**FINETUNE_ONLY, "storage_path": str(tmp_path / "taken")})


def test_storage_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match=re.escape(f"storage_path: '{tmp_path / 'taken' / 'sweeps'}' cannot be "
                                                    f"created: {tmp_path / 'taken'} is a file")):
        plan_of(tmp_path, {**FINETUNE_ONLY, "storage_path": str(tmp_path / "taken" / "sweeps")})


def test_storage_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    # permission bits do not stop root, which runs these tests: pretend the folder is read-only
    monkeypatch.setattr(launcher.spec_checks.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=re.escape(f"storage_path: folder '{tmp_path}' is not writable")):
        plan_of(tmp_path, {**FINETUNE_ONLY, "storage_path": str(tmp_path)})


def test_dry_run_accepts_a_cluster_path_this_machine_does_not_mount(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher.spec_checks.os, "access", lambda path, mode: False)
    plan = plan_of(tmp_path, {**FINETUNE_ONLY, "storage_path": str(tmp_path / "mnt" / "shared")})
    assert plan.trials[0].config.output.dir.startswith(str(tmp_path / "mnt" / "shared" / "ft" / "trials"))


def test_prepare_storage_creates_the_folder_or_refuses_it(tmp_path, monkeypatch):
    prepare_storage(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match=r"storage_path: .* cannot be created: .* is a file"):
        prepare_storage(str(tmp_path / "taken" / "sweeps"))

    def read_only(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(launcher.spec_checks.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"storage_path: folder '.*/a/b' is not writable \(Permission denied\)"):
        prepare_storage(str(tmp_path / "a" / "b"))


def test_an_exclude_pattern_that_drops_nothing_is_a_warning(tmp_path):
    spec = {**FINETUNE_ONLY, "exclude": [{"seed": 1}, {"seed": 9}, {"algorithm": "finetune", "warmup": 1}]}
    with pytest.warns(UserWarning) as caught:
        plan = plan_of(tmp_path, spec)
    assert [str(w.message) for w in caught] == [
        "exclude.1: {'seed': 9} matches no combination of the grid; it drops nothing",
        # finetune has no warm-up: after the rules no combination has both
        "exclude.2: {'algorithm': 'finetune', 'warmup': 1.0} matches no combination of the grid; it drops nothing"]
    assert [t.axes["seed"] for t in plan.trials] == [2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweep").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_plan_without_warnings(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert expand(*load_spec(path)).trials


def test_a_finetune_only_spec_needs_no_teacher_set(tmp_path):
    # its teacher_set axis used to be empty, and so was the plan
    plan = plan_of(tmp_path, FINETUNE_ONLY)
    assert [t.id for t in plan.trials] == ["finetune__none__distil__w0__off__s1", "finetune__none__distil__w0__off__s2"]


def test_every_output_folder_is_checked_to_be_inside_storage(tmp_path, monkeypatch):
    # the name checks make this unreachable from a spec; the last check stands behind them
    monkeypatch.setattr(launcher.spec, "trial_id", lambda combo: f"../../../escaped{combo['seed']}")
    with pytest.raises(ConfigError, match=re.escape(f"output folder '{tmp_path / 's'}/ft/trials/../../../escaped1' "
                                                    f"is not inside storage_path '{tmp_path / 's'}'")):
        plan_of(tmp_path, {**FINETUNE_ONLY, "storage_path": str(tmp_path / "s")})


def test_the_cli_shows_a_bad_spec_as_one_line_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, SPEC_TEXT + "  seed: [3]\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: grid.seed: key given twice (lines 13 and 14); YAML would silently keep only the "
                   "last value\n")
