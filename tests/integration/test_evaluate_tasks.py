"""`metadistil evaluate --model --task`: a GLUE task fixes the columns, the labels and the metrics, on a file or on a
raw GLUE folder's dev file; sentence pairs are tokenized as pairs; the scores are checked against scikit-learn and
scipy on the same predictions, each made by the model's own tokenizer on one example at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    DistilBertForSequenceClassification,
)

import tiny
from launcher.cli import main
from trainer.data import synthetic_sentiment

GLUE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"


def predict(folder: str, firsts: list[str], seconds: list[str] | None, regression: bool = False,
            max_length: int = 128) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for i, first in enumerate(firsts):
            enc = tok(first, seconds[i] if seconds else None, truncation=True, max_length=max_length,
                      return_tensors="pt")
            logits = model(**enc).logits[0]
            out.append(logits[0].item() if regression else logits.argmax().item())
    return out


@pytest.fixture(scope="module")
def regression_model(tmp_path_factory, tokenizers) -> str:
    """A tiny DistilBERT with one output: an STS-B regression head."""
    config = tiny.tiny_distilbert(tokenizers["wordpiece_cased"]).config
    config.num_labels, config.problem_type, config.initializer_range = 1, "regression", 0.5
    torch.manual_seed(3)
    return tiny.save(DistilBertForSequenceClassification(config), tokenizers["wordpiece_cased"],
                     tmp_path_factory.mktemp("models") / "stsb")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizers) -> str:
    """A tiny DistilBERT initialized wide enough to predict both classes (the conftest's predict one class only)."""
    config = tiny.tiny_distilbert(tokenizers["wordpiece_cased"]).config
    config.initializer_range = 0.5
    torch.manual_seed(1)
    return tiny.save(DistilBertForSequenceClassification(config), tokenizers["wordpiece_cased"],
                     tmp_path_factory.mktemp("models") / "distilbert")


@pytest.fixture(scope="module")
def sentences() -> tuple[list[str], list[str]]:
    texts = synthetic_sentiment(60, 1, seed=4)["train"].texts
    return texts[:30], texts[30:]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["evaluate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_pair_task_scores_f1_and_accuracy_of_pairs(tmp_path, classifier, sentences, capsys):
    firsts, seconds = sentences
    labels = [i % 2 for i in range(30)]
    rows = [f"{y}\t{i}\t{i + 100}\t{a}\t{b}" for i, (a, b, y) in enumerate(zip(firsts, seconds, labels))]
    # GLUE's raw MRPC layout: a byte-order mark before the header, the label first
    (tmp_path / "mrpc.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "\n".join(rows) + "\n")
    predicted = predict(classifier, firsts, seconds)
    assert len(set(predicted)) == 2  # both classes predicted: F1 is not a degenerate 0 or 1
    expected = {"f1": f1_score(labels, predicted), "accuracy": accuracy_score(labels, predicted)}

    code, out, err = run(capsys, "--model", classifier, "--data", str(tmp_path / "mrpc.tsv"),
                         "--task", "mrpc", "--json", str(tmp_path / "score.json"))
    assert code == 0, err
    assert out.startswith(f"f1 {expected['f1']:.4f}, accuracy {expected['accuracy']:.4f} on 30 examples")
    saved = json.loads((tmp_path / "score.json").read_text())
    assert saved["metrics"] == pytest.approx(expected) and list(saved["metrics"]) == ["f1", "accuracy"]
    assert saved["accuracy"] == pytest.approx(expected["accuracy"]) and saved["task"] == "mrpc"
    # the same pairs read as single texts score otherwise: the second sentence is really read
    singles = predict(classifier, firsts, None)
    assert singles != predicted


def test_a_custom_pair_file_without_a_task(tmp_path, model_dirs, sentences, capsys):
    firsts, seconds = sentences
    labels = [(i // 3) % 2 for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"q": a, "p": b, "y": y}) + "\n"
                                                  for a, b, y in zip(firsts, seconds, labels)))
    predicted = predict(model_dirs["roberta"], firsts, seconds)
    code, out, err = run(capsys, "--model", model_dirs["roberta"], "--data", str(tmp_path / "pairs.jsonl"),
                         "--text-column", "q", "--text-pair-column", "p", "--label-column", "y")
    assert code == 0, err
    assert out.startswith(f"accuracy {accuracy_score(labels, predicted):.4f} on 30 examples")
    code, _, err = run(capsys, "--model", model_dirs["roberta"], "--data", str(tmp_path / "pairs.jsonl"),
                       "--text-column", "q", "--text-pair-column", "second", "--label-column", "y")
    assert code == 2 and "--text-pair-column: column 'second' not in" in err


@pytest.fixture(scope="module")
def bert_regression_model(tmp_path_factory, tokenizers) -> str:
    """A tiny BERT with one output: it reads the pairs' segment ids too."""
    config = tiny.tiny_bert(tokenizers["wordpiece"], init_std=0.5).config
    config.num_labels, config.problem_type = 1, "regression"
    torch.manual_seed(3)
    return tiny.save(BertForSequenceClassification(config), tokenizers["wordpiece"],
                     tmp_path_factory.mktemp("models") / "stsb-bert")


@pytest.mark.parametrize("kind", ["distilbert", "bert"])
def test_stsb_scores_pearson_and_spearman(tmp_path, regression_model, bert_regression_model, sentences, capsys,
                                          kind):
    """The reference reads the tokenizer's whole encoding: a BERT's segment ids too."""
    regression_model = bert_regression_model if kind == "bert" else regression_model
    firsts, seconds = sentences
    scores = [round(5 * ((i * 7) % 11) / 10, 3) for i in range(30)]
    # the hub's column names, as a jsonl export of nyu-mll/glue stsb has them
    (tmp_path / "stsb.jsonl").write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "label": s}) + "\n"
                                                 for a, b, s in zip(firsts, seconds, scores)))
    predicted = predict(regression_model, firsts, seconds, regression=True)
    expected = {"pearson": pearsonr(predicted, scores)[0], "spearman": spearmanr(predicted, scores)[0]}
    code, out, err = run(capsys, "--model", regression_model, "--data", str(tmp_path / "stsb.jsonl"), "--task",
                         "stsb", "--json", str(tmp_path / "score.json"))
    assert code == 0, err
    assert out.startswith(f"pearson {expected['pearson']:.4f}, spearman {expected['spearman']:.4f} on 30")
    saved = json.loads((tmp_path / "score.json").read_text())
    assert saved["metrics"] == pytest.approx(expected, abs=1e-6) and "accuracy" not in saved


@pytest.mark.skipif(not GLUE.is_dir(), reason="no ../shared/data/glue")
@pytest.mark.parametrize("task, rows", [("cola", 1043), ("mrpc", 408), ("stsb", 1500)])
def test_a_raw_glue_folder_is_scored_on_its_dev_file(task, rows, classifier, regression_model, capsys):
    """CoLA's dev file has no header row, MRPC's a byte-order mark and unbalanced quotes, STS-B ten columns."""
    import csv

    with (GLUE / task / "dev.tsv").open(encoding="utf-8-sig", newline="") as f:
        table = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":
        firsts, seconds, labels = [r[3] for r in table], None, [int(r[1]) for r in table]
    else:
        head, table = table[0], table[1:]
        a, b, y = (("#1 String", "#2 String", "Quality") if task == "mrpc" else ("sentence1", "sentence2", "score"))
        firsts, seconds = [r[head.index(a)] for r in table], [r[head.index(b)] for r in table]
        labels = [float(r[head.index(y)]) for r in table]
    model = regression_model if task == "stsb" else classifier
    predicted = predict(model, firsts, seconds, regression=task == "stsb", max_length=64)  # the tiny models' limit
    expected = {"cola": lambda: {"mcc": matthews_corrcoef(labels, predicted),
                                 "accuracy": accuracy_score(labels, predicted)},
                "mrpc": lambda: {"f1": f1_score(labels, predicted), "accuracy": accuracy_score(labels, predicted)},
                "stsb": lambda: {"pearson": pearsonr(predicted, labels)[0],
                                 "spearman": spearmanr(predicted, labels)[0]}}[task]()
    code, out, err = run(capsys, "--model", model, "--data", str(GLUE / task), "--task", task, "--max-length", "64")
    assert code == 0, err
    assert out.startswith(", ".join(f"{k} {v:.4f}" for k, v in expected.items()) + f" on {rows} examples")


def test_bad_task_options_are_one_line_errors(tmp_path, model_dirs, regression_model, capsys):
    (tmp_path / "single.tsv").write_text("sentence\tlabel\na good film\t1\na bad film\t0\n")
    (tmp_path / "rte").mkdir()
    mrpc = ["--model", model_dirs["bert"], "--data", str(tmp_path / "single.tsv"), "--task", "mrpc"]
    cases = [
        ([*mrpc, "--text-column", "s"], ("--text-column: is fixed by --task mrpc (columns #1 String, #2 String, "
                                        "Quality in raw GLUE files, sentence1, sentence2, label on the hub)")),
        ([*mrpc, "--label-column", "y"], "--label-column: is fixed by --task mrpc"),
        ([*mrpc, "--text-pair-column", "p"], "--text-pair-column: is fixed by --task mrpc"),
        ([*mrpc[:-1], "glue"], "--task: 'glue' is not a GLUE task (allowed: cola, sst2, mrpc"),
        (mrpc, "--data: " + str(tmp_path / "single.tsv") + " has neither the columns of --task mrpc"),
        ([*mrpc[:3], str(tmp_path / "rte"), "--task", "rte"], f"--data: no dev.tsv in {tmp_path / 'rte'}"),
        ([*mrpc[:3], str(tmp_path / "mnli.tsv"), "--task", "mnli"], ("--task: mnli has 3 classes (entailment, "
                                                                   "neutral, contradiction) and")),
        (["--model", regression_model, "--data", str(tmp_path / "single.tsv")],
         "--model: " + repr(regression_model) + " is a regression model (one output)"),
        (["--model", regression_model, "--data", str(tmp_path / "single.tsv"), "--task", "sst2"],
         "is a regression model (one output)"),
        (["--sweep", "any", "--data", str(tmp_path / "single.tsv"), "--task", "sst2"], "--task: only with --model"),
    ]
    (tmp_path / "mnli.tsv").write_text("premise\thypothesis\tlabel\na\tb\tneutral\n")
    (tmp_path / "stsb.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t4.2\n")
    cases.append(([*mrpc[:3], str(tmp_path / "stsb.tsv"), "--task", "stsb"],
                  "--task: the labels of " + str(tmp_path / "stsb.tsv") + " are scores (a regression task) and"))
    (tmp_path / "rte.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\tmaybe\n")
    cases.append(([*mrpc[:3], str(tmp_path / "rte.tsv"), "--task", "rte"],
                  ("--task: rte is a classification task (labels entailment, not_entailment in column 'label'); "
                  f"line 2 of {tmp_path / 'rte.tsv'} has 'maybe'")))
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
