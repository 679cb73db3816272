"""MLflow for train, sweep and report: where it is (``resolve_tracking``), a client that keeps credentials out of
MLflow's messages (``client``), and the trainer logger (one run per trial, through MlflowClient, no global run state).
"""

from __future__ import annotations

import base64
import http.client
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload
from urllib.parse import unquote, urlsplit, urlunsplit

from trainer.config import ConfigError, TrialConfig
from trainer.logging import MASK, is_secret_name, redact_text, redact_uri

_BATCH = 100  # MLflow's limit of params or metrics per log_batch request
_USER, _PASSWORD, _TOKEN = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
REACH_TIMEOUT_S = 5.0  # per connection attempt: an unreachable server fails the command within seconds


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str


def redact(key: str, value: Any) -> str:
    """A param or tag as it may be logged: ``***`` for a key named like a credential (``is_secret_name``: password,
    api_key, access_key, hf_token, ... but not tokenizer, token_cache or the noise word ``noise.*.token``), else the
    value with credentials in any URI in it masked (``redact_uri``)."""
    return MASK if is_secret_name(key) else redact_text(str(value))


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (redacted, within its 6000-character limit): what a run's logged config reads."""
    return {k: redact(k, v)[:6000] for k, v in params.items()}


def local_store() -> str:
    """The default store of sweep and report: an embedded SQLite database in the working folder."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@overload
def resolve_tracking(configured: str | None, experiment: str, default: str) -> Tracking: ...
@overload
def resolve_tracking(configured: str | None, experiment: str, default: None) -> Tracking | None: ...
def resolve_tracking(configured: str | None, experiment: str, default: str | None) -> Tracking | None:
    """Where train, sweep and report log or read: ``configured`` (the config's ``tracking.mlflow_uri``, or report's
    ``--tracking-uri``) > ``MLFLOW_TRACKING_URI`` > the command's ``default``; None when all are unset (a trial without
    MLflow). An http(s) server must answer first (``check_reachable``), so that a dead one fails the command in
    seconds instead of after MLflow's minutes of retries."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default
    if not uri:
        return None
    check_reachable(uri)
    return Tracking(uri, experiment)


def refuse_config_credentials(configs: list[TrialConfig]) -> None:
    """Credentials never go in ``tracking.mlflow_uri``: a trial writes its config to ``config.yaml`` and logs it as an
    artifact. Refusing them keeps every written config re-runnable as it is, which a masked URI would not be."""
    for cfg in configs:
        uri = cfg.tracking.mlflow_uri
        if uri and redact_uri(uri) != uri:
            raise ConfigError(f"tracking.mlflow_uri: {redact_uri(uri)} carries credentials, which would be saved in "
                              f"the trial's config.yaml; set them in MLFLOW_TRACKING_URI, or in {_USER} and "
                              f"{_PASSWORD}, instead")


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Refuse a tracking server that does not answer ``/health``, naming its redacted URI; a SQLite store gets its
    folder. The probe sends the credentials MLflow would (its user and password variables, else the URI's), since a
    server behind an authenticating proxy answers nothing without them."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not uri.startswith(("http://", "https://")):
        return
    request = urllib.request.Request(_health_url(uri))
    authorization = _authorization(uri)
    if authorization:
        request.add_unredirected_header("Authorization", authorization)  # never forwarded to a redirect's host
    shown = redact_uri(uri)
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:  # before OSError, of which it is one: the server did answer
        if err.code in (401, 403):
            raise ConfigError(f"MLflow tracking server {shown} refused the credentials (HTTP {err.code}); check the "
                              f"user and password in MLFLOW_TRACKING_URI, or {_USER} and {_PASSWORD}") from None
        raise ConfigError(f"MLflow tracking server {shown} is unhealthy (HTTP {err.code} from /health)") from None
    except (OSError, http.client.HTTPException) as err:  # refused, timed out, or not speaking HTTP
        raise ConfigError(f"MLflow tracking server {shown} is unreachable ({redact_text(str(err))}); start it or set "
                          f"MLFLOW_TRACKING_URI") from None


def _health_url(uri: str) -> str:
    parts = urlsplit(uri)
    try:
        host, port = parts.hostname, parts.port  # without user:password@, which urlopen would take as the host
    except ValueError:
        host = None
    if not host:
        raise ConfigError(f"MLflow tracking URI {redact_uri(uri)} is not valid: expected "
                          f"http(s)://[user:password@]host[:port][/path]")
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, f"{netloc}:{port}" if port else netloc, parts.path.rstrip("/") + "/health", "",
                       ""))


def _authorization(uri: str) -> str | None:
    """The Authorization header MLflow's client sends: Basic from its user and password variables, else from the URI,
    else Bearer from MLFLOW_TRACKING_TOKEN."""
    user, password = _credentials(uri)
    if user is not None:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    token = os.environ.get(_TOKEN)
    return f"Bearer {token}" if token else None


def _credentials(uri: str) -> tuple[str | None, str]:
    if os.environ.get(_USER) and os.environ.get(_PASSWORD):
        return os.environ[_USER], os.environ[_PASSWORD]
    userinfo, at, _ = urlsplit(uri).netloc.rpartition("@")
    if not at:
        return None, ""
    user, _, password = userinfo.partition(":")
    return unquote(user), unquote(password)


def client(uri: str):
    """An MlflowClient on ``uri``; for an http(s) server, one whose URI carries no credentials.

    MLflow writes its tracking URI into error messages (``API request to http://user:pw@host/... failed``) and
    prints run links built from it, so user and password move to its own MLFLOW_TRACKING_USERNAME/PASSWORD, in this
    process and those it starts (a local Ray's workers). Variables already set win, as they do in MLflow. A database
    URI keeps its password, which only the database driver reads (and SQLAlchemy masks in its messages).
    """
    from mlflow.tracking import MlflowClient

    userinfo, at, _ = urlsplit(uri).netloc.rpartition("@")
    if not at or not uri.startswith(("http://", "https://")):
        return MlflowClient(uri)
    user, password = _credentials(uri)
    if user is not None:  # always: the URI has a user part (the check is for the type)
        os.environ[_USER], os.environ[_PASSWORD] = user, password
    scheme, _, rest = uri.partition("://")
    return MlflowClient(f"{scheme}://{rest[len(userinfo) + 1:]}")


def experiment_id(mlflow_client, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow_client.create_experiment(name)


class MLflowLogger:
    """Logs one trial to one MLflow run: a new run, or an existing one (``run_id``) when a trial is retried."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        self.client = client(uri)
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
            self.client.set_tag(self.run_id, "error", redact_text(error)[:5000])
        self.client.set_terminated(self.run_id, status)
