"""Vanilla knowledge distillation from frozen teachers (Hinton et al. 2015), with ``distill.hidden``'s
intermediate-layer term (PKD) when configured."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from trainer.config import DistillConfig
from trainer.data import Batch
from trainer.engine import Engine
from trainer.hidden import HiddenMap
from trainer.losses import Outputs, average_outputs, distillation_loss, hidden_loss
from trainer.teacher_logits import SharedLogits, shared_logits

if TYPE_CHECKING:
    from trainer.build import Trial

# What the teachers are: frozen modules here, engines that train them in MetaDistil.
Teacher = TypeVar("Teacher", bound=Callable[..., Any])


class KD(Generic[Teacher]):
    name = "kd"

    def __init__(self, student: Engine, teachers: Sequence[Teacher], distill: DistillConfig,
                 shared: SharedLogits | None = None, hidden: HiddenMap | None = None):
        self.student = student
        self.teachers = list(teachers)
        self.distill = distill
        self.shared = shared  # the frozen teachers' logits, computed once for the sweep (trainer.teacher_logits)
        self.hidden = hidden  # distill.hidden resolved for these models (trainer.hidden); None: off

    def loss(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> torch.Tensor:
        """The KD loss of the student's outputs against the teachers' (averaged) ones, plus beta x the hidden term."""
        loss = distillation_loss(student[0], teacher[0], labels, self.distill.temperature, self.distill.alpha)
        if self.hidden is not None:
            loss = loss + self.hidden.beta * hidden_loss(student[1], teacher[1])
        return loss

    def named_losses(self, loss: torch.Tensor, student: Outputs, teacher: Outputs) -> dict[str, float]:
        """What a step logs: ``kd``, the loss the student steps on, and with distill.hidden the term ``hidden``
        before its weight beta."""
        named = {"kd": loss.item()}
        if self.hidden is not None:
            named["hidden"] = hidden_loss(student[1].detach(), teacher[1].detach()).item()
        return named

    @torch.no_grad()
    def teacher_outputs(self, batch: Batch) -> Outputs:
        if self.shared is not None and batch.indices is not None:
            return (self.shared(batch.indices),)
        if self.hidden is None:
            return average_outputs([(teacher(**inputs).logits,) for teacher, inputs in zip(self.teachers,
                                                                                           batch.teachers)])
        outputs = [teacher(**inputs, output_hidden_states=True) for teacher, inputs in zip(self.teachers,
                                                                                          batch.teachers)]
        return average_outputs([(out.logits, self.hidden.teacher_states(i, out.hidden_states))
                                for i, out in enumerate(outputs)])

    def student_outputs(self, batch: Batch) -> Outputs:
        if self.hidden is None:
            return (self.student(**batch.student).logits,)
        # hidden states only when the loss reads them: keeping every layer's output costs memory
        out = self.student(**batch.student, output_hidden_states=True)
        return out.logits, self.hidden.student_states(self.student.module, out.hidden_states)

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        teacher = self.teacher_outputs(batch)
        student = self.student_outputs(batch)
        loss = self.loss(student, teacher, batch.labels)
        self.student.backward(loss)
        self.student.step()
        return self.named_losses(loss, student, teacher)


def build(trial: Trial, quiz: Iterator[Batch] | None) -> KD:
    """The registry's builder (trainer/registry.py): the teachers frozen, on the trial's device."""
    frozen = [t.model.to(trial.device).eval().requires_grad_(False) for t in trial.teachers]
    return KD(trial.engines["student"], frozen, trial.cfg.distill, shared_logits(trial, frozen), trial.hidden)
