"""MetaDistil (Zhou et al. 2022): the teachers learn to teach from the student's quiz results.

One meta step on a training batch x and a quiz batch q, with student θ, teachers φ and pilot step size λ:
  1. pilot:  θ' = θ − λ ∇θ ℓ(z_S(θ; x), z_T(φ; x))                  (a functional copy; the real student is untouched)
  2. quiz:   L_q(θ') = CE(z_S(θ'; q)); every teacher takes an optimizer step on ∇φ L_q(θ')
  3. real:   the real student takes its KD step on x with the updated teachers' logits (``update: exact``), or the
             pilot's own step, whose teachers are one meta-update behind (``update: lagged``: no second teacher
             forward, no second student backward).

∇φ L_q needs no double backward through the student: φ enters the pilot loss only through z_T, so with
v = ∇θ' L_q and w = J_θ(z_S)·v (one Jacobian-vector product),
  ∇φ L_q = −λ J_φ(z_T)ᵀ u,   u = ∂/∂z_T ⟨∂ℓ/∂z_S, w⟩   (a C×C product per example, on logits only).
Every backward is first order. ``meta_gradient: double_backward`` keeps the naive second-order route as the
reference. Gradients are computed on detached parameter copies and handed to the (DeepSpeed) engines at the end.

Precision: θ, θ' and φ are always fp32 (or wider). Under DeepSpeed bf16 the engines' modules hold bf16 weights; the step
then works on the engines' fp32 master copies and computes the training-batch passes (pilot, teachers, JVP) under
``torch.autocast`` in bf16, as AMP training does. The quiz pass runs in fp32: in bf16, θ' = θ − λg rounds back to θ in
most entries at the usual λ, so the quiz would be taken at θ.
Dropout: the quiz is evaluated with dropout off unless ``quiz_dropout``. While the student's attention draws dropout
masks, its pilot forward runs on the math attention kernel, the one the JVP must use: fused kernels draw their masks
in their own way, and the replayed RNG would not reproduce them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.algorithms.kd import KD
from trainer.config import DistillConfig, MetaDistilConfig
from trainer.data import Batch
from trainer.distributed import average
from trainer.engine import Engine, apply_gradients
from trainer.losses import average_logits, cross_entropy
from trainer.metrics import PhaseTimer

if TYPE_CHECKING:
    from trainer.build import Trial

Params = dict[str, torch.Tensor]


class MetaDistil(KD[Engine]):
    name = "metadistil"

    def __init__(self, student: Engine, teachers: Sequence[Engine], distill: DistillConfig, meta: MetaDistilConfig,
                 quiz_batches: Iterator[Batch], timer: PhaseTimer | None = None):
        super().__init__(student, teachers, distill)
        self.meta = meta
        self.quiz_batches = quiz_batches
        self.timer = timer or PhaseTimer()

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        if step % self.meta.meta_interval:
            with self.timer("kd_step"):
                return super().train_step(batch, step)
        return self.meta_step(batch, next(self.quiz_batches))

    def meta_step(self, batch: Batch, quiz: Batch) -> dict[str, float]:
        if self.meta.meta_gradient == "double_backward":
            # Fused attention kernels have no double backward; the reference route runs on the math kernel.
            with sdpa_kernel(SDPBackend.MATH):
                return self._meta_step(batch, quiz)
        return self._meta_step(batch, quiz)

    def _meta_step(self, batch: Batch, quiz: Batch) -> dict[str, float]:
        lr, second_order = self.meta.pilot_lr, self.meta.meta_gradient == "double_backward"
        lagged = self.meta.update == "lagged"  # config validation keeps it first order
        student = self.student.module
        compute = mixed_precision(student)
        with self.timer("pilot"):
            with self.timer("pilot/master_weights"):
                theta = master_copy(self.student)
                phis = [master_copy(t) for t in self.teachers]
            dropout_state = rng_state(batch.labels.device)
            with compute, self.student_kernel():
                student_logits = forward(student, theta, batch.student)
            with compute:
                teacher_logits = [forward(t.module, phi, x) for t, phi, x in zip(self.teachers, phis, batch.teachers)]
            mean_teacher = average_logits(teacher_logits)
            pilot_loss = self.loss(student_logits, mean_teacher if second_order else mean_teacher.detach(),
                                   batch.labels)
            # The exact update backpropagates through the pilot forward again (the lagged one needs no second pass).
            grads = torch.autograd.grad(pilot_loss, list(theta.values()), retain_graph=not lagged,
                                        create_graph=second_order)
            if not second_order:
                average(grads)  # several workers: the pilot steps on the whole batch's gradient, as one worker would
            stepped = {n: p - lr * g for (n, p), g in zip(theta.items(), grads)}
            if not second_order:
                stepped = {n: p.detach().requires_grad_() for n, p in stepped.items()}
            # Dead tensors are dropped as soon as possible: each is a full copy of the student.
            pilot_grads = grads if lagged else None
            del grads
        # The quiz runs in fp32 even under bf16: autocast would round θ' back to θ in every matmul, and the small quiz
        # batch's gradient v is where the meta-gradient is most sensitive to rounding (bf16 here: several % off).
        with self.timer("quiz"), dropout(student, self.meta.quiz_dropout):
            quiz_loss = cross_entropy(forward(student, stepped, quiz.student), quiz.labels)
        with self.timer("teacher_update"):
            flat_phis = [p for phi in phis for p in phi.values()]
            if second_order:
                teacher_grads = torch.autograd.grad(quiz_loss, flat_phis, retain_graph=True)
            else:
                v = torch.autograd.grad(quiz_loss, list(stepped.values()))
                average(v)  # the whole quiz batch's gradient
                del stepped
                with self.timer("teacher_update/student_jvp"), compute:
                    w = self.student_jvp(student, theta, v, batch.student, student_logits.detach(), dropout_state)
                del v
                with self.timer("teacher_update/logit_cross_term"):
                    u = logit_cross_term(self.loss, student_logits.detach(), mean_teacher.detach(), batch.labels, w)
                share = -lr * u / len(teacher_logits)  # d(mean)/d(each teacher's logits) = 1/n
                teacher_grads = torch.autograd.grad(teacher_logits, flat_phis, grad_outputs=[share] * len(phis))
            del teacher_logits, mean_teacher, flat_phis
            start = 0
            for engine, phi in zip(self.teachers, phis):
                with self.timer("teacher_update/apply_gradients"):
                    apply_gradients(engine, teacher_grads[start: start + len(phi)])
                with self.timer("teacher_update/teacher_step"):
                    engine.step()
                start += len(phi)
            del teacher_grads
        with self.timer("student_update"):
            if pilot_grads is not None:  # lagged: the pilot's step on the pre-update teachers is the real one
                return self._step_student(pilot_grads, pilot_loss, pilot_loss, quiz_loss)
            # The pilot forward is reused: same θ, same batch, same dropout mask; only the targets changed.
            with self.timer("student_update/teacher_logits"):
                updated_teacher = self.teacher_logits(batch)
            logits = student_logits.detach().requires_grad_()
            real_loss = self.loss(logits, updated_teacher, batch.labels)
            (upstream,) = torch.autograd.grad(real_loss, logits)
            student_grads = torch.autograd.grad(student_logits, list(theta.values()), grad_outputs=upstream)
            del student_logits
            return self._step_student(student_grads, real_loss, pilot_loss, quiz_loss)

    def _step_student(self, grads: Sequence[torch.Tensor], real_loss: torch.Tensor, pilot_loss: torch.Tensor,
                      quiz_loss: torch.Tensor) -> dict[str, float]:
        with self.timer("student_update/apply_gradients"):
            apply_gradients(self.student, grads)
        with self.timer("student_update/student_step"):
            self.student.step()
        return {"kd": real_loss.item(), "pilot_kd": pilot_loss.item(), "quiz_ce": quiz_loss.item()}

    def student_kernel(self) -> AbstractContextManager:
        """The attention kernel of the student's pilot forward: the JVP's (math) while attention draws dropout masks."""
        active = self.meta.meta_gradient != "double_backward" and attention_dropout_active(self.student.module)
        return sdpa_kernel(SDPBackend.MATH) if active else nullcontext()

    def student_jvp(self, student: nn.Module, theta: Params, tangent: Sequence[torch.Tensor],
                    inputs: dict[str, torch.Tensor], pilot_logits: torch.Tensor, dropout_state: tuple) -> torch.Tensor:
        """w = J_θ(z_S)·v at the pilot's θ (whose logits are ``pilot_logits``), replaying the pilot's dropout masks."""
        primal = {n: p.detach() for n, p in theta.items()}
        tangents = dict(zip(theta, tangent))
        logits_at = lambda params: forward(student, params, inputs)  # noqa: E731
        if self.meta.meta_gradient == "forward_ad":
            # Fused attention kernels have no forward-mode derivative; the math kernel is plain differentiable ops.
            with replay_rng(dropout_state), sdpa_kernel(SDPBackend.MATH):
                return jvp(logits_at, (primal,), (tangents,))[1]
        with self.student_kernel():
            return finite_difference_jvp(logits_at, primal, tangents, pilot_logits, dropout_state)


def build(trial: Trial, quiz: Iterator[Batch] | None) -> MetaDistil:
    """The registry's builder (trainer/registry.py): the teachers are the trial's teacher engines."""
    assert quiz is not None, "the registry passes quiz batches to an algorithm declared with quiz=True"
    teachers = [trial.engines[f"teacher_{i}"] for i in range(len(trial.teachers))]
    return MetaDistil(trial.engines["student"], teachers, trial.cfg.distill, trial.cfg.metadistil, quiz, trial.timer)


def logit_cross_term(loss: Callable, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u = ∂/∂z_T ⟨∂ℓ/∂z_S, w⟩: the mixed second derivative of the loss in the logits, applied to w."""
    z_s = student_logits.detach().requires_grad_()
    z_t = teacher_logits.detach().requires_grad_()
    (d_student,) = torch.autograd.grad(loss(z_s, z_t, labels), z_s, create_graph=True)
    (u,) = torch.autograd.grad((d_student * w).sum(), z_t)
    return u


def finite_difference_jvp(fn: Callable[[Params], torch.Tensor], primal: Params, tangents: Params,
                          at_primal: torch.Tensor, dropout_state: tuple) -> torch.Tensor:
    """(f(θ + h v̂) − f(θ)) / h · |v|: one forward, f(θ) = ``at_primal`` (the pilot's logits) reused.

    The step h = sqrt(eps) of the dtype along the unit tangent balances truncation against rounding: at MiniLM size
    in fp32 it measured 1.1e-4 relative error against forward-mode AD (h = 1e-4: 2.1e-4, 1e-3: 2.7e-4, 1e-2: 2.6e-3).
    """
    tangent_norm = float(torch.nn.utils.get_total_norm(list(tangents.values())))
    if tangent_norm == 0:
        return torch.zeros_like(at_primal)
    scale = float(torch.finfo(at_primal.dtype).eps) ** 0.5 / tangent_norm
    with torch.no_grad(), replay_rng(dropout_state):
        stepped = fn({n: p + scale * tangents[n] for n, p in primal.items()})
    return (stepped - at_primal) / scale


LOW_PRECISION = (torch.bfloat16, torch.float16)


def master_copy(engine: Engine) -> Params:
    """Detached fp32 (or wider) leaves of the engine's trainable parameters, free of engine hooks.

    fp32 modules: the parameters' own storage, no copy. Low-precision modules (DeepSpeed bf16): the engine's fp32
    master weights where DeepSpeed exposes them (ZeRO 1/2), else an fp32 copy of the module's weights (ZeRO 0's
    optimizer keeps its masters unexposed; they differ from these by bf16 rounding).
    """
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = p.detach()
        if p.dtype in LOW_PRECISION:
            master = _deepspeed_master(p)
            leaf = p.detach().float() if master is None else master.detach()
        out[name] = leaf.requires_grad_()
    return out


def _deepspeed_master(param: torch.Tensor) -> torch.Tensor | None:
    if not hasattr(param, "_hp_mapping"):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def mixed_precision(module: nn.Module) -> AbstractContextManager:
    """Compute in the module's own low precision (bf16 under DeepSpeed bf16) on fp32 parameters, as AMP does."""
    param = next(module.parameters())
    if param.dtype not in LOW_PRECISION:
        return nullcontext()
    return torch.autocast(device_type=param.device.type, dtype=param.dtype)


@contextmanager
def dropout(module: nn.Module, on: bool):
    """Run a block with the module's dropout on or off; its mode outside the block is left as it was."""
    was_training = module.training
    module.train(on)
    try:
        yield
    finally:
        module.train(was_training)


def attention_dropout_active(module: nn.Module) -> bool:
    """Whether the module's attention draws dropout masks now: in training mode with a nonzero attention dropout
    (BERT/RoBERTa ``attention_probs_dropout_prob``, DistilBERT ``attention_dropout``). A config that names no such
    rate counts as active: the math kernel is then used, which is right either way."""
    if not module.training:
        return False
    config = getattr(module, "config", None)
    rates = [v for k, v in vars(config).items() if "attention" in k and "dropout" in k
             and isinstance(v, (int, float))] if config is not None else []
    return not rates or any(rate > 0 for rate in rates)


def forward(module: nn.Module, params: Params, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's logits with ``params`` in place of its own, at least in fp32 (autocast computes them in bf16)."""
    logits = functional_call(module, params, args=(), kwargs=inputs).logits
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None, device


@contextmanager
def replay_rng(state: tuple):
    """Run a block with the RNG as it was at ``state``; the RNG outside the block is left as it was."""
    cpu, cuda, device = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
