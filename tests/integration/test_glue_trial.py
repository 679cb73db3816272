"""Whole trials on GLUE-layout folders: a single-sentence task reports its metrics and keeps the checkpoint best by
its main metric; a sentence-pair task distils across teachers with other tokenizers, with noise on both sentences;
`validate`'s checks refuse a label of the wrong kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_trial import trial
from test_trial_features import Recorder
from trainer.config import ConfigError
from trainer.loop import run_trial
from trainer.preflight import check_trial

POSITIVE, NEGATIVE = "good great fine lovely".split(), "bad awful dull weak".split()


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = ["the", "film", "was", "quite", str(rng.choice(POSITIVE if label else NEGATIVE))]
        out.append((" ".join(words), label))
    return out


def cola(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.tsv", 300, 0), ("dev.tsv", 60, 1)):  # CoLA's layout: no header row
        (folder / name).write_text("".join(f"gj04\t{y}\t{'' if y else '*'}\t{t}\n" for t, y in sentences(n, seed)))
    return folder


def rte(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.tsv", 300, 2), ("dev.tsv", 60, 3)):
        rows = [f"{i}\t{t}\tit was {'good' if y else 'bad'}\t{'entailment' if y else 'not_entailment'}"
                for i, (t, y) in enumerate(sentences(n, seed))]
        (folder / name).write_text("\n".join(["index\tsentence1\tsentence2\tlabel", *rows]) + "\n")
    return folder


def glue(tmp_path, task: str, folder: Path, **sections):
    data = {"task": task, "path": str(folder), "train_size": 200, "quiz_size": 20, "test_size": 60,
            "validation_size": None, "max_length": 32}
    return trial(tmp_path, data=data, **sections)


def test_a_single_sentence_task_reports_its_metrics_and_keeps_the_best_by_mcc(tmp_path, model_dirs):
    log = Recorder()
    cfg = glue(tmp_path, "cola", cola(tmp_path / "cola"), algorithm="finetune",
               student={"name": model_dirs["distilbert"]}, optim={"max_steps": 60}, eval={"every_steps": 15})
    result = run_trial(cfg, [log], progress=False)
    evaluations = [(step, m) for step, m in log.metrics if "val_mcc" in m]
    assert len(evaluations) == 4 and all("val_accuracy" in m for _, m in evaluations)
    best = max(m["val_mcc"] for _, m in evaluations)
    first_best = min(step for step, m in evaluations if m["val_mcc"] == best)  # a tie does not replace the best
    assert result.metrics["best_step"] == first_best and result.metrics["best_val_mcc"] == best > 0.5
    # best_val_accuracy is the accuracy of the weights kept, not the best accuracy seen
    assert result.metrics["best_val_accuracy"] == dict(evaluations)[first_best]["val_accuracy"]
    assert {"test_mcc", "test_accuracy"} <= set(result.metrics)


def test_a_pair_task_distils_across_tokenizers_with_noise_on_both_sentences(tmp_path, model_dirs):
    cfg = glue(tmp_path, "rte", rte(tmp_path / "rte"), algorithm="kd", student={"name": model_dirs["distilbert"]},
               teachers=[{"name": model_dirs["bert"]}, {"name": model_dirs["roberta"]}],
               noise={"student": {"p": 0.2, "mode": "token"}, "teacher": {"p": 0.1, "mode": "token"}},
               optim={"max_steps": 20}, eval={"every_steps": 10})
    result = run_trial(cfg, progress=False)
    assert 0 <= result.metrics["best_val_accuracy"] <= 1 and "test_accuracy" in result.metrics


def test_validate_refuses_a_score_on_a_classification_task(tmp_path, model_dirs):
    folder = rte(tmp_path / "rte")
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\t4.2"
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    cfg = glue(tmp_path, "rte", folder, algorithm="finetune", student={"name": model_dirs["distilbert"]})
    with pytest.raises(ConfigError, match=r"^data\.task: rte is a classification task .*line 6 of .*train\.tsv "
                                          r"has '4\.2'$"):
        check_trial(cfg)


def test_a_pair_trial_feeds_segment_ids_to_the_bert_teacher_only(tmp_path, model_dirs):
    """Built as a trial builds it: the BERT teacher gets the pairs' segment ids (as its tokenizer encodes them) and
    its logits depend on them; the DistilBERT student (a BERT tokenizer, no segment embedding) and the RoBERTa teacher
    get none. Their shared teacher logits are keyed apart from files computed without them."""
    import torch

    from trainer.build import build_trial
    from trainer.teacher_logits import logits_key, weights_digest

    cfg = glue(tmp_path, "rte", rte(tmp_path / "rte"), algorithm="kd", student={"name": model_dirs["distilbert"]},
               teachers=[{"name": model_dirs["bert"]}, {"name": model_dirs["roberta"]}], optim={"max_steps": 2})
    built = build_trial(cfg, torch.device("cpu"))
    train = built.splits.train
    batch = built.collate(train, range(8))
    assert ["token_type_ids" in enc for enc in (batch.student, *batch.teachers)] == [False, True, False]
    bert = built.teachers[0]
    own = bert.tokenizer(train.texts[:8], train.pairs[:8], padding=True, truncation=True, max_length=32,
                         return_tensors="pt")
    assert torch.equal(batch.teachers[0]["token_type_ids"], own["token_type_ids"])
    model = bert.model.eval()
    without = {k: v for k, v in batch.teachers[0].items() if k != "token_type_ids"}
    with torch.no_grad():
        given, plain, reference = (model(**enc).logits for enc in (batch.teachers[0], without, own))
    # the tiny teacher's segment embeddings are small (init std 0.02): a few 1e-5 apart, where the same inputs give
    # exactly the same logits
    assert (given - plain).abs().max() > 1e-6 and torch.allclose(given, reference, atol=1e-7)
    keys = [logits_key(weights_digest(model), bert.tokenizer, train.examples(), 32, "cpu", segments)
            for segments in (True, False)]
    assert keys[0] != keys[1]


def test_mnli_scores_the_kept_weights_on_its_mismatched_dev_set(tmp_path, model_dirs):
    folder = tmp_path / "mnli"
    folder.mkdir()
    classes = ("entailment", "neutral", "contradiction")
    header = "index\tsentence1\tsentence2\tgold_label"
    for name, n, seed in (("train.tsv", 300, 4), ("dev_matched.tsv", 60, 5)):
        rows = [f"{i}\t{t}\tit was {classes[i % 3]}\t{classes[i % 3]}" for i, (t, _) in enumerate(sentences(n, seed))]
        (folder / name).write_text("\n".join([header, *rows]) + "\n")
    # the mismatched set is the matched one in another order: the kept weights must score both alike
    lines = (folder / "dev_matched.tsv").read_text().splitlines()
    (folder / "dev_mismatched.tsv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    student = str(tmp_path / "three-labels")  # MNLI's three classes: the fixture's classifier, its head resized
    AutoModelForSequenceClassification.from_pretrained(model_dirs["distilbert"], num_labels=3,
                                                       ignore_mismatched_sizes=True).save_pretrained(student)
    AutoTokenizer.from_pretrained(model_dirs["distilbert"]).save_pretrained(student)
    log = Recorder()
    cfg = glue(tmp_path, "mnli", folder, algorithm="finetune", student={"name": student},
               optim={"max_steps": 20}, eval={"every_steps": 10})
    result = run_trial(cfg, [log], progress=False)
    assert result.metrics["best_val_mismatched_accuracy"] == pytest.approx(result.metrics["best_val_accuracy"])
    assert ("data_validation_mismatched", 60) in [(k, v) for _, m in log.metrics for k, v in m.items()]
