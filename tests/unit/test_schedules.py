"""Learning-rate schedules and weight-decay groups: transformers' linear-with-warm-up semantics, counted in the
trial's own optimizer steps (the student's warm-up fine-tuning and training; the teachers' meta-updates), and no
decay on biases and LayerNorm weights."""

from __future__ import annotations

import pytest
import torch

import tiny
from trainer.config import DeepSpeedConfig, parse_config
from trainer.engine import Schedule, TorchEngine, parameter_groups, wrap


def lrs_of(schedule: Schedule, steps: int, lr: float = 1.0) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    engine = TorchEngine(torch.nn.Linear(1, 1), torch.optim.SGD([weight], lr=lr), None, schedule)
    seen = []
    for _ in range(steps):
        seen.append(engine.get_lr()[0])
        weight.grad = torch.zeros(1)
        engine.step()
    return seen


def test_linear_schedule_rises_then_decays_to_zero():
    # 10 steps, warm-up ceil(0.25 * 10) = 3: lr = s/3 for s < 3, then (10 - s)/7
    expected = [0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0, 0]
    assert lrs_of(Schedule("linear", 10, 0.25), 12) == pytest.approx(expected)


def test_constant_schedule_rises_then_stays():
    assert lrs_of(Schedule("constant", 10, 0.2), 5, lr=0.5) == pytest.approx([0, 0.25, 0.5, 0.5, 0.5])


def test_no_weight_decay_on_biases_and_layer_norms(tokenizers):
    model = tiny.tiny_bert(tokenizers["wordpiece"], seed=0)
    decayed, plain = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert "bert.embeddings.LayerNorm.weight" in plain_names and "classifier.bias" in plain_names
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed_names
    assert "bert.embeddings.word_embeddings.weight" in decayed_names
    assert all(n.endswith("bias") or "LayerNorm" in n for n in plain_names)
    assert len(plain_names) + len(decayed_names) == len(names)

    # A step on zero gradients moves only what is decayed (AdamW's decoupled decay: p -= lr * wd * p).
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = wrap(model, 1e-2, 0.1, DeepSpeedConfig(enabled=False), 4, None)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    engine.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved == {n for n in decayed_names if before[n].abs().max() > 0}


def test_trial_schedules_span_the_students_steps_and_the_teachers_meta_updates(tmp_path, model_dirs):
    from trainer.build import build_trial

    cfg = parse_config({
        "algorithm": "metadistil", "device": "cpu", "student": {"name": model_dirs["distilbert"]},
        "teachers": [{"name": model_dirs["bert"]}],
        "data": {"name": "synthetic", "train_size": 40, "quiz_size": 8, "validation_size": 8, "test_size": 8},
        "optim": {"batch_size": 8, "epochs": 2, "schedule": "linear", "warmup_ratio": 0.1},
        "warmup": {"epochs": 1},
        "metadistil": {"meta_interval": 3, "teacher_schedule": "constant", "teacher_warmup_ratio": 0.5,
                       "quiz_batch_size": 4},
        "deepspeed": {"enabled": False}, "output": {"dir": str(tmp_path / "out")}})
    trial = build_trial(cfg)
    assert (trial.warmup_steps, trial.train_steps) == (5, 10)  # 40 examples / batch 8 = 5 steps an epoch
    student, teacher = trial.engines["student"].lr_scheduler, trial.engines["teacher_0"].lr_scheduler
    # student: linear over 5 + 10 steps with ceil(1.5) = 2 warm-up steps; teacher: ceil(10 / 3) = 4 meta-updates,
    # constant after ceil(2.0) = 2 warm-up updates
    assert [student.lr_lambdas[0](s) for s in (0, 1, 2, 15)] == pytest.approx([0, 0.5, 1, 0])
    assert student.lr_lambdas[0](8) == pytest.approx(7 / 13)
    assert [teacher.lr_lambdas[0](s) for s in (0, 1, 2, 9)] == pytest.approx([0, 0.5, 1, 1])


def test_schedule_keys_are_validated():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.schedule"):
        parse_config({"optim": {"schedule": "cosine"}})
    with pytest.raises(ConfigError, match=r"metadistil\.teacher_warmup_ratio"):
        parse_config({"metadistil": {"teacher_warmup_ratio": 1.0}})
