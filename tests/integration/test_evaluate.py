"""`metadistil evaluate` scores a saved model on any labelled file."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launcher.cli import main
from trainer.data import synthetic_sentiment


def test_evaluate_prints_and_writes_accuracy(tmp_path, model_dirs, capsys):
    data = synthetic_sentiment(40, 1)["train"]
    pd.DataFrame({"text": data.texts, "y": data.labels}).to_csv(tmp_path / "held_out.csv", index=False)
    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"]).eval()
    tok = AutoTokenizer.from_pretrained(model_dirs["bert"])
    with torch.no_grad():
        predicted = [model(**tok(t, return_tensors="pt")).logits.argmax().item() for t in data.texts]
    expected = sum(p == y for p, y in zip(predicted, data.labels)) / len(data)

    code = main(["evaluate", "--model", model_dirs["bert"], "--data", str(tmp_path / "held_out.csv"),
                 "--text-column", "text", "--label-column", "y", "--json", str(tmp_path / "score.json")])
    assert code == 0
    assert f"accuracy {expected:.4f} on 40 examples" in capsys.readouterr().out
    saved = json.loads((tmp_path / "score.json").read_text())
    assert saved["accuracy"] == pytest.approx(expected) and saved["examples"] == 40


def test_evaluate_names_the_bad_argument(tmp_path, model_dirs, capsys):
    assert main(["evaluate", "--model", str(tmp_path), "--data", "x.tsv"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["evaluate", "--model", model_dirs["bert"], "--data", str(tmp_path / "none.tsv")]) == 2
    assert f"--data: '{tmp_path / 'none.tsv'}' does not exist" in capsys.readouterr().err
