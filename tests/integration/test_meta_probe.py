"""bench/meta_probe.py: the project's meta step lowers the quiz loss of a pilot student, by the amount its gradient
predicts, and the opposite step raises it (tiny models, dropout off, so only the teacher step differs). With
``metadistil.quiz_dropout`` the probe's quiz evaluations draw dropout masks, the same ones in every column."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

import tiny
from trainer.algorithms.metadistil import rng_state
from trainer.build import build_trial
from trainer.config import parse_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import meta_probe

DATA = {"name": "synthetic", "train_size": 200, "quiz_size": 40, "validation_size": 50, "test_size": 50,
        "max_length": 32}


def test_meta_step_lowers_the_pilot_quiz_loss_as_its_gradient_predicts(tmp_path, model_dirs):
    cfg = parse_config({
        "algorithm": "metadistil", "seed": 0, "data": DATA,
        "teachers": [{"name": model_dirs["bert"]}], "student": {"name": model_dirs["distilbert"]},
        "metadistil": {"pilot_lr": 0.1, "teacher_lr": 1e-3, "quiz_batch_size": 16, "meta_gradient": "forward_ad"},
        "optim": {"lr": 1e-3, "batch_size": 16}, "deepspeed": {"enabled": True},
        "output": {"dir": str(tmp_path / "out")}})
    lines = []
    result = meta_probe.run(cfg, steps=4, evaluate_teachers=False, out=lines.append)
    rows = result["rows"]
    assert len(rows) == 4 and lines[0].split()[:4] == ["step", "plain", "before", "after"]
    for row in rows:
        change = row["after"] - row["before"]
        assert row["predicted"] < 0 and change < 0 < row["reversed"] - row["before"], row
        assert abs(change - row["predicted"]) < 0.2 * abs(row["predicted"]), row
    random_size = statistics.fmean(abs(r["random"] - r["before"]) for r in rows)
    assert random_size < 0.5 * abs(result["summary"]["mean_after_minus_before"]), result["summary"]
    assert result["summary"]["share_after_below_before"] == 1.0
    assert any(line.startswith("probe mean_predicted ") for line in lines)


def test_quiz_dropout_replays_one_set_of_masks_in_every_column(tmp_path, tokenizers):
    with_dropout = tiny.save(tiny.tiny_bert(tokenizers["wordpiece"], dropout=0.3), tokenizers["wordpiece"],
                             tmp_path / "bert")
    cfg = parse_config({
        "algorithm": "metadistil", "seed": 0, "data": DATA, "teachers": [{"name": with_dropout}],
        "student": {"name": with_dropout}, "metadistil": {"quiz_batch_size": 16, "quiz_dropout": True},
        "deepspeed": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}})
    trial = build_trial(cfg, torch.device("cpu"))
    algo = trial.algorithm()
    batch, quiz = trial.collate(trial.splits.train, range(16), epoch=0), next(algo.quiz_batches)
    theta = {n: p.detach().clone() for n, p in algo.student.module.named_parameters()}
    masks = rng_state(torch.device("cpu"))
    columns = [meta_probe.pilot_quiz_loss(algo, theta, batch, quiz, 0.1, masks) for _ in range(2)]
    without_dropout = meta_probe.pilot_quiz_loss(algo, theta, batch, quiz, 0.1, None)
    assert columns[0] == columns[1] != without_dropout
    assert algo.student.module.training, "the student's mode is restored for its real step"
