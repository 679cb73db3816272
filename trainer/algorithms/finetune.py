"""Plain fine-tuning: cross-entropy on the labels. Student baselines, warm-up, and fine-tuning teachers."""

from __future__ import annotations

from trainer.data import Batch
from trainer.engine import Engine
from trainer.losses import cross_entropy


class FineTune:
    name = "finetune"

    needs_teacher_inputs = False

    def __init__(self, student: Engine):
        self.student = student

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        loss = cross_entropy(self.student(**batch.student).logits, batch.labels)
        self.student.backward(loss)
        self.student.step()
        return {"ce": loss.item()}
