"""Loss functions and teacher aggregation: pure functions of logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def average_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several teachers speak with one voice: their logits are averaged before any softmax."""
    if not logits:
        raise ValueError("average_logits needs at least one teacher's logits")
    return torch.stack(list(logits)).mean(dim=0)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are softmaxed in fp32; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_upcast(logits), labels)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, batch mean, scaled by T^2 so gradients keep their size across T."""
    log_p_student = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    return kl * temperature**2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student, labels)."""
    loss = alpha * kl_divergence(student_logits, teacher_logits, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * cross_entropy(student_logits, labels)
    return loss
