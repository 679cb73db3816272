"""launcher.runs: what a resumed sweep continues, in a temporary SQLite MLflow store (no Ray, no training)."""

from __future__ import annotations

import pytest

from launcher import runs
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
