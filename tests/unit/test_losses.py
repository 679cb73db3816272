"""Losses against hand-computed references: KL(teacher || student) at temperature T with T^2 scaling, the alpha mix
with cross-entropy, logit averaging before the softmax, and dtype handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.losses import average_logits, cross_entropy, distillation_loss, kl_divergence


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    p, q = np_softmax(teacher / t), np_softmax(student / t)
    return float((p * (np.log(p) - np.log(q))).sum(axis=-1).mean() * t * t)


def np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    p = np_softmax(logits)
    return float(-np.log(p[np.arange(len(labels)), labels]).mean())


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 3, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(6, 3, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    return student, teacher, labels


def test_kl_matches_a_hand_computed_example():
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[np.log(3.0), 0.0]], dtype=torch.float64)  # teacher probs (3/4, 1/4) at T=1
    expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    assert kl_divergence(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0])
def test_kl_matches_numpy_reference(logits, t):
    student, teacher, _ = logits
    got = kl_divergence(student, teacher, t).item()
    assert got == pytest.approx(np_kl(student.numpy(), teacher.numpy(), t), rel=1e-10)
    # and the torch formula (KLDivLoss, batchmean) times T^2
    ref = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                                     reduction="batchmean", log_target=True) * t * t
    assert got == pytest.approx(ref.item(), rel=1e-10)


def test_kl_direction_is_teacher_to_student(logits):
    student, teacher, _ = logits
    assert kl_divergence(student, teacher, 1.0).item() != pytest.approx(np_kl(teacher.numpy(), student.numpy(), 1.0))


def test_kl_is_zero_for_equal_logits(logits):
    student, _, _ = logits
    assert kl_divergence(student, student.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-14)
    # shifting all logits by a constant does not change the distribution
    assert kl_divergence(student, student + 5.0, 3.0).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(student, student * 1.5, 1.0).item() > 1e-3


def test_kl_is_scaled_by_t_squared(logits):
    student, teacher, _ = logits
    t = 3.0
    unscaled = np_kl(student.numpy(), teacher.numpy(), t) / (t * t)
    assert kl_divergence(student, teacher, t).item() == pytest.approx(unscaled * 9.0, rel=1e-10)
    # equivalently: scaling logits and T together keeps the unscaled KL, so the loss grows by exactly T^2
    assert kl_divergence(student * t, teacher * t, t).item() == pytest.approx(
        kl_divergence(student, teacher, 1.0).item() * t * t, rel=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_distillation_loss_mixes_kl_and_ce_by_alpha(logits, alpha):
    student, teacher, labels = logits
    t = 2.0
    expected = alpha * np_kl(student.numpy(), teacher.numpy(), t) + (1 - alpha) * np_ce(student.numpy(),
                                                                                        labels.numpy())
    got = distillation_loss(student, teacher, labels, t, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_distillation_loss_extremes(logits):
    student, teacher, labels = logits
    assert distillation_loss(student, teacher, labels, 2.0, 0.0).item() == pytest.approx(
        cross_entropy(student, labels).item(), rel=1e-12)
    assert distillation_loss(student, teacher, labels, 2.0, 1.0).item() == pytest.approx(
        kl_divergence(student, teacher, 2.0).item(), rel=1e-12)


def test_distillation_gradient_flows_to_student_and_teacher(logits):
    student, teacher, labels = (x.clone() for x in logits)
    student.requires_grad_()
    teacher.requires_grad_()
    distillation_loss(student, teacher, labels, 2.0, 0.5).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0


def test_average_logits_averages_before_softmax():
    a = torch.tensor([[4.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    avg = average_logits([a, b])
    assert torch.equal(avg, torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    softmax_of_mean = torch.softmax(avg, -1)
    mean_of_softmax = (torch.softmax(a, -1) + torch.softmax(b, -1)) / 2
    assert not torch.allclose(softmax_of_mean, mean_of_softmax, atol=1e-3)
    assert torch.allclose(softmax_of_mean, torch.softmax((a + b) / 2, -1))


def test_average_logits_one_teacher_and_none():
    a = torch.randn(3, 2)
    assert torch.equal(average_logits([a]), a)
    assert torch.allclose(average_logits((a, 3 * a, 2 * a)), 2 * a)
    with pytest.raises(ValueError, match="at least one"):
        average_logits([])


def test_float64_stays_float64(logits):
    student, teacher, labels = logits
    assert kl_divergence(student, teacher, 2.0).dtype == torch.float64
    assert cross_entropy(student, labels).dtype == torch.float64
    assert distillation_loss(student, teacher, labels, 2.0, 0.5).dtype == torch.float64
    assert average_logits([student, teacher]).dtype == torch.float64


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_is_upcast(logits, half):
    student, teacher, labels = logits
    s, t = student.to(half), teacher.to(half)
    kl = kl_divergence(s, t, 2.0)
    loss = distillation_loss(s, t, labels, 2.0, 0.5)
    assert kl.dtype == torch.float32 and loss.dtype == torch.float32
    assert cross_entropy(s, labels).dtype == torch.float32
    # computed in fp32 from the rounded half inputs: equal to the fp32 computation on the same values
    assert kl.item() == pytest.approx(kl_divergence(s.float(), t.float(), 2.0).item(), rel=1e-6)
    # equal logits give exactly zero (a half-precision softmax would not be needed to show this, but no NaN/inf)
    assert kl_divergence(s, s.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_float32_stays_float32(logits):
    student, teacher, labels = (x.float() if x.is_floating_point() else x for x in logits)
    assert distillation_loss(student, teacher, labels, 2.0, 0.5).dtype == torch.float32


def test_a_regression_head_takes_mse_for_the_task_and_for_distillation():
    from trainer.losses import task_loss

    student = torch.tensor([[1.0], [2.5], [0.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0], [2.5], [3.0]], dtype=torch.float64)
    scores = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)  # STS-B similarity scores, float labels
    # (1-2)^2, (2.5-3)^2, (0-0.5)^2 -> 1.5 / 3
    assert task_loss(student, scores).item() == pytest.approx(0.5)
    # against the teacher: 0, 0, (0-3)^2 -> 9 / 3; the temperature does not enter
    for t in (1.0, 4.0):
        assert distillation_loss(student, teacher, scores, t, 1.0).item() == pytest.approx(3.0)
        assert distillation_loss(student, teacher, scores, t, 0.3).item() == pytest.approx(0.3 * 3.0 + 0.7 * 0.5)
    labels = torch.tensor([0, 1, 1])
    logits = torch.randn(3, 2)
    assert task_loss(logits, labels).item() == pytest.approx(cross_entropy(logits, labels).item())
