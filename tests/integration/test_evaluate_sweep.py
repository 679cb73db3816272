"""`metadistil evaluate --sweep NAME --data FILE`: every saved student of a sweep scored on one labelled file, the
scores logged to the trials' MLflow runs and Table 1 rebuilt on them (a SQLite store, tiny saved models, no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launcher import runs
from launcher.cli import main
from launcher.report import BLOCKS
from launcher.tracking import MLflowLogger
from trainer.data import synthetic_sentiment

SWEEP = "rescored"
METRIC = "eval_heldout_accuracy"


def _reference_accuracy(folder: str, texts: list[str], labels: list[int]) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        predicted = [model(**tok(t, return_tensors="pt")).logits.argmax().item() for t in texts]
    return sum(p == y for p, y in zip(predicted, labels)) / len(labels)


def _trial(uri, parent, root, trial_id, tags, student, *, keep_folder=True, log_model=False, status="FINISHED",
           task=None):
    """A run as a sweep leaves it: axes as tags, output.dir and data.task as params, the student under output.dir
    (unless it was cleaned away) and, when asked, logged to the run as an MLflow model."""
    out = root / trial_id
    shutil.copytree(student, out / "student")
    logger = MLflowLogger(uri, "metadistil", run_name=trial_id, parent_run_id=parent,
                          tags={runs.ROLE: tags.pop("role", "trial"), runs.TRIAL_ID: trial_id, **tags})
    logger.log_params({"output.dir": str(out), "data.task": task})
    logger.log_metrics({"test_accuracy": 0.5, "test_f1": 0.5, "train_wall_time_s": 10.0}, step=1)
    if log_model:
        logger.log_student(out / "student")
    if not keep_folder:
        shutil.rmtree(out)
    logger.finish(status)
    return logger.run_id


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_dirs):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("rescore")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("metadistil", artifact_location=(root / "artifacts").as_uri())
    parent = runs.parent_run(uri, "metadistil", SWEEP, "hash", resume=False)
    axes = {"teacher_set": "big", "teachers": "Big", "student": "Small", "warmup": "0", "noise": "off"}
    ids = {
        "teacher__big": _trial(uri, parent, root, "teacher__big", {"role": "teacher", "teacher": "Big",
                                                                   "algorithm": "finetune", "seed": "42"},
                               model_dirs["bert"]),
        "kd__s1": _trial(uri, parent, root, "kd__s1", {**axes, "algorithm": "kd", "seed": "1"},
                         model_dirs["distilbert"]),
        # its storage was cleaned: the student comes from the run's logged MLflow model
        "kd__s2": _trial(uri, parent, root, "kd__s2", {**axes, "algorithm": "kd", "seed": "2"},
                         model_dirs["roberta"], keep_folder=False, log_model=True),
        # neither in storage nor in MLflow: skipped, its cell reads failed
        "metadistil__s1": _trial(uri, parent, root, "metadistil__s1", {**axes, "algorithm": "metadistil",
                                                                       "seed": "1"},
                                 model_dirs["bert4"], keep_folder=False),
        "metadistil__s2": _trial(uri, parent, root, "metadistil__s2", {**axes, "algorithm": "metadistil",
                                                                       "seed": "2"},
                                 model_dirs["bert4"], status="FAILED"),
    }
    data = synthetic_sentiment(40, 3)["train"]
    pd.DataFrame({"text": data.texts, "y": data.labels}).to_csv(root / "heldout.csv", index=False)
    expected = {"teacher__big": _reference_accuracy(model_dirs["bert"], data.texts, data.labels),
                "kd__s1": _reference_accuracy(model_dirs["distilbert"], data.texts, data.labels),
                "kd__s2": _reference_accuracy(model_dirs["roberta"], data.texts, data.labels)}
    return {"uri": uri, "parent": parent, "root": root, "ids": ids, "data": root / "heldout.csv",
            "expected": expected, "client": MlflowClient(uri)}


def test_every_student_is_scored_logged_and_tabled(sweep, tmp_path, capsys):
    out = tmp_path / "reports"
    code = main(["evaluate", "--sweep", SWEEP, "--data", str(sweep["data"]), "--text-column", "text",
                 "--label-column", "y", "--tracking-uri", sweep["uri"], "--out", str(out),
                 "--json", str(tmp_path / "scores.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected, client = sweep["expected"], sweep["client"]

    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["metric"] == METRIC and saved["examples"] == 40
    assert saved["scores"] == pytest.approx(expected)
    assert set(saved["skipped"]) == {"metadistil__s1", "metadistil__s2"}
    assert "neither in the sweep's storage" in saved["skipped"]["metadistil__s1"]
    for trial, accuracy in expected.items():  # logged to the attempt's own run, with the file it was scored on
        run = client.get_run(sweep["ids"][trial])
        assert run.data.metrics[METRIC] == pytest.approx(accuracy)
        assert run.data.tags[f"{METRIC}.data"] == str(sweep["data"])
    assert METRIC not in client.get_run(sweep["ids"]["metadistil__s1"]).data.metrics
    assert "[2/4] kd__s1: " in captured.err and "[4/4] metadistil__s1: skipped" in captured.err

    report = (out / "eval_heldout" / "report.md").read_text()
    assert captured.out.startswith(report + "\nscored 3 students on 40 examples")
    assert report.startswith(f"# Sweep {SWEEP}: experimental results, accuracy on heldout.csv (40 examples)")
    kd = sorted(100 * expected[t] for t in ("kd__s1", "kd__s2"))
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert f"| {100 * expected['teacher__big']:.2f} |" in rows["Big"]
    mean, std = sum(kd) / 2, abs(kd[1] - kd[0]) / 2 ** 0.5
    assert f"| {mean:.2f} ± {std:.2f} |" in report.split(f"*{BLOCKS[2]}*")[1].split("*")[0]
    assert "| failed |" in report.split(f"*{BLOCKS[3]}*")[1]
    artifacts = {f.path for f in client.list_artifacts(sweep["parent"], "report/eval_heldout")}
    assert artifacts == {f"report/eval_heldout/{n}" for n in ("report.md", "report.csv", "report.png",
                                                              "report_cost.png")}


def test_bad_sweep_inputs_are_one_line_errors(sweep, tmp_path, model_dirs, capsys):
    base = ["evaluate", "--data", str(sweep["data"]), "--text-column", "text", "--label-column", "y",
            "--tracking-uri", sweep["uri"], "--out", str(tmp_path), "--no-attach"]
    cases = [
        (["--sweep", "nope"], "--sweep: no sweep 'nope' found"),
        (["--sweep", SWEEP, "--name", "!!"], "--name: '!!' has no letter or digit"),
        (["--sweep", SWEEP, "--experiment", "other"], "experiment 'other' does not exist"),
        (["--sweep", SWEEP, "--json", str(tmp_path / "missing" / "x.json")], "--json: folder"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (extra, err)
    model = ["evaluate", "--model", model_dirs["bert"], "--data", str(sweep["data"])]
    for extra, message in [(["--name", "x"], "--name: only with --sweep"),
                           (["--tracking-uri", sweep["uri"]], "--tracking-uri: only with --sweep")]:
        assert main([*model, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (extra, err)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,y\nfine,0.5\n")
    assert main([*base[:1], "--data", str(bad), *base[3:], "--sweep", SWEEP]) == 2
    assert "--label-column" in capsys.readouterr().err
    assert not (Path(tmp_path) / "eval_bad").exists()


def test_trials_with_a_task_are_scored_by_its_metrics(tmp_path, tokenizers, capsys):
    """An MRPC sweep: the pairs are read as the task reads them, and F1 and accuracy (scikit-learn's, on the
    students' own predictions of each pair) logged to each run; Table 1 is built on F1, MRPC's main metric."""
    from mlflow.tracking import MlflowClient
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import DistilBertForSequenceClassification

    import tiny

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("metadistil", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = runs.parent_run(uri, "metadistil", "mrpc", "hash", resume=False)
    axes = {"teacher_set": "big", "teachers": "Big", "student": "Small", "warmup": "0", "noise": "off",
            "algorithm": "kd"}
    students = {}
    for seed in (1, 2):  # wide initial weights: both classes are predicted, F1 is neither 0 nor 1
        config = tiny.tiny_distilbert(tokenizers["wordpiece_cased"]).config
        config.initializer_range = 0.5
        torch.manual_seed(seed)
        students[f"kd__s{seed}"] = tiny.save(DistilBertForSequenceClassification(config),
                                             tokenizers["wordpiece_cased"], tmp_path / f"model{seed}")
        _trial(uri, parent, tmp_path / "trials", f"kd__s{seed}", {**axes, "seed": str(seed)},
               students[f"kd__s{seed}"], task="mrpc")
    texts = synthetic_sentiment(60, 1, seed=4)["train"].texts
    firsts, seconds, labels = texts[:30], texts[30:], [i % 2 for i in range(30)]
    data = tmp_path / "dev.tsv"
    data.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" +
                    "".join(f"{y}\t{i}\t{i}\t{a}\t{b}\n" for i, (a, b, y) in enumerate(zip(firsts, seconds, labels))))
    expected = {}
    for trial, folder in students.items():
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            predicted = [model(**tok(a, b, return_tensors="pt")).logits.argmax().item()
                         for a, b in zip(firsts, seconds)]
        expected[trial] = {"f1": f1_score(labels, predicted), "accuracy": accuracy_score(labels, predicted)}
    base = ["evaluate", "--sweep", "mrpc", "--data", str(data), "--tracking-uri", uri, "--out", str(tmp_path / "r")]
    assert main([*base, "--text-column", "s"]) == 2
    assert "--text-column: is fixed by the trials' data.task mrpc" in capsys.readouterr().err
    code = main([*base, "--json", str(tmp_path / "scores.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["metric"] == "eval_dev_f1" and saved["prefix"] == "eval_dev_"
    assert {t: list(m) for t, m in saved["metrics"].items()} == {t: ["f1", "accuracy"] for t in expected}
    assert all(saved["metrics"][t] == pytest.approx(m) for t, m in expected.items())
    assert saved["scores"] == pytest.approx({t: m["f1"] for t, m in expected.items()})
    client = MlflowClient(uri)
    for run in client.search_runs([client.get_experiment_by_name("metadistil").experiment_id],
                                  filter_string=f"tags.`{runs.ROLE}` = 'trial'"):
        trial = run.data.tags[runs.TRIAL_ID]
        assert run.data.metrics["eval_dev_f1"] == pytest.approx(expected[trial]["f1"])
        assert run.data.metrics["eval_dev_accuracy"] == pytest.approx(expected[trial]["accuracy"])
    f1s = sorted(100 * m["f1"] for m in expected.values())
    report = (tmp_path / "r" / "eval_dev" / "report.md").read_text()
    assert report.startswith("# Sweep mrpc: experimental results, F1 on dev.tsv (30 examples)")
    assert f"| {sum(f1s) / 2:.2f} ± {abs(f1s[1] - f1s[0]) / 2 ** 0.5:.2f} |" in report
