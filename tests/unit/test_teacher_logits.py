"""trainer.teacher_logits: KD trials share their frozen teachers' logits through the sweep's storage, with the
losses of recomputing them, and only where the teachers see clean text and never change."""

from __future__ import annotations

import numpy as np
import torch

from trainer import teacher_logits
from trainer.build import build_trial
from trainer.config import parse_config

STEPS = 6


def config(tmp_path, model_dirs, cache, algorithm="kd", **sections):
    raw = {
        "seed": 3, "algorithm": algorithm,
        "data": {"name": "synthetic", "train_size": 96, "quiz_size": 16, "validation_size": 16, "test_size": 16,
                 "max_length": 32, "logit_cache": cache},
        "student": {"name": model_dirs["distilbert"]},
        "teachers": [{"name": model_dirs["bert"]}, {"name": model_dirs["roberta"]}],
        "optim": {"lr": 1e-3, "batch_size": 8, "max_steps": STEPS},
        "metadistil": {"quiz_batch_size": 8},
        "deepspeed": {"enabled": False},
        "output": {"dir": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw)


def run_steps(cfg):
    """The trial's first training steps as the loop runs them: its losses and the student's weights."""
    from trainer.loop import batch_stream

    trial = build_trial(cfg)
    algorithm = trial.algorithm()
    losses = []
    for step, (epoch, indices) in enumerate(batch_stream(len(trial.splits.train), 8, cfg.seed, STEPS)):
        batch = trial.collate(trial.splits.train, indices, epoch, with_teachers=True).to(trial.device)
        losses.append(algorithm.train_step(batch, step)["kd"])
    return losses, {k: v.clone() for k, v in trial.engines["student"].module.state_dict().items()}, algorithm


def test_shared_logits_train_as_recomputed_ones(tmp_path, model_dirs, monkeypatch):
    cache = tmp_path / "logits"
    reference, ref_weights, plain = run_steps(config(tmp_path, model_dirs, None))
    assert plain.shared is None

    first, first_weights, computed = run_steps(config(tmp_path, model_dirs, str(cache)))
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2 and computed.shared is not None
    np.testing.assert_allclose(first, reference, rtol=1e-5, atol=1e-6)
    for key, value in ref_weights.items():
        torch.testing.assert_close(first_weights[key], value, rtol=1e-4, atol=1e-6)

    # a later trial loads them: its teachers never run
    def refuse(*args, **kwargs):
        raise AssertionError("a teacher ran although its logits are shared")

    for model_type in ("BertForSequenceClassification", "RobertaForSequenceClassification"):
        import transformers

        monkeypatch.setattr(getattr(transformers, model_type), "forward", refuse)
    again, _, _ = run_steps(config(tmp_path, model_dirs, str(cache)))
    assert again == first


def test_the_key_follows_weights_tokenizer_texts_and_length(model_dirs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"])
    tok, other_tok = AutoTokenizer.from_pretrained(model_dirs["bert"]), AutoTokenizer.from_pretrained(
        model_dirs["roberta"])
    weights = teacher_logits.weights_digest(model)
    key = teacher_logits.logits_key(weights, tok, ["a b", "c"], 32, "cpu")
    assert key == teacher_logits.logits_key(teacher_logits.weights_digest(model), tok, ["a b", "c"], 32, "cpu")
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    changed = [teacher_logits.logits_key(teacher_logits.weights_digest(model), tok, ["a b", "c"], 32, "cpu"),
               teacher_logits.logits_key(weights, other_tok, ["a b", "c"], 32, "cpu"),
               teacher_logits.logits_key(weights, tok, ["c", "a b"], 32, "cpu"),
               teacher_logits.logits_key(weights, tok, ["a b", "c"], 16, "cpu"),
               teacher_logits.logits_key(weights, tok, ["a b", "c"], 32, "cuda"),
               teacher_logits.logits_key(weights, tok, [("a b", "d"), ("c", "e")], 32, "cpu")]  # sentence pairs
    assert len({key, *changed}) == 7


def test_only_frozen_teachers_on_clean_text_share(tmp_path, model_dirs):
    """Teacher-side noise changes the teachers' inputs every epoch; MetaDistil's teachers learn; with distill.hidden
    the loss reads the teachers' hidden states too, so they run anyway."""
    cache = str(tmp_path / "logits")
    noisy = build_trial(config(tmp_path, model_dirs, cache, noise={"teacher": {"p": 0.2}})).algorithm()
    student_noise = build_trial(config(tmp_path, model_dirs, cache, noise={"student": {"p": 0.2}})).algorithm()
    meta = build_trial(config(tmp_path, model_dirs, cache, algorithm="metadistil")).algorithm()
    hidden = build_trial(config(tmp_path, model_dirs, cache, distill={"hidden": {}})).algorithm()
    assert noisy.shared is None and meta.shared is None and student_noise.shared is not None
    assert hidden.shared is None and hidden.hidden is not None
    assert len(list((tmp_path / "logits").glob("*.safetensors"))) == 2  # the student-noise trial's two teachers


def test_an_unreadable_or_planted_file_is_recomputed_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    logits = torch.randn(4, 2)
    for content in (pickle.dumps(Payload()), b"\x00\x01garbage"):
        (tmp_path / "k.safetensors").write_bytes(content)
        got, loaded = teacher_logits.load_or_compute(tmp_path, "k", lambda: logits, rows=4)
        assert not loaded and torch.equal(got, logits) and not marker.exists()
    got, loaded = teacher_logits.load_or_compute(tmp_path, "k", lambda: torch.zeros(4, 2), rows=4)
    assert loaded and torch.equal(got, logits)  # the replaced file now reads back
    _, loaded = teacher_logits.load_or_compute(tmp_path, "k", lambda: torch.zeros(5, 2), rows=5)
    assert not loaded  # logits of another split size are not these


def test_a_sweeps_trials_share_one_folder_in_its_storage(tmp_path):
    from pathlib import Path

    from launcher.spec import expand, load_spec

    plan = expand(*load_spec(Path(__file__).resolve().parents[2] / "configs" / "sweep" / "demo.yaml",
                             [f"storage_path={tmp_path}"]))
    assert {t.config.data.logit_cache for t in plan.trials} == {str(tmp_path / "teacher_logits")}
