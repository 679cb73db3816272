"""Vanilla knowledge distillation from frozen teachers (Hinton et al. 2015)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from trainer.config import DistillConfig
from trainer.data import Batch
from trainer.engine import Engine
from trainer.losses import average_logits, distillation_loss
from trainer.teacher_logits import SharedLogits, shared_logits

if TYPE_CHECKING:
    from trainer.build import Trial

# What the teachers are: frozen modules here, engines that train them in MetaDistil.
Teacher = TypeVar("Teacher", bound=Callable[..., Any])


class KD(Generic[Teacher]):
    name = "kd"

    def __init__(self, student: Engine, teachers: Sequence[Teacher], distill: DistillConfig,
                 shared: SharedLogits | None = None):
        self.student = student
        self.teachers = list(teachers)
        self.distill = distill
        self.shared = shared  # the frozen teachers' logits, computed once for the sweep (trainer.teacher_logits)

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, self.distill.temperature, self.distill.alpha)

    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        if self.shared is not None and batch.indices is not None:
            return self.shared(batch.indices)
        return average_logits([teacher(**inputs).logits for teacher, inputs in zip(self.teachers, batch.teachers)])

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        teacher_logits = self.teacher_logits(batch)
        loss = self.loss(self.student(**batch.student).logits, teacher_logits, batch.labels)
        self.student.backward(loss)
        self.student.step()
        return {"kd": loss.item()}


def build(trial: Trial, quiz: Iterator[Batch] | None) -> KD:
    """The registry's builder (trainer/registry.py): the teachers frozen, on the trial's device."""
    frozen = [t.model.to(trial.device).eval().requires_grad_(False) for t in trial.teachers]
    return KD(trial.engines["student"], frozen, trial.cfg.distill, shared_logits(trial, frozen))
