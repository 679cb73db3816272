"""Loss functions and teacher aggregation: pure functions of model outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# What a model's forward gives the loss: its logits, then (with distill.hidden) its [CLS] states at the mapped layers,
# stacked [layers, batch, hidden].
Outputs = tuple[torch.Tensor, ...]


def average_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several teachers speak with one voice: their logits are averaged before any softmax."""
    if not logits:
        raise ValueError("average_logits needs at least one teacher's logits")
    return torch.stack(list(logits)).mean(dim=0)


def average_outputs(outputs: Sequence[Outputs]) -> Outputs:
    """The teachers' outputs averaged part by part: logits before any softmax, [CLS] states before normalisation."""
    return tuple(average_logits(parts) for parts in zip(*outputs, strict=True))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are softmaxed in fp32; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_upcast(logits), labels)


def is_regression(logits: torch.Tensor) -> bool:
    """One output is a regression head (STS-B's similarity score), as transformers reads num_labels=1."""
    return logits.shape[-1] == 1


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's own loss: cross-entropy on class labels, MSE on a regression head's scores. Fine-tuning and the
    meta step's quiz use it."""
    if is_regression(logits):
        return F.mse_loss(_upcast(logits).squeeze(-1), labels.to(_upcast(logits).dtype))
    return cross_entropy(logits, labels)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, batch mean, scaled by T^2 so gradients keep their size across T."""
    log_p_student = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    return kl * temperature**2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, labels). A regression head has no
    distribution to soften: alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, labels), T unused."""
    if is_regression(student_logits):
        loss = alpha * F.mse_loss(_upcast(student_logits), _upcast(teacher_logits))
    else:
        loss = alpha * kl_divergence(student_logits, teacher_logits, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * task_loss(student_logits, labels)
    return loss


def hidden_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
    """PKD's term: MSE between the L2-normalised [CLS] states [layers, batch, hidden], mean over layers, examples and
    hidden units (the official MetaDistil's ``F.mse_loss``, the scale its beta = 100 was tuned at)."""
    student = F.normalize(_upcast(student_cls), dim=-1)
    teacher = F.normalize(_upcast(teacher_cls), dim=-1)
    return F.mse_loss(student, teacher)
