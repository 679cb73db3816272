"""Trial students as MLflow models: each trial run's student logged with the transformers flavour, the sweep's best
registered with the alias ``best`` and loadable from ``models:/`` URIs, and ``metadistil evaluate`` on such URIs
(a temporary SQLite store, tiny models, no Ray, no training)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launcher import runs
from launcher.cli import main
from launcher.tracking import STUDENT_MODEL, MLflowLogger
from trainer.data import synthetic_sentiment

SWEEP = "x"
MODEL = f"metadistil-{SWEEP}"
SENTENCES = ["a good and moving film", "this was a dull , awful movie"]


def store(root: Path) -> str:
    """A SQLite store whose artifacts stay under ``root`` (MLflow's default is ./mlruns in the working folder)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("metadistil", artifact_location=(root / "artifacts").as_uri())
    return uri


def log_trial(uri: str, parent: str, trial: str, accuracy: float, student: str | None, task: str | None = None,
              metric: str = "accuracy") -> str:
    logger = MLflowLogger(uri, "metadistil", run_name=trial, parent_run_id=parent,
                          tags={runs.ROLE: "trial", runs.TRIAL_ID: trial})
    logger.log_params({"data.task": task})
    logger.log_metrics({f"best_val_{metric}": accuracy, f"test_{metric}": 0.5}, step=10)
    if student:
        logger.log_student(Path(student))
    logger.finish("FINISHED")
    return logger.run_id


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_dirs):
    """A sweep of two finished trials with logged students, the BERT one best on validation, and its registration."""
    root = tmp_path_factory.mktemp("sweep")
    uri = store(root)
    parent = runs.parent_run(uri, "metadistil", SWEEP, "hash", resume=False)
    started = time.perf_counter()
    run_ids = {"weaker": log_trial(uri, parent, "weaker", 0.6, model_dirs["distilbert"]),
               "best": log_trial(uri, parent, "best", 0.8, model_dirs["bert"])}
    logged_s = (time.perf_counter() - started) / 2
    registered = runs.register_best_student(uri, "metadistil", parent, SWEEP)
    return SimpleNamespace(uri=uri, parent=parent, run_ids=run_ids, registered=registered, logged_s=logged_s)


def logged_student(client, run_id: str):
    outputs = client.get_run(run_id).outputs.model_outputs
    assert len(outputs) == 1, "one logged model per trial run"
    return client.get_logged_model(outputs[0].model_id)


def test_each_trial_run_has_its_student_as_a_transformers_model(sweep):
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.uri)
    for run_id in sweep.run_ids.values():
        model = logged_student(client, run_id)
        assert model.name == STUDENT_MODEL and model.source_run_id == run_id and model.status == LoggedModelStatus.READY
        folder = Path(url2pathname(urlsplit(model.artifact_location).path))
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        assert mlmodel["flavors"]["transformers"]["task"] == "text-classification"
        assert "python_function" in mlmodel["flavors"] and mlmodel["model_id"] == model.model_id
        assert {line.split("==")[0] for line in (folder / "requirements.txt").read_text().split()} >= \
            {"torch", "transformers"}
        assert not list(client.list_artifacts(run_id)), "the student is the run's model, not a copy in its artifacts"
    print(f"log_student: {sweep.logged_s:.1f} s per tiny student")


def test_the_best_student_is_registered_as_best_and_loads_with_its_tokenizer(sweep, model_dirs, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = MlflowClient(sweep.uri)
    assert sweep.registered == ("best", "1")
    version = client.get_model_version_by_alias(MODEL, runs.BEST_ALIAS)
    assert version.version == 1 and version.run_id == sweep.run_ids["best"]
    student = logged_student(client, sweep.run_ids["best"])
    assert json.loads(student.tags[MLFLOW_MODEL_VERSIONS]) == [{"name": MODEL, "version": "1"}]

    original = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["bert"])
    with torch.no_grad():
        expected = [original.config.id2label[original(**tokenizer(s, return_tensors="pt")).logits.argmax().item()]
                    for s in SENTENCES]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.uri)
    started = time.perf_counter()
    components = mlflow.transformers.load_model(f"models:/{MODEL}@best", return_type="components")
    loaded_s = time.perf_counter() - started
    assert components["tokenizer"](SENTENCES[0])["input_ids"] == tokenizer(SENTENCES[0])["input_ids"]
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in components["model"].state_dict().items())
    predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}@best").predict(SENTENCES)
    assert list(predicted["label"]) == expected
    print(f"load_model(models:/{MODEL}@best): {loaded_s:.1f} s")


def test_a_resume_keeps_the_version_and_a_better_trial_moves_the_alias(sweep, model_dirs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.uri)
    assert runs.register_best_student(sweep.uri, "metadistil", sweep.parent, SWEEP) == ("best", "1")
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1, "a resume registered the student again"

    parent = runs.parent_run(sweep.uri, "metadistil", "y", "hash", resume=False)
    log_trial(sweep.uri, parent, "first", 0.7, model_dirs["bert4"])
    assert runs.register_best_student(sweep.uri, "metadistil", parent, "y") == ("first", "1")
    better = log_trial(sweep.uri, parent, "better", 0.9, model_dirs["bert"])
    assert runs.register_best_student(sweep.uri, "metadistil", parent, "y") == ("better", "2")
    assert client.get_model_version_by_alias("metadistil-y", "best").run_id == better


def test_a_best_trial_without_a_logged_student_registers_nothing_and_says_so(sweep):
    parent = runs.parent_run(sweep.uri, "metadistil", "old", "hash", resume=False)
    run_id = log_trial(sweep.uri, parent, "logged-before-models", 0.9, student=None)
    with pytest.warns(UserWarning, match=f"best trial logged-before-models: its run {run_id} has no logged student"):
        assert runs.register_best_student(sweep.uri, "metadistil", parent, "old") is None


def test_a_sweep_over_tasks_registers_each_tasks_best_by_its_main_metric(sweep, model_dirs):
    from mlflow.tracking import MlflowClient

    parent = runs.parent_run(sweep.uri, "metadistil", "glue", "hash", resume=False)
    log_trial(sweep.uri, parent, "cola-low", 0.2, model_dirs["bert4"], "cola", "mcc")
    cola = log_trial(sweep.uri, parent, "cola-high", 0.3, model_dirs["bert"], "cola", "mcc")
    stsb = log_trial(sweep.uri, parent, "stsb-only", 0.1, model_dirs["bert"], "stsb", "pearson")
    assert runs.register_best_student(sweep.uri, "metadistil", parent, "glue", "cola",
                                      runs.best_model_name("glue", "cola")) == ("cola-high", "1")
    assert runs.register_best_student(sweep.uri, "metadistil", parent, "glue", "stsb",
                                      runs.best_model_name("glue", "stsb")) == ("stsb-only", "1")
    assert runs.register_best_student(sweep.uri, "metadistil", parent, "glue", "rte") is None
    client = MlflowClient(sweep.uri)
    version = client.get_model_version_by_alias("metadistil-glue-cola", "best")
    assert version.run_id == cola and version.tags["best_val_mcc"] == "0.3000"
    assert client.get_model_version_by_alias("metadistil-glue-stsb", "best").run_id == stsb
    assert "validation Pearson correlation" in client.get_registered_model("metadistil-glue-stsb").description
    assert client.get_run(parent).data.tags["metadistil.best_trial.cola"] == "cola-high"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    data = synthetic_sentiment(40, 1)["train"]
    path = tmp_path_factory.mktemp("data") / "held_out.csv"
    pd.DataFrame({"sentence": data.texts, "label": data.labels}).to_csv(path, index=False)
    return str(path)


def evaluate(model: str, data: str, capsys) -> tuple[int, str, str]:
    code = main(["evaluate", "--model", model, "--data", data])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("uri", [f"models:/{MODEL}@best", f"models:/{MODEL}/1", "runs:/<best>/student"])
def test_evaluate_scores_a_model_uri_as_its_folder(uri, sweep, model_dirs, held_out, monkeypatch, capsys):
    code, from_folder, _ = evaluate(model_dirs["bert"], held_out, capsys)
    assert code == 0 and from_folder.startswith("accuracy ")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.uri)
    code, from_uri, err = evaluate(uri.replace("<best>", sweep.run_ids["best"]), held_out, capsys)
    assert code == 0, err
    assert from_uri.splitlines()[-1] == from_folder.splitlines()[-1]


@pytest.fixture()
def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("uri, problem", [
    ("models:/metadistil-none@best", "Registered Model with name=metadistil-none not found"),
    (f"models:/{MODEL}@worst", "alias worst not found"),
    (f"models:/{MODEL}/99", "version=99) not found"),
])
def test_evaluate_names_a_model_uri_the_store_does_not_have(uri, problem, sweep, held_out, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.uri)
    code, _, err = evaluate(uri, held_out, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --model {uri}: ") and problem in err


def test_evaluate_fails_fast_on_an_unreachable_or_missing_store(held_out, dead_port, tmp_path, monkeypatch, capsys):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:pw-123@127.0.0.1:{dead_port}")
    started = time.perf_counter()
    code, _, err = evaluate(f"models:/{MODEL}@best", held_out, capsys)
    assert code == 2 and time.perf_counter() - started < 30
    assert err.startswith(f"error: --model models:/{MODEL}@best: MLflow tracking server http://***@127.0.0.1:"
                          f"{dead_port} is unreachable") and "pw-123" not in err and len(err.splitlines()) == 1

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    code, _, err = evaluate(f"models:/{MODEL}@best", held_out, capsys)
    assert code == 2 and f"there is no MLflow store at sqlite:///{tmp_path / 'mlflow.db'}" in err
    assert not (tmp_path / "mlflow.db").exists(), "evaluate created an empty store"
