"""MLflow as a trainer logger: one run per trial, written through MlflowClient (no global run state)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

_SECRET_IN_URI = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")
_SECRET_KEY = re.compile(r"(token|password|secret|api_key)", re.IGNORECASE)
_BATCH = 100  # MLflow's limit of params or metrics per log_batch request


def redact(key: str, value: Any) -> str:
    """Credentials never reach params or tags: user:password@ in URIs and secret-looking keys are masked."""
    if _SECRET_KEY.search(key):
        return "***"
    return _SECRET_IN_URI.sub(r"\g<scheme>***@", str(value))


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (redacted, within its 6000-character limit): what a run's logged config reads."""
    return {k: redact(k, v)[:6000] for k, v in params.items()}


def tracking_uri(configured: str | None) -> str | None:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


class MLflowLogger:
    """Logs one trial to one MLflow run: a new run, or an existing one (``run_id``) when a trial is retried."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        all_tags = {k: redact(k, v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            for key, value in all_tags.items():
                self.client.set_tag(run_id, key, value)
            return
        self.run_id = self.client.create_run(experiment_id(self.client, experiment), run_name=run_name,
                                             tags=all_tags).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in param_values(params).items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start: start + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[start: start + _BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(key, value))

    def log_artifacts(self, folder: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)

    def finish(self, status: str, error: str | None = None) -> None:
        if error:
            self.client.set_tag(self.run_id, "error", redact("error", error)[:5000])
        self.client.set_terminated(self.run_id, status)
