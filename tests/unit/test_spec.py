"""Sweep spec validation and grid expansion: counts, rules, include/exclude, teacher recipes and their cache keys."""

from __future__ import annotations

import re

import pytest
import yaml

from launcher.spec import expand, load_spec, trial_id
from trainer.config import ConfigError

SPEC = {
    "name": "unit",
    "base": {"data": {"name": "synthetic", "train_size": 100, "quiz_size": 16, "validation_size": 20,
                      "test_size": 20}, "metadistil": {"quiz_batch_size": 8}},
    "teachers": {
        "bert": {"checkpoint": "bert-base-uncased", "label": "BERT"},
        "bert2": {"finetune": {"model": "bert-base-uncased", "train_subset_seed": 3}, "label": "BERT2"},
        "roberta": {"checkpoint": "roberta-base", "label": "RoBERTa"},
    },
    "teacher_sets": {"bert": ["bert"], "roberta": ["roberta"], "bert+bert2": ["bert", "bert2"]},
    "students": {"distil": {"name": "distilbert-base-uncased", "label": "DistilBERT"},
                 "tiny": {"name": "huawei-noah/TinyBERT_General_4L_312D", "label": "TinyBERT"}},
    "noise": {"clean": {}, "noisy": {"teacher": {"p": 0.1}, "student": {"p": 0.1}}},
    "grid": {"algorithm": ["finetune", "kd", "metadistil"], "warmup": [0, 1], "noise": ["clean", "noisy"],
             "seed": [1, 2]},
}
GRID = SPEC["grid"]


def write(tmp_path, spec):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def plan_of(tmp_path, spec=SPEC):
    return expand(*load_spec(write(tmp_path, spec)))


def test_counts_and_rules(tmp_path):
    plan = plan_of(tmp_path)
    # finetune: 2 students x 2 seeds (teacher set, warm-up and noise collapse);
    # kd and metadistil: 3 teacher sets x 2 students x 2 warm-ups x 2 noises x 2 seeds each.
    assert len(plan.trials) == 2 * 2 + 2 * (3 * 2 * 2 * 2 * 2)
    finetunes = [t for t in plan.trials if t.axes["algorithm"] == "finetune"]
    assert {(t.axes["teacher_set"], t.axes["warmup"], t.axes["noise"]) for t in finetunes} == {(None, 0.0, "clean")}
    assert all(t.config.teachers == [] for t in finetunes)
    assert len({t.id for t in plan.trials}) == len(plan.trials)
    two = next(t for t in plan.trials if t.axes["teacher_set"] == "bert+bert2")
    assert [m.label for m in two.config.teachers] == ["bert", "bert2"] or \
        [m.label for m in two.config.teachers] == ["BERT", "BERT2"]
    assert two.config.teachers[1].name.endswith("/student") and "teachers/bert2-" in two.config.teachers[1].name
    noisy = next(t for t in plan.trials if t.axes["noise"] == "noisy")
    assert noisy.config.noise.teacher.p == 0.1 and noisy.config.noise.student.p == 0.1
    assert set(plan.teacher_trials) == {"teacher__bert2"}
    assert plan.teacher_trials["teacher__bert2"].config.data.train_subset_seed == 3
    assert plan.teacher_trials["teacher__bert2"].config.algorithm == "finetune"


def test_exclude_include_and_extra_axes(tmp_path):
    spec = {**SPEC, "grid": {"algorithm": ["kd"], "teacher_set": ["bert"], "student": ["distil"],
                             "extra": {"distill.temperature": [1.0, 4.0]}},
            "exclude": [{"distill.temperature": 4.0}],
            "include": [{"algorithm": "metadistil", "teacher_set": "roberta", "student": "tiny",
                         "distill.temperature": 4.0}]}
    plan = plan_of(tmp_path, spec)
    assert [(t.axes["algorithm"], t.config.distill.temperature) for t in plan.trials] == [("kd", 1.0),
                                                                                          ("metadistil", 4.0)]
    assert [reason for _, reason in plan.dropped] == ["excluded by {'distill.temperature': 4.0}"]
    assert "distill.temperature=4.0" in plan.trials[1].id


def test_teacher_cache_key_follows_the_recipe(tmp_path):
    a = plan_of(tmp_path).teacher_trials["teacher__bert2"].config.output.dir
    changed = {**SPEC, "teachers": {**SPEC["teachers"], "bert2": {"finetune": {
        "model": "bert-base-uncased", "train_subset_seed": 4}}}}
    b = plan_of(tmp_path, changed).teacher_trials["teacher__bert2"].config.output.dir
    assert a == plan_of(tmp_path).teacher_trials["teacher__bert2"].config.output.dir
    assert a != b


@pytest.mark.parametrize(("change", "message"), [
    ({"teacher_sets": {"x": ["nobody"]}}, "teacher_sets.x: unknown teachers ['nobody']"),
    ({"grid": {"student": ["ghost"]}}, "grid.student: unknown names ['ghost']"),
    ({"grid": {"noise": ["loud"]}}, "grid.noise: unknown names ['loud']"),
    ({"teachers": {"bad": {"label": "x"}}}, "give exactly one of checkpoint or finetune"),
    ({"exclude": [{"colour": "red"}]}, "unknown axes ['colour']"),
    ({"name": "has space"}, "name: String should match pattern"),
    ({"grid": {"algorithm": ["distil"]}}, "grid.algorithm.0"),
    ({"base": {"optim": {"lr": -1}}}, "optim.lr"),
    ({"extra_key": 1}, "extra_key: Extra inputs are not permitted"),
    # combinations the meta step cannot honour fail at --dry-run, naming both keys
    ({"base": {"deepspeed": {"precision": "fp16"}, "device": "cuda"}},
     "deepspeed.precision: fp16 cannot run algorithm 'metadistil'"),
    ({"base": {"deepspeed": {"precision": "bf16"}, "metadistil": {"meta_gradient": "finite_difference"}}},
     "metadistil.meta_gradient: finite_difference needs fp32 compute"),
    # repeated values would run the same trials twice (or distil from one teacher twice)
    ({"teacher_sets": {"x": ["bert", "bert"]}}, "teacher_sets.x: 'bert' is given more than once in ['bert', 'bert']"),
    ({"grid": {**GRID, "seed": [1, 2, 1]}}, "grid.seed: 1 is given more than once in [1, 2, 1]"),
    ({"grid": {**GRID, "warmup": [0, 0.0]}}, "grid.warmup: 0.0 is given more than once"),
    ({"grid": {**GRID, "algorithm": ["kd", "kd"]}}, "grid.algorithm: 'kd' is given more than once"),
    ({"grid": {**GRID, "noise": ["clean", "noisy", "clean"]}}, "grid.noise: 'clean' is given more than once"),
    ({"grid": {**GRID, "extra": {"distill.alpha": [0.5, 0.9, 0.5]}}},
     "grid.extra.distill.alpha: 0.5 is given more than once"),
    # an empty axis used to fall back to every name (teacher_set, student) or to give an empty plan (extra)
    ({"grid": {**GRID, "teacher_set": []}}, "grid.teacher_set: List should have at least 1 item after validation"),
    ({"grid": {**GRID, "student": []}}, "grid.student: List should have at least 1 item after validation"),
    ({"grid": {**GRID, "extra": {"distill.alpha": []}}},
     "grid.extra.distill.alpha: List should have at least 1 item after validation, not 0 (got [])"),
    ({"exclude": [{"seed": 1}, {"seed": 2}]},
     "exclude: drops all 144 combinations of the grid; the sweep would run no trial"),
    # names and values that end up in folder names must not leave storage_path
    ({"students": {"..": {"name": "x"}}, "grid": {**GRID, "student": [".."]}},
     "students: name '..' cannot be part of a folder name"),
    ({"teacher_sets": {"/etc": ["bert"]}}, "teacher_sets: name '/etc' cannot be part of a folder name"),
    ({"teachers": {**SPEC["teachers"], "a/../../b": {"checkpoint": "x"}}},
     "teachers: name 'a/../../b' cannot be part of a folder name"),
    ({"noise": {"lo ud": {}}, "grid": {**GRID, "noise": ["lo ud"]}}, "noise: name 'lo ud' cannot be part of a folder"),
    ({"grid": {**GRID, "extra": {"data.subset": ["../../x"]}}},
     "grid.extra.data.subset: value '../../x' cannot be part of a trial folder name"),
    ({"grid": {**GRID, "extra": {"data.subset": ["/tmp/x"]}}},
     "grid.extra.data.subset: value '/tmp/x' cannot be part of a trial folder name"),
    ({"grid": {**GRID, "extra": {"data.subset": [".."]}}}, "grid.extra.data.subset: value '..' cannot be part"),
    ({"grid": {**GRID, "extra": {"data.subset": ["a"]}}, "include": [{"algorithm": "kd", "data.subset": "a/b"}]},
     "include.0.data.subset: value 'a/b' cannot be part of a trial folder name"),
    ({"grid": {**GRID, "extra": {"../x": [1]}}}, "grid.extra: '../x' is not a dotted trial key"),
    ({"grid": {**GRID, "extra": {"teacher_set": ["../x"]}}}, "grid.extra: 'teacher_set' is an axis of its own"),
    ({"name": ".."}, "name: String should match pattern"),
    ({"name": "a/b"}, "name: String should match pattern"),
    ({"students": {"s" * 250: {"name": "x"}}, "grid": {**GRID, "student": ["s" * 250]}},
     "bytes long, over the 255 a folder name may have"),
    # the trainer writes with local file operations: a URI would become the local folder 's3:/b/x'
    ({"storage_path": "s3://b/x"}, ("storage_path: remote storage URIs are not supported; use a folder shared by "
                                    "every node, e.g. a mounted NFS/EFS path (got 's3://b/x')")),
    ({"storage_path": "gs://bucket/sweeps"}, "storage_path: remote storage URIs are not supported"),
    # include items are typed like the axes (a string warm-up used to end in a format traceback)
    ({"include": [{"algorithm": "kd", "warmup": "x"}]}, "include.0.warmup: Input should be a valid number"),
    ({"include": [{"algorithm": None}]}, "include.0.algorithm: Input should be 'finetune', 'kd' or 'metadistil'"),
    ({"include": [{"algorithm": "kd", "student": "ghost"}]}, "include.0.student: 'ghost' is not defined"),
    ({"include": [{"algorithm": "kd", "noise": "loud"}]}, "include.0.noise: 'loud' is not defined"),
    ({"exclude": [{"seed": -1}]}, "exclude.0.seed: Input should be greater than or equal to 0"),
    # two values that show the same in the trial id would silently run only the first
    ({"grid": {**GRID, "algorithm": ["kd"], "warmup": [0.1234561, 0.1234562]}},
     "grid.warmup: 0.1234561 and 0.1234562 make the same trial id"),
])
def test_bad_specs_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_of(tmp_path, {**SPEC, **change})


def test_trial_ids_are_stable():
    combo = {"algorithm": "kd", "teacher_set": "bert", "student": "distil", "warmup": 1.0, "noise": "clean",
             "seed": 3, "distill.alpha": 0.9}
    assert trial_id(combo) == "kd__bert__distil__w1__clean__s3__distill.alpha=0.9"


def test_workers_axis(tmp_path):
    spec = {**SPEC, "base": {**SPEC["base"], "deepspeed": {"enabled": True}, "optim": {"batch_size": 16}},
            "grid": {"algorithm": ["kd", "metadistil"], "teacher_set": ["bert"], "student": ["distil"]},
            "resources": {"workers": 1},
            "include": [{"algorithm": "metadistil", "teacher_set": "bert", "student": "distil", "workers": 2}]}
    plan = plan_of(tmp_path, spec)
    assert [(t.axes["algorithm"], t.workers) for t in plan.trials] == [("kd", 1), ("metadistil", 1),
                                                                      ("metadistil", 2)]
    assert plan.trials[2].id == "metadistil__bert__distil__w0__clean__s42__x2"
    assert plan.trials[0].id == "kd__bert__distil__w0__clean__s42"  # one worker keeps the id it always had
    assert plan_of(tmp_path, {**spec, "resources": {"workers": 2}, "include": []}).trials[0].workers == 2


@pytest.mark.parametrize(("base", "message"), [
    ({"deepspeed": {"enabled": False}}, "workers=2: deepspeed.enabled must be true"),
    ({"deepspeed": {"enabled": True}, "optim": {"batch_size": 15}}, "optim.batch_size=15 must split evenly"),
    ({"deepspeed": {"enabled": True}, "metadistil": {"quiz_batch_size": 7}},
     "metadistil.quiz_batch_size=7 must split evenly"),
    ({"deepspeed": {"enabled": True}, "metadistil": {"quiz_batch_size": 8, "meta_gradient": "double_backward"}},
     "double_backward runs on one worker only"),
])
def test_multi_worker_trials_are_checked_before_running(tmp_path, base, message):
    spec = {**SPEC, "base": {**SPEC["base"], **base}, "grid": {"algorithm": ["metadistil"], "teacher_set": ["bert"],
                                                              "student": ["distil"], "workers": [2]}}
    with pytest.raises(ConfigError, match=message):
        plan_of(tmp_path, spec)


def test_a_task_axis_fine_tunes_each_teacher_once_per_task(tmp_path):
    from launcher.identity import TrialIdentity

    glue = tmp_path / "glue"
    data = {"path": str(glue), "train_size": 20, "quiz_size": 4, "validation_size": 4, "test_size": 4}
    spec = {**SPEC, "base": {"optim": {"batch_size": 4}, "data": data},
            "grid": {"algorithm": ["finetune", "kd"], "teacher_set": ["bert+bert2"], "student": ["distil"],
                     "seed": [1], "extra": {"data.task": ["cola", "stsb"]}}}
    plan = plan_of(tmp_path, spec)
    assert set(plan.teacher_trials) == {"teacher__bert2__data.task=cola", "teacher__bert2__data.task=stsb"}
    for task in ("cola", "stsb"):
        teacher = plan.teacher_trials[f"teacher__bert2__data.task={task}"]
        assert teacher.config.data.task == task and teacher.config.data.train_subset_seed == 3
        kd = next(t for t in plan.trials if t.axes["algorithm"] == "kd" and t.axes["data.task"] == task)
        assert kd.config.data.task == task
        assert kd.config.teachers[1].name == f"{teacher.config.output.dir}/student"
        identity = TrialIdentity.of_trial(plan, teacher)
        assert identity.extra == (("data.task", task),) and TrialIdentity.from_tags(identity.to_tags()) == identity
    cola, stsb = (plan.teacher_trials[f"teacher__bert2__data.task={t}"].config.output.dir for t in ("cola", "stsb"))
    assert cola != stsb
    assert {t.id for t in plan.trials} == {f"{a}__{s}__distil__w0__clean__s1__data.task={t}" for t in ("cola", "stsb")
                                           for a, s in (("finetune", "none"), ("kd", "bert+bert2"))}
