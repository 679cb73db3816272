"""MLflow bookkeeping of a sweep: one parent run per sweep, one child run per trial, found again on retry/resume."""

from __future__ import annotations

import functools
import getpass
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from launcher.identity import CONFIG_HASH, PREVIOUS_HASH, ROLE, SWEEP, TRIAL_ID
from launcher.tracking import STUDENT_MODEL, experiment_id, param_values
from launcher.tracking import client as mlflow_client
from trainer.config import TrialConfig, flatten
from trainer.logging import redact_text
from trainer.tasks import METRIC_NAMES, TITLES, main_metric


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.cache
def source_tags() -> dict[str, str]:
    """MLflow's own source tags, which its UI shows as a run's Source, Version and User: the command that started
    the sweep (as ``mlflow.start_run`` would name it, but with its arguments), the project's git commit, the user.
    Computed once, in the driver: a trial's Ray worker would name Ray's worker script instead."""
    from mlflow.utils.credentials import read_mlflow_creds
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    command = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "<console>", *sys.argv[1:]])
    try:
        user = read_mlflow_creds().username or getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    tags = {MLFLOW_SOURCE_NAME: redact_text(command)[:500], MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: user}
    commit = git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


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
    tags = {SWEEP: sweep, ROLE: "sweep", CONFIG_HASH: config_hash, **source_tags()}
    return client.create_run(exp, run_name=sweep, tags=tags).info.run_id


def runs_view(uri: str, parent_id: str) -> str:
    """Where to look at the sweep's runs in the MLflow UI (``ui_link``)."""
    parent = mlflow_client(uri).get_run(parent_id)
    return ui_link(uri, parent.info.experiment_id, parent.data.tags[SWEEP])


def ui_link(uri: str, experiment: str, sweep: str) -> str:
    """The MLflow UI's runs view of an experiment, filtered to the sweep's runs and on the UI's machine-learning side
    (else it opens on whichever side the browser used last, GenAI at first: MLflow 3's UI ignores the experiment's
    ``mlflow.experimentKind`` tag). For a local store, the command that serves the UI first."""
    query = "workflowType=machine_learning&searchFilter=" + quote(f"tags.`{SWEEP}` = '{sweep}'", safe="")
    path = f"/#/experiments/{experiment}/runs?{query}"
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        netloc = parts.netloc.rpartition("@")[2]  # no credentials in a link
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")) + path
    return f"mlflow ui --backend-store-uri {redact_text(uri)}, then http://127.0.0.1:5000{path}"


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


BEST_ALIAS = "best"  # models:/metadistil-<sweep>@best: the registered version of the best student


def best_model_name(sweep: str, task: str | None = None) -> str:
    """The registered model of a sweep's best student: ``metadistil-<sweep>``, one per task (``-<task>``) in a sweep
    over several tasks, whose scores do not compare across tasks."""
    return f"metadistil-{sweep}" + (f"-{task}" if task else "")


def register_best_student(uri: str, experiment: str, parent_id: str, sweep: str, task: str | None = None,
                          name: str | None = None) -> tuple[str, str] | None:
    """Register the logged student model of the sweep's best trial of ``task`` (its ``data.task``; None: trials
    without a task) by the task's main validation metric (``best_val_accuracy``, ``best_val_mcc``...; test scores
    stay unseen by the choice) as a version of the registered model ``name`` (default ``best_model_name``), and point
    its alias ``best`` at that version (``models:/<name>@best``); return (trial id, version).

    A resumed sweep whose best trial did not change keeps its version. None when no trial finished with a score, or,
    with a warning, when the best trial's run has no logged student (a run logged before students were models).
    """
    client = mlflow_client(uri)
    exp = experiment_id(client, experiment)
    name = name or best_model_name(sweep)
    key = f"best_val_{main_metric(task)}"
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{ROLE}` = 'trial' "
                                "and attributes.status = 'FINISHED'", max_results=10_000)
    # a param logs None as "None"
    scored = [r for r in trials if key in r.data.metrics and r.data.params.get("data.task", "None") == str(task)]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r.data.metrics[key], r.data.tags[TRIAL_ID]))
    client.set_tag(parent_id, "metadistil.best_trial" + ("" if name == best_model_name(sweep) else f".{task}"),
                   best.data.tags[TRIAL_ID])
    already = client.search_model_versions(f"name = '{name}' and run_id = '{best.info.run_id}'")
    version = already[0].version if already else _register_student(client, exp, best, name, sweep, task)
    if version is None:
        return None
    client.set_registered_model_alias(name, BEST_ALIAS, str(version))
    return best.data.tags[TRIAL_ID], str(version)


def _register_student(client, exp: str, run, name: str, sweep: str, task: str | None) -> str | None:
    """A new version of ``name`` from the run's newest READY student model, linked to it both ways as
    ``mlflow.register_model`` links them; None, with a warning, when the run has none."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    trial, run_id = run.data.tags[TRIAL_ID], run.info.run_id
    logged = client.search_logged_models([exp], f"source_run_id = '{run_id}' AND name = '{STUDENT_MODEL}'",
                                         order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    # Status is checked here: the SQL store compares a status filter with the number it stores, matching nothing.
    student = next((m for m in logged if m.status == LoggedModelStatus.READY), None)
    if student is None:
        warnings.warn(f"best trial {trial}: its run {run_id} has no logged student model; nothing registered as "
                      f"{name}", stacklevel=3)
        return None
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=f"Best student of the metadistil sweep {sweep!r}"
                                       + (f" on {TITLES[task]}" if task else "")
                                       + f", chosen by validation {METRIC_NAMES[main_metric(task)]}.")
    metrics, metric = run.data.metrics, main_metric(task)
    # The model's artifact location rather than models:/<model id>, which the SQL registry store looks up on the
    # process's global tracking URI instead of this client's.
    version = client.create_model_version(
        name, source=student.artifact_location, run_id=run_id, model_id=student.model_id,
        tags={TRIAL_ID: trial, f"best_val_{metric}": f"{metrics[f'best_val_{metric}']:.4f}",
              f"test_{metric}": f"{metrics.get(f'test_{metric}', float('nan')):.4f}", SWEEP: sweep}).version
    linked = [*json.loads(student.tags.get(MLFLOW_MODEL_VERSIONS, "[]")), {"name": name, "version": str(version)}]
    client.set_logged_model_tags(student.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
    return str(version)
