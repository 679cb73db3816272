"""The GLUE metrics against reference values (hand-computed, scikit-learn and scipy where installed), evaluation of a
classifier and a regression head, and the choice of the best checkpoint by the main metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.config import NoiseConfig
from trainer.data import Collator, TextSet
from trainer.evaluation import improves, scores_on
from trainer.metrics import METRICS, score

LABELS = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1]
PREDICTED = [1, 0, 0, 1, 1, 0, 1, 1, 0, 0]  # tp 4, tn 3, fp 1, fn 2


def test_hand_computed_values():
    got = score(("accuracy", "f1", "mcc"), PREDICTED, LABELS)
    assert got["accuracy"] == pytest.approx(0.7)
    assert got["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert got["mcc"] == pytest.approx((4 * 3 - 1 * 2) / math.sqrt(5 * 6 * 5 * 4))
    # Pearson of (1, 2, 3) and (1, 3, 2): covariance 1/2 over variance 1; Spearman of ranks with a tie shared
    assert score(("pearson",), [1, 2, 3], [1, 3, 2])["pearson"] == pytest.approx(0.5)
    assert score(("spearman",), [1, 2, 2, 3], [10, 20, 30, 40])["spearman"] == pytest.approx(0.9486832980505138)


def test_degenerate_inputs():
    assert score(("mcc", "pearson", "spearman"), [1, 1, 1], [0, 1, 1]) == {"mcc": 0.0, "pearson": 0.0,
                                                                          "spearman": 0.0}
    assert score(("f1",), [0, 0], [0, 0]) == {"f1": 0.0}  # no positives anywhere
    assert math.isnan(score(("accuracy",), [], [])["accuracy"])


def test_against_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for classes in (2, 3):
        y = rng.integers(classes, size=500)
        p = np.where(rng.random(500) < 0.6, y, rng.integers(classes, size=500))
        got = score(("accuracy", "mcc"), p.tolist(), y.tolist())
        assert got["accuracy"] == pytest.approx(metrics.accuracy_score(y, p))
        assert got["mcc"] == pytest.approx(metrics.matthews_corrcoef(y, p))
        if classes == 2:
            assert score(("f1",), p, y)["f1"] == pytest.approx(metrics.f1_score(y, p))


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    y = np.round(rng.uniform(0, 5, size=300), 1)  # rounded: STS-B-like scores with ties
    p = np.round(y + rng.normal(0, 1.5, size=300), 0)
    got = score(("pearson", "spearman"), p, y)
    assert got["pearson"] == pytest.approx(stats.pearsonr(p, y).statistic)
    assert got["spearman"] == pytest.approx(stats.spearmanr(p, y).statistic)


def test_every_task_metric_exists():
    from trainer.tasks import TASKS

    assert {m for task in TASKS.values() for m in task.metrics} <= set(METRICS)


def test_the_first_evaluation_is_kept_then_only_a_better_main_metric():
    assert improves({"mcc": -1.0}, {}, "mcc") and improves({"mcc": math.nan}, {}, "mcc")
    assert improves({"mcc": 0.1, "accuracy": 0.5}, {"mcc": 0.0, "accuracy": 0.9}, "mcc")
    assert not improves({"mcc": 0.0, "accuracy": 0.9}, {"mcc": 0.1, "accuracy": 0.5}, "mcc")
    assert improves({"mcc": 0.0}, {"mcc": math.nan}, "mcc") and not improves({"mcc": math.nan}, {"mcc": 0.0}, "mcc")


class Fixed(torch.nn.Module):
    """Logits given per input: the first token after the start token picks their row."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.rows[input_ids[:, 1] % len(self.rows)])


def test_evaluation_scores_argmax_classes_and_regression_outputs(tokenizers):
    tok = tokenizers["wordpiece"]
    texts = ["good", "bad", "fine", "dull"]
    ids = [tok(t)["input_ids"][1] for t in texts]
    votes, outputs = torch.zeros(max(ids) + 1, 2), torch.zeros(max(ids) + 1, 1)
    for i, (token, predicted) in enumerate(zip(ids, [1, 0, 0, 1])):
        votes[token, predicted] = 1.0
        outputs[token, 0] = float(i)
    collate = Collator(tok, [], 16, NoiseConfig(), seed=0)
    cpu = torch.device("cpu")
    classes = TextSet(texts, [1, 0, 1, 1], pairs=["a", "b", "c", "d"])
    assert scores_on(Fixed(votes), classes, collate, 3, cpu, ("accuracy", "f1")) == \
        pytest.approx({"accuracy": 0.75, "f1": 0.8})
    scores = TextSet(texts, [0.0, 1.0, 2.5, 2.0], regression=True)
    assert scores_on(Fixed(outputs), scores, collate, 3, cpu, ("pearson", "spearman")) == \
        pytest.approx(score(("pearson", "spearman"), [0, 1, 2, 3], [0.0, 1.0, 2.5, 2.0]))
    assert collate(scores, [0, 1]).labels.dtype == torch.float32
    assert collate(classes, [0, 1]).labels.dtype == torch.long
