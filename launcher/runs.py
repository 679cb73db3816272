"""MLflow bookkeeping of a sweep: one parent run per sweep, one child run per trial, found again on retry/resume."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from launcher.tracking import client as mlflow_client
from launcher.tracking import experiment_id, param_values
from trainer.config import TrialConfig, flatten

ROLE, SWEEP, TRIAL_ID, CONFIG_HASH = "metadistil.role", "metadistil.sweep", "metadistil.trial_id", \
    "metadistil.config_hash"
PREVIOUS_HASH = "metadistil.previous_config_hash"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def parent_run(uri: str, experiment: str, sweep: str, config_hash: str, resume: bool) -> str:
    """The sweep's parent run: on resume the latest one of this sweep, else a new one.

    A resume continues the parent even when the plan's config hash changed since (a new default, an added seed): which
    of its trials still count as finished is decided trial by trial (``reconcile_trials``). The parent then carries the
    new hash, and the one it had before under ``metadistil.previous_config_hash``.
    """
    client = mlflow_client(uri)
    exp = experiment_id(client, experiment)
    if resume:
        found = client.search_runs([exp], f"tags.`{SWEEP}` = '{sweep}' and tags.`{ROLE}` = 'sweep'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run = found[0]
            if run.data.tags.get(CONFIG_HASH) != config_hash:
                client.set_tag(run.info.run_id, PREVIOUS_HASH, run.data.tags.get(CONFIG_HASH, ""))
                client.set_tag(run.info.run_id, CONFIG_HASH, config_hash)
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    tags = {SWEEP: sweep, ROLE: "sweep", CONFIG_HASH: config_hash}
    commit = git_commit()
    if commit:
        tags["metadistil.git_commit"] = commit
    return client.create_run(exp, run_name=sweep, tags=tags).info.run_id


def child_run(uri: str, experiment: str, parent_id: str, trial: str) -> str | None:
    """The run already logged for this trial under this parent (a retry or a resume reattaches to it)."""
    client = mlflow_client(uri)
    found = client.search_runs([experiment_id(client, experiment)],
                               f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TRIAL_ID}` = '{trial}'",
                               max_results=2)
    return found[0].info.run_id if found else None


def reconcile_trials(uri: str, experiment: str, parent_id: str,
                     configs: dict[str, TrialConfig]) -> tuple[set[str], list[str]]:
    """For a resume: the trials whose run under the parent FINISHED with the config they have now, and the trials
    whose run logged another config.

    Configs are compared through the params the run logged (all but ``tracking.*``, which says only where it is
    logged). A run of another config is deleted (MLflow keeps deleted runs restorable: ``mlflow runs restore``), so its
    trial runs again and gets a fresh run; its checkpoint, keyed by the same config, is not continued either.
    """
    client = mlflow_client(uri)
    found = client.search_runs([experiment_id(client, experiment)], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                               max_results=10_000)
    done, replaced = set(), []
    for run in found:
        trial = run.data.tags.get(TRIAL_ID)
        if trial not in configs:
            continue
        if _config_params(run.data.params) == _config_params(param_values(flatten(configs[trial]))):
            if run.info.status == "FINISHED":
                done.add(trial)
        else:
            client.set_tag(run.info.run_id, "metadistil.replaced", "the trial's config changed before a --resume")
            client.delete_run(run.info.run_id)
            replaced.append(trial)
    return done, sorted(replaced)


def _config_params(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if not k.startswith("tracking.")}


def end_parent(uri: str, parent_id: str, failed: int, phases: dict[str, float]) -> None:
    from mlflow.entities import Metric
    client = mlflow_client(uri)
    client.set_tag(parent_id, "metadistil.failed_trials", str(failed))
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, v, now, 0) for k, v in phases.items()])
    client.set_terminated(parent_id, "FINISHED" if failed == 0 else "FAILED")


def register_best_student(uri: str, experiment: str, parent_id: str, sweep: str) -> tuple[str, str] | None:
    """Register the student of the sweep's best trial (highest validation accuracy; test accuracy stays unseen by the
    choice) as a new version of the registered model ``metadistil-<sweep>``; return (trial id, version)."""
    client = mlflow_client(uri)
    trials = client.search_runs([experiment_id(client, experiment)],
                                f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{ROLE}` = 'trial' "
                                "and attributes.status = 'FINISHED'", max_results=10_000)
    scored = [r for r in trials if "best_val_accuracy" in r.data.metrics]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r.data.metrics["best_val_accuracy"], r.data.tags[TRIAL_ID]))
    name = f"metadistil-{sweep}"
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=f"Best student of the metadistil sweep {sweep!r}, "
                                                         "chosen by validation accuracy.")
    client.set_tag(parent_id, "metadistil.best_trial", best.data.tags[TRIAL_ID])
    already = client.search_model_versions(f"name = '{name}' and run_id = '{best.info.run_id}'")
    if already:  # a resumed sweep whose best trial did not change
        return best.data.tags[TRIAL_ID], already[0].version
    metrics = best.data.metrics
    version = client.create_model_version(
        name, source=f"{best.info.artifact_uri}/trial/student", run_id=best.info.run_id,
        tags={TRIAL_ID: best.data.tags[TRIAL_ID], "best_val_accuracy": f"{metrics['best_val_accuracy']:.4f}",
              "test_accuracy": f"{metrics.get('test_accuracy', float('nan')):.4f}", SWEEP: sweep})
    return best.data.tags[TRIAL_ID], version.version
