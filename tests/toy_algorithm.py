"""A toy algorithm added the way the registry means: this one file, and one ``register(SPEC)`` line
(tests/unit/test_registry.py). Fine-tuning on label-smoothed targets: with smoothing eps over 2 classes, the best the
student can do is p(label) = 1 - eps/2, so its plain cross-entropy stays above -log(1 - eps/2) however well it
learns; a plain fine-tune drives it towards 0."""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn.functional as F

from trainer.build import Trial
from trainer.data import Batch
from trainer.engine import Engine
from trainer.errors import ConfigKeyError
from trainer.registry import AlgorithmSpec

SMOOTHING = 0.2


class SmoothedFineTune:
    name = "smoothed_finetune"

    def __init__(self, student: Engine):
        self.student = student

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        logits = self.student(**batch.student).logits.float()
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=SMOOTHING)
        self.student.backward(loss)
        self.student.step()
        return {"smoothed_ce": loss.item(), "ce": F.cross_entropy(logits.detach(), batch.labels).item()}


def build(trial: Trial, quiz: Iterator[Batch] | None) -> SmoothedFineTune:
    return SmoothedFineTune(trial.engines["student"])


def check(cfg) -> None:
    # the trial's warm-up is plain fine-tuning: it would train the very confidence the smoothing is there to limit
    if cfg.warmup.epochs:
        raise ConfigKeyError("warmup.epochs", f"{cfg.warmup.epochs} must be 0 with smoothed_finetune")


SPEC = AlgorithmSpec("smoothed_finetune", "Fine-tune (label smoothing)", "Fine-Tuned Models", "none", build,
                     check=check)
