"""Plain fine-tuning: cross-entropy on the labels. Student baselines, warm-up, and fine-tuning teachers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from trainer.data import Batch
from trainer.engine import Engine
from trainer.losses import is_regression, task_loss

if TYPE_CHECKING:
    from trainer.build import Trial


class FineTune:
    name = "finetune"

    def __init__(self, student: Engine):
        self.student = student

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        logits = self.student(**batch.student).logits
        loss = task_loss(logits, batch.labels)
        self.student.backward(loss)
        self.student.step()
        return {"mse" if is_regression(logits) else "ce": loss.item()}


def build(trial: Trial, quiz: Iterator[Batch] | None) -> FineTune:
    """The registry's builder (trainer/registry.py)."""
    return FineTune(trial.engines["student"])
