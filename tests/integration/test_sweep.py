"""A real sweep on a local Ray: MLflow parent and children, a failing trial, resume, and the teacher cache."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launcher import runs
from launcher.driver import run_sweep
from launcher.spec import expand, load_spec


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def nan_teacher(tmp_path, model_dirs):
    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"])
    model.classifier.weight.data.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(model_dirs["bert"]).save_pretrained(tmp_path / "nan")
    return str(tmp_path / "nan")


def spec_file(tmp_path, model_dirs, nan_teacher, name):
    spec = {
        "name": name,
        "base": {"data": {"name": "synthetic", "train_size": 160, "quiz_size": 16, "validation_size": 64,
                          "test_size": 64, "max_length": 32},
                 "optim": {"lr": 3e-3, "batch_size": 16, "max_steps": 6}, "eval": {"every_steps": 3},
                 "metadistil": {"quiz_batch_size": 8}, "deepspeed": {"enabled": True},
                 "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
        "teachers": {"bert": {"checkpoint": model_dirs["bert"], "label": "BERT"},
                     "roberta": {"finetune": {"model": model_dirs["roberta"], "overrides": {"optim.max_steps": 4}},
                                 "label": "RoBERTa"},
                     "broken": {"checkpoint": nan_teacher, "label": "NaN"}},
        "teacher_sets": {"bert": ["bert"], "bert+roberta": ["bert", "roberta"], "broken": ["broken"]},
        "students": {"distil": {"name": model_dirs["distilbert"], "label": "DistilBERT"}},
        "grid": {"algorithm": ["finetune", "kd", "metadistil"], "seed": [1]},
        "exclude": [{"algorithm": "kd", "teacher_set": "bert+roberta"},
                    {"algorithm": "metadistil", "teacher_set": "broken"}],
        # a Ray Train trial: two DeepSpeed data-parallel workers (gloo)
        "include": [{"algorithm": "kd", "teacher_set": "bert", "student": "distil", "workers": 2}],
        "resources": {"cpus": 1}, "max_concurrent_trials": 2, "max_failures": 0,
        "storage_path": str(tmp_path / "storage"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def children(uri, parent):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("metadistil").experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_sweep_runs_resumes_and_caches_teachers(tmp_path, model_dirs, nan_teacher, local_ray):
    plan = expand(*load_spec(spec_file(tmp_path, model_dirs, nan_teacher, "alpha")))
    ids = sorted(t.id for t in plan.trials)
    assert len(ids) == 6  # finetune, kd x {bert, broken}, metadistil x {bert, bert+roberta}, kd on 2 workers
    first = run_sweep(plan, verbose=0)
    broken = "kd__broken__distil__w0__off__s1"
    assert set(first.failed) == {broken} and "kd=nan" in first.failed[broken]

    kids = children(first.tracking_uri, first.parent_run_id)
    by_id = {r.data.tags[runs.TRIAL_ID]: r for r in kids}
    assert len(kids) == len(by_id) == len(ids) + 1  # one child per trial, plus the teacher fine-tuning run
    assert by_id[broken].info.status == "FAILED" and "kd=nan" in by_id[broken].data.tags["error"]
    two = by_id["metadistil__bert+roberta__distil__w0__off__s1"]
    assert two.info.status == "FINISHED" and two.data.tags["teachers"] == "BERT,RoBERTa"
    assert two.data.params["teachers.count"] == "2" and 0 <= two.data.metrics["test_accuracy"] <= 1
    assert {r.data.tags[runs.ROLE] for r in kids} == {"teacher", "trial"}
    dp = by_id["kd__bert__distil__w0__off__s1__x2"]
    assert dp.info.status == "FINISHED" and dp.data.tags["workers"] == "2"
    assert dp.data.metrics["train_steps"] == 6 and 0 <= dp.data.metrics["test_accuracy"] <= 1
    one = by_id["kd__bert__distil__w0__off__s1"]
    assert set(dp.data.params) == set(one.data.params)  # one MLflow run per trial, whatever its worker count
    params_of = [set(r.data.params) for r in kids if r.data.params.get("teachers.count") == "1"]
    assert all(p == params_of[0] for p in params_of), "trials with one teacher must share their param keys"

    from mlflow.tracking import MlflowClient

    scores = {t: r.data.metrics["best_val_accuracy"] for t, r in by_id.items()
              if r.data.tags[runs.ROLE] == "trial" and r.info.status == "FINISHED"}
    (best_trial, version), = first.best.values()
    assert scores[best_trial] == max(scores.values())
    client = MlflowClient(first.tracking_uri)
    registered = client.get_model_version_by_alias("metadistil-alpha", runs.BEST_ALIAS)
    student = client.get_logged_model(client.get_run(registered.run_id).outputs.model_outputs[0].model_id)
    assert str(registered.version) == version and registered.run_id == by_id[best_trial].info.run_id
    assert registered.source == student.artifact_location
    assert {f.path for f in client.list_artifacts(registered.run_id, "trial")} == {"trial/config.yaml",
                                                                                  "trial/metrics.json"}

    resumed = run_sweep(plan, resume=True, verbose=0)
    assert resumed.best == first.best, "a resume registered the same student again"
    assert resumed.parent_run_id == first.parent_run_id
    assert sorted(resumed.skipped) == sorted(set(by_id) - {broken})
    assert resumed.finished == [] and set(resumed.failed) == {broken}
    assert len(children(first.tracking_uri, first.parent_run_id)) == len(by_id), "a resume duplicated runs"

    # The spec (or a default) changed between runs: --resume continues the same parent and reruns only what changed.
    finetune = next(t for t in plan.trials if t.axes["algorithm"] == "finetune")
    new_optim = finetune.config.optim.model_copy(update={"lr": 1e-3})
    finetune.config = finetune.config.model_copy(update={"optim": new_optim})
    changed = run_sweep(plan, resume=True, verbose=0)
    assert changed.parent_run_id == first.parent_run_id and changed.replaced == [finetune.id]
    assert finetune.id in changed.finished and finetune.id not in changed.skipped
    after = {r.data.tags[runs.TRIAL_ID]: r for r in children(first.tracking_uri, first.parent_run_id)}
    assert len(after) == len(by_id), "the changed trial's old run must give way to its new one"
    rerun = after[finetune.id]
    assert rerun.info.run_id != by_id[finetune.id].info.run_id and rerun.info.status == "FINISHED"
    assert rerun.data.params["optim.lr"] == "0.001"

    other = expand(*load_spec(spec_file(tmp_path, model_dirs, nan_teacher, "beta")))
    second = run_sweep(other, verbose=0)
    teacher_run = next(r for r in children(second.tracking_uri, second.parent_run_id)
                       if r.data.tags[runs.ROLE] == "teacher")
    assert teacher_run.data.tags.get("metadistil.cached") == "true"
    assert "teacher__roberta" not in second.finished
    assert teacher_run.data.metrics["best_val_accuracy"] == by_id["teacher__roberta"].data.metrics[
        "best_val_accuracy"]
