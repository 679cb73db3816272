"""The algorithm registry: what the builtins declare, the errors naming the registered algorithms, config validation
without torch, and an algorithm added as one file plus one registry line (tests/toy_algorithm.py) that the config
rules, the sweep spec and a whole trial take up."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import toy_algorithm
from launcher.spec import expand, load_spec
from trainer import registry
from trainer.config import ConfigError, parse_config
from trainer.distributed import check_workers
from trainer.errors import ConfigKeyError
from trainer.loop import run_trial
from trainer.registry import AlgorithmSpec

REPO = Path(__file__).resolve().parents[2]
TEACHER = {"name": "teacher-a"}


@pytest.fixture
def toy(monkeypatch):
    """The toy algorithm registered for one test; the registry is as before afterwards."""
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    registry.register(toy_algorithm.SPEC)  # the one line that adds an algorithm
    return toy_algorithm.SPEC


def message(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


def test_the_builtins_declare_what_they_need_and_where_they_report():
    facts = {name: (s.label, s.teachers, s.quiz, s.report_block(1), s.report_block(2))
             for name, s in ((n, registry.get(n)) for n in registry.names())}
    assert facts == {
        "finetune": ("Fine-tune", "none", False, "Fine-Tuned Models", "Fine-Tuned Models"),
        "kd": ("KD", "frozen", False, "Student Model with KD", "Student Model with KD"),
        "metadistil": ("MetaDistil", "trainable", True, "Student Model with MetaDistil",
                       "Student Model with MetaDistil + Additional Teacher"),
    }
    assert registry.distilling() == ("kd", "metadistil")
    assert registry.get("metadistil").build == "trainer.algorithms.metadistil:build"


def test_an_unknown_algorithm_is_refused_naming_the_registered_ones():
    assert message({"algorithm": "distil", "teachers": [TEACHER]}) == (
        "invalid trial config: algorithm: Input should be 'finetune', 'kd' or 'metadistil' (got 'distil')")
    with pytest.raises(ConfigKeyError) as info:
        registry.get("distil")
    assert info.value.key == "algorithm"
    assert str(info.value) == ("algorithm: 'distil' is not a registered algorithm (registered: 'finetune', 'kd' or "
                               "'metadistil')")


def test_a_registered_algorithm_is_allowed_and_listed(toy):
    assert "'finetune', 'kd', 'metadistil' or 'smoothed_finetune' (got 'distil')" in message({"algorithm": "distil"})
    assert parse_config({"algorithm": "smoothed_finetune"}).algorithm == "smoothed_finetune"
    assert registry.names()[-1] == "smoothed_finetune" and "smoothed_finetune" not in registry.distilling()


def test_rules_follow_from_what_an_algorithm_needs_and_its_own_check(toy):
    assert message({"algorithm": "smoothed_finetune", "teachers": [TEACHER]}) == (
        "invalid trial config: teachers: smoothed_finetune trains without teachers; remove teachers or choose "
        "kd/metadistil")
    assert message({"algorithm": "smoothed_finetune", "warmup": {"epochs": 0.5}}) == (
        "invalid trial config: warmup.epochs: 0.5 must be 0 with smoothed_finetune")
    # metadistil's rules are its own: kd takes the settings they refuse
    assert parse_config({"algorithm": "kd", "teachers": [TEACHER], "deepspeed": {"zero_stage": 3},
                         "metadistil": {"quiz_batch_size": 500}}).deepspeed.zero_stage == 3
    assert message({"teachers": [TEACHER], "deepspeed": {"zero_stage": 3}}).startswith(
        "invalid trial config: deepspeed.zero_stage: ZeRO-3")


def test_worker_rules_come_from_the_registry():
    meta = parse_config({"teachers": [TEACHER], "deepspeed": {"enabled": True}, "optim": {"batch_size": 8},
                         "metadistil": {"quiz_batch_size": 6, "meta_gradient": "double_backward"}})
    with pytest.raises(ConfigError) as info:
        check_workers(meta, 4)
    assert str(info.value) == ("with workers=4: metadistil.quiz_batch_size=6 must split evenly over 4 workers; "
                               "metadistil.meta_gradient=double_backward runs on one worker only")
    check_workers(meta.model_copy(update={"algorithm": "kd"}), 4)  # kd draws no quiz and has no meta-gradient


def test_the_sweep_spec_drops_teachers_and_warm_up_of_an_algorithm_without_teachers(toy, tmp_path):
    spec = {"name": "toy", "storage_path": str(tmp_path / "sweeps"),
            "base": {"data": {"name": "synthetic", "train_size": 100, "quiz_size": 16, "test_size": 20}},
            "teachers": {"bert": {"checkpoint": "bert-base-uncased"}}, "teacher_sets": {"bert": ["bert"]},
            "students": {"s": {"name": "distilbert-base-uncased"}},
            "grid": {"warmup": [0, 1]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    plan = expand(*load_spec(path))  # the default grid: every registered algorithm
    toys = [t for t in plan.trials if t.axes["algorithm"] == "smoothed_finetune"]
    # warm-up variants are for distillation: the toy's warm-up 1 collapses onto warm-up 0 (which its check needs)
    assert [(t.axes["teacher_set"], t.axes["warmup"], t.config.teachers) for t in toys] == [(None, 0.0, [])]
    assert {t.axes["algorithm"] for t in plan.trials} == set(registry.names())


def test_a_builder_named_by_dotted_path_is_imported_on_first_build():
    spec = AlgorithmSpec("dotted", "Dotted", "Fine-Tuned Models", "none", "toy_algorithm:build")
    student = object()
    built = spec.make(SimpleNamespace(engines={"student": student}), None)
    assert isinstance(built, toy_algorithm.SmoothedFineTune) and built.student is student


@pytest.mark.parametrize("fields,error", [
    ({"name": "Smooth FT"}, "use lower-case letters, digits and _"),
    ({"teachers": "some"}, "teachers 'some' is not one of none, frozen, trainable"),
    ({"build": "toy_algorithm.build"}, "is not 'module:attribute'"),
])
def test_a_malformed_spec_is_refused(fields, error):
    with pytest.raises(ValueError, match=error):
        AlgorithmSpec(**{"name": "x", "label": "X", "block": "B", "teachers": "none", "build": "m:f", **fields})


def test_a_second_spec_of_a_registered_name_is_refused(toy):
    assert registry.register(toy) is toy  # the same spec again (a module imported twice) changes nothing
    with pytest.raises(ValueError, match="'kd' is registered already"):
        registry.register(AlgorithmSpec("kd", "KD 2", "Student Model with KD", "frozen", "m:f"))


def test_config_validation_imports_no_torch():
    code = ("import sys, trainer.config\n"
            "print('torch' in sys.modules)\n"
            "trainer.config.parse_config({'algorithm': 'metadistil', 'teachers': [{'name': 'a'}]})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('trainer.algo')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["False", "[]"]


class Recorder:
    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def __getattr__(self, name):  # every other logger call is of no interest here
        return lambda *args, **kwargs: None


def test_the_toy_algorithm_runs_a_whole_trial(toy, tmp_path, model_dirs):
    cfg = parse_config({
        "seed": 0, "algorithm": "smoothed_finetune", "student": {"name": model_dirs["distilbert"]},
        "data": {"name": "synthetic", "train_size": 600, "quiz_size": 40, "validation_size": 200, "test_size": 200,
                 "max_length": 32},
        "optim": {"lr": 3e-3, "batch_size": 16, "epochs": 10, "max_steps": 200}, "eval": {"every_steps": 50},
        "deepspeed": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}})
    log = Recorder()
    result = run_trial(cfg, [log], progress=False)
    steps = [m for _, m in log.metrics if "train/smoothed_ce" in m]
    assert len(steps) == 200 and all("train/ce" in m for m in steps)
    assert result.metrics["best_val_accuracy"] > 0.8, result.metrics
    # the label-smoothed optimum, p(label) = 1 - eps/2, is where the student's plain cross-entropy settles: a plain
    # fine-tune would drive it towards 0, a student that learned nothing would stay near log 2
    floor = -math.log(1 - toy_algorithm.SMOOTHING / 2)
    late = [m["train/ce"] for m in steps[-20:]]
    assert 0.95 * floor < sum(late) / len(late) < 1.5 * floor, late
    assert (result.output_dir / "student" / "model.safetensors").is_file()
