"""launcher.runs: what a resumed sweep continues and what its runs say about their source, in a temporary SQLite
MLflow store (no Ray, no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launcher import runs
from launcher.identity import RUN_NAME
from launcher.tracking import MLflowLogger
from trainer.config import flatten, parse_config

SWEEP = "resumable"


def config(seed: int, **overrides):
    return parse_config({"algorithm": "kd", "student": {"name": "student"}, "teachers": [{"name": "teacher"}],
                         "seed": seed, **overrides})


def log_trial(uri: str, parent: str, trial: str, cfg, status: str) -> str:
    logger = MLflowLogger(uri, "metadistil", run_name=trial, parent_run_id=parent,
                          tags={runs.ROLE: "trial", runs.TRIAL_ID: trial})
    logger.log_params(flatten(cfg))
    logger.finish(status)
    return logger.run_id


@pytest.fixture()
def first_sweep(tmp_path):
    """A sweep stopped part way: a finished trial, a failed one, one never started."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = runs.parent_run(uri, "metadistil", SWEEP, "hash-one", resume=False)
    ids = {"done": log_trial(uri, parent, "done", config(1), "FINISHED"),
           "failed": log_trial(uri, parent, "failed", config(2), "FAILED"),
           "changed": log_trial(uri, parent, "changed", config(3), "FINISHED")}
    return uri, parent, ids


def test_a_resume_continues_the_latest_parent_even_with_another_config_hash(first_sweep):
    from mlflow.tracking import MlflowClient

    uri, parent, _ = first_sweep
    assert runs.parent_run(uri, "metadistil", SWEEP, "hash-one", resume=True) == parent
    assert runs.parent_run(uri, "metadistil", SWEEP, "hash-two", resume=True) == parent
    tags = MlflowClient(uri).get_run(parent).data.tags
    assert tags[runs.CONFIG_HASH] == "hash-two" and tags[runs.PREVIOUS_HASH] == "hash-one"
    assert runs.parent_run(uri, "metadistil", SWEEP, "hash-two", resume=False) != parent
    assert runs.parent_run(uri, "metadistil", "another", "hash-two", resume=True) != parent


def test_only_trials_finished_with_their_current_config_are_skipped(first_sweep):
    from mlflow.tracking import MlflowClient

    uri, parent, ids = first_sweep
    # Where a trial logs is not part of what it computes: a renamed run is the same trial.
    plan = {"done": config(1, tracking={"experiment": "metadistil", "run_name": "renamed"}),
            "failed": config(2), "changed": config(3, optim={"lr": 1e-4}), "new": config(4)}
    done, replaced = runs.reconcile_trials(uri, "metadistil", parent, plan)
    assert done == {"done"}
    assert replaced == ["changed"]
    client = MlflowClient(uri)
    old = client.get_run(ids["changed"])
    assert old.info.lifecycle_stage == "deleted" and "config changed" in old.data.tags["metadistil.replaced"]
    assert client.get_run(ids["failed"]).info.lifecycle_stage == "active"  # a retry reattaches to it
    assert runs.child_run(uri, "metadistil", parent, "changed") is None, "the changed trial must get a fresh run"
    assert runs.child_run(uri, "metadistil", parent, "failed") == ids["failed"]


def test_a_changed_teacher_is_a_changed_trial_whatever_the_teacher_count(tmp_path):
    """Teachers log as one list per field (teachers.name, teachers.tokenizer): a resume still sees a swapped teacher
    or tokenizer, and a run of two teachers is compared key for key like a run of one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = runs.parent_run(uri, "metadistil", SWEEP, "hash", resume=False)
    two = [{"name": "teacher"}, {"name": "second", "tokenizer": "tok"}]
    for trial, cfg in {"one": config(1), "two": config(2, teachers=two), "tok": config(3, teachers=two),
                       "same": config(4, teachers=two)}.items():
        log_trial(uri, parent, trial, cfg, "FINISHED")
    plan = {"one": config(1, teachers=[{"name": "other-teacher"}]),
            "two": config(2, teachers=[two[0]]),
            "tok": config(3, teachers=[two[0], {**two[1], "tokenizer": "another-tok"}]),
            "same": config(4, teachers=two)}
    done, replaced = runs.reconcile_trials(uri, "metadistil", parent, plan)
    assert done == {"same"} and replaced == ["one", "tok", "two"]


def test_parent_and_trial_runs_carry_mlflows_source_tags(tmp_path):
    """mlflow.source.name/type, mlflow.source.git.commit and mlflow.user (MLflow's names, mlflow/utils/mlflow_tags.py),
    which the UI shows as Source, Version and User; and the trial run's name from its tags."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils import mlflow_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = runs.parent_run(uri, "metadistil", SWEEP, "hash", resume=False)
    name = "kd · Teacher→Student · s1"
    logger = MLflowLogger(uri, "metadistil", parent_run_id=parent,
                          tags={runs.ROLE: "trial", runs.TRIAL_ID: "kd__t__s__w0__off__s1", RUN_NAME: name,
                                **runs.source_tags()})
    logger.finish("FINISHED")
    client = MlflowClient(uri)
    commit = runs.git_commit()
    for run_id in (parent, logger.run_id):
        run = client.get_run(run_id)
        tags = run.data.tags
        assert tags[mlflow_tags.MLFLOW_SOURCE_TYPE] == "LOCAL"
        assert tags[mlflow_tags.MLFLOW_SOURCE_NAME].split()[0] == Path(sys.argv[0]).name
        assert tags.get(mlflow_tags.MLFLOW_GIT_COMMIT) == commit
        assert tags[mlflow_tags.MLFLOW_USER] and run.info.user_id == tags[mlflow_tags.MLFLOW_USER]
    assert client.get_run(logger.run_id).info.run_name == name
    assert client.get_run(parent).info.run_name == SWEEP


def test_the_ui_link_opens_the_sweeps_runs_without_credentials(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = runs.parent_run(uri, "metadistil", SWEEP, "hash", resume=False)
    view = runs.runs_view(uri, parent)
    assert view == (f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/#/experiments/1/runs?"
                    "workflowType=machine_learning&searchFilter=tags.%60metadistil.sweep%60%20%3D%20%27resumable%27")
    link = runs.ui_link("https://alice:s3cret@mlflow.example:8443/prefix/", "7", "demo")
    assert link.startswith("https://mlflow.example:8443/prefix/#/experiments/7/runs?workflowType=machine_learning&")
    assert "alice" not in link and "s3cret" not in link


def test_a_sqlite_stores_artifacts_go_next_to_the_database_not_into_the_working_folder(tmp_path, monkeypatch):
    from launcher.tracking import client, experiment_id

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    mlflow_client = client(f"sqlite:///{store}")
    exp = experiment_id(mlflow_client, "my sweeps/v1")
    assert experiment_id(mlflow_client, "my sweeps/v1") == exp
    run = mlflow_client.create_run(exp)
    (tmp_path / "note.txt").write_text("x")
    mlflow_client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert (tmp_path / "store" / "mlartifacts" / "my_sweeps_v1" / run.info.run_id / "artifacts" / "note.txt").is_file()
    assert not (tmp_path / "mlruns").exists()
