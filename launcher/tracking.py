"""MLflow for train, sweep, report and evaluate: where it is (``resolve_tracking``), a client that keeps credentials
out of MLflow's messages (``client``), the trainer logger (one run per trial, through MlflowClient, no global run
state), and a logged student found again from its URI (``local_model_folder``).
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload
from urllib.parse import unquote, urlsplit, urlunsplit

from trainer.config import ConfigError, TrialConfig
from trainer.logging import MASK, DataSplit, is_secret_name, redact_text, redact_uri

_BATCH = 100  # MLflow's limit of params or metrics per log_batch request
_USER, _PASSWORD, _TOKEN = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
REACH_TIMEOUT_S = 5.0  # per connection attempt: an unreachable server fails the command within seconds
STUDENT_MODEL = "student"  # the name of a trial run's logged model, by which the sweep finds it to register it
_STUDENT_CARD = """---
library_name: transformers
pipeline_tag: text-classification
---
# metadistil student

A text classifier trained by a metadistil trial (fine-tuning, KD or MetaDistil); its run holds the config and metrics.
"""


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
    """The experiment's id, created if needed. In a SQLite store its artifacts (logged students, reports) go next to
    the database, in ``mlartifacts/<name>``: MLflow's default is ``./mlruns`` under whatever folder a run starts in."""
    found = mlflow_client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    store = str(mlflow_client.tracking_uri)
    location = None
    if store.startswith("sqlite:///"):
        folder = Path(store.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", name)
        location = folder.as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


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

    def log_artifacts(self, files: list[Path], name: str) -> None:
        for file in files:
            self.client.log_artifact(self.run_id, str(file), artifact_path=name)

    def log_datasets(self, splits: list[DataSplit]) -> None:
        """Each split as a dataset input of the run (the runs list's Dataset column): its name and digest, its size
        as the profile's ``num_rows``, its source with any credentials masked, and its context tag."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for split in splits:
            described = MetaDataset(_dataset_source(split), name=split.name, digest=split.digest).to_dict()
            dataset = Dataset(**described, profile=json.dumps({"num_rows": split.size}))
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, split.context)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_student(self, folder: Path) -> None:
        """The student as the run's logged model ``STUDENT_MODEL``: MLflow's transformers flavour for the
        text-classification task, so that its ``models:/`` URI loads as a pipeline or as model and tokenizer.

        ``mlflow.transformers.log_model`` would log through the global tracking URI and active run, so the steps it
        takes are taken here on this logger's client. The pipeline is built from an absolute folder, whose name is not
        a hub repository id: MLflow then looks up no model card or license on the hub (the card is written here).
        """
        from importlib.metadata import version

        import mlflow.transformers
        from huggingface_hub import ModelCard
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model
        from transformers import pipeline

        experiment = self.client.get_run(self.run_id).info.experiment_id
        model = self.client.create_logged_model(experiment, name=STUDENT_MODEL, source_run_id=self.run_id)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                saved = Path(tmp, "model")
                source = str(Path(folder).resolve())
                mlflow.transformers.save_model(
                    pipeline("text-classification", model=source, tokenizer=source, device="cpu"), saved,
                    model_card=ModelCard(_STUDENT_CARD),
                    # MLflow's defaults pin torchvision, which the project does not install, and infer the rest by
                    # loading the model in a subprocess (seconds); a local version (+cpu) is not on PyPI.
                    pip_requirements=[f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers")],
                    mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id,
                                       run_id=self.run_id, model_id=model.model_id))
                self.client.log_model_artifacts(model.model_id, str(saved))
        except Exception:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])

    def finish(self, status: str, error: str | None = None) -> None:
        if error:
            self.client.set_tag(self.run_id, "error", redact_text(error)[:5000])
        self.client.set_terminated(self.run_id, status)


def _dataset_source(split: DataSplit):
    from mlflow.data.sources import CodeDatasetSource, HuggingFaceDatasetSource, LocalArtifactDatasetSource

    source = redact_text(split.source)
    if split.source_type == "local":
        return LocalArtifactDatasetSource(source)
    if split.source_type == "hub":
        return HuggingFaceDatasetSource(source, config_name=split.subset)
    return CodeDatasetSource({"generator": source})


def local_model_folder(model: str, tracking_uri: str | None = None) -> str:
    """``evaluate --model``: a local folder as it is; an MLflow model URI (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``models:/<model id>``, ``runs:/<run id>/<path>``) downloaded from the tracking
    store (``tracking_uri``, else ``resolve_tracking``: MLFLOW_TRACKING_URI, else ./mlflow.db) to a temporary folder
    removed at exit.

    Returns the Hugging Face model folder inside the download: the shallowest folder holding ``config.json``, with the
    tokenizer files of the shallowest folder holding ``tokenizer_config.json`` copied in where they are elsewhere (the
    transformers flavour keeps them in ``components/tokenizer``).
    """
    if not model.startswith(("models:/", "runs:/")):
        return model
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        uri = tracking_uri or resolve_tracking(None, "", default=local_store()).uri
    except ConfigError as err:
        raise ConfigError(f"--model {model}: {err}") from None
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--model {model}: there is no MLflow store at {uri}; set MLFLOW_TRACKING_URI to the store "
                          f"that holds the model")
    mlflow_client = client(uri)
    target = Path(tempfile.mkdtemp(prefix="metadistil-model-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    try:
        location = model if model.startswith("runs:/") else _model_location(mlflow_client, model)
        root = Path(download_artifacts(artifact_uri=location, dst_path=str(target),
                                       tracking_uri=mlflow_client.tracking_uri))
    except MlflowException as err:
        raise ConfigError(f"--model {model}: {redact_text(err.message.splitlines()[0])} (MLflow store "
                          f"{redact_uri(uri)})") from None
    configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    if not configs:
        raise ConfigError(f"--model {model}: holds no Hugging Face model (no config.json among its files)")
    folder = configs[0].parent
    tokenizers = sorted(root.rglob("tokenizer_config.json"), key=lambda p: (len(p.parts), str(p)))
    if tokenizers and not (folder / "tokenizer_config.json").is_file():
        shutil.copytree(tokenizers[0].parent, folder, dirs_exist_ok=True)
    return str(folder)


def _model_location(mlflow_client, uri: str) -> str:
    """Where the artifacts of a ``models:/`` URI are, looked up on this client's store (MLflow's own lookup reads the
    global registry URI)."""
    name, _, version = uri.removeprefix("models:/").rstrip("/").partition("/")
    if "@" in name:
        name, _, alias = name.partition("@")
        version = mlflow_client.get_model_version_by_alias(name, alias).version
    elif not version:  # models:/<model id>, a logged model
        return mlflow_client.get_logged_model(name).artifact_location
    return mlflow_client.get_model_version_download_uri(name, version)
