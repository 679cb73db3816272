"""MetaDistil (Zhou et al. 2022): the teachers learn to teach from the student's quiz results.

One meta step on a training batch x and a quiz batch q, with student θ, teachers φ and pilot step size λ:
  1. pilot:  θ' = θ − λ ∇θ ℓ(z_S(θ; x), z_T(φ; x))                  (a functional copy; the real student is untouched)
  2. quiz:   L_q(θ') = CE(z_S(θ'; q)); every teacher takes an optimizer step on ∇φ L_q(θ')
  3. real:   the real student takes its KD step on x with the updated teachers' logits (``update: exact``), or the
             pilot's own step, whose teachers are one meta-update behind (``update: lagged``: no second teacher
             forward, no second student backward).

∇φ L_q needs no double backward through the student: φ enters the pilot loss only through the teachers' outputs
o_T = (z_T, and with ``distill.hidden`` the mapped [CLS] states h_T), so with v = ∇θ' L_q and w = J_θ(o_S)·v (one
Jacobian-vector product over every student output the loss reads: z_S, and h_S, its projection's weights part of θ),
  ∇φ L_q = −λ J_φ(o_T)ᵀ u,   u = ∂/∂o_T ⟨∂ℓ/∂o_S, w⟩   (small products on the outputs only, per example).
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
from functools import partial
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
from trainer.hidden import HiddenMap
from trainer.losses import Outputs, average_outputs, task_loss
from trainer.metrics import PhaseTimer

if TYPE_CHECKING:
    from trainer.build import Trial

Params = dict[str, torch.Tensor]


class MetaDistil(KD[Engine]):
    name = "metadistil"

    def __init__(self, student: Engine, teachers: Sequence[Engine], distill: DistillConfig, meta: MetaDistilConfig,
                 quiz_batches: Iterator[Batch], timer: PhaseTimer | None = None, hidden: HiddenMap | None = None):
        super().__init__(student, teachers, distill, hidden=hidden)
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
                student_outputs = self.student_forward(theta, batch.student)
            with compute:
                teacher_outputs = [self.teacher_forward(i, phi, x) for i, (phi, x) in enumerate(zip(phis,
                                                                                                   batch.teachers))]
            mean_teacher = average_outputs(teacher_outputs)
            pilot_loss = self.loss(student_outputs, mean_teacher if second_order else detached(mean_teacher),
                                   batch.labels)
            # The exact update backpropagates through the pilot forward again (the lagged one needs no second pass).
            grads = torch.autograd.grad(pilot_loss, list(theta.values()), retain_graph=not lagged,
                                        create_graph=second_order)
            if not second_order:
                average(grads)  # several workers: the pilot steps on the whole batch's gradient, as one worker would
            stepped = {n: torch.add(p, g, alpha=-lr) for (n, p), g in zip(theta.items(), grads)}  # one pass, one tensor
            if not second_order:
                stepped = {n: p.detach().requires_grad_() for n, p in stepped.items()}
            # Dead tensors are dropped as soon as possible: each is a full copy of the student.
            pilot_grads = grads if lagged else None
            pilot_teacher = detached(mean_teacher) if lagged else None  # the lagged step's targets, to log its losses
            del grads
        # The quiz runs in fp32 even under bf16: autocast would round θ' back to θ in every matmul, and the small quiz
        # batch's gradient v is where the meta-gradient is most sensitive to rounding (bf16 here: several % off).
        with self.timer("quiz"), dropout(student, self.meta.quiz_dropout):
            quiz_loss = task_loss(forward(student, stepped, quiz.student)[0], quiz.labels)
        with self.timer("teacher_update"):
            flat_phis = [p for phi in phis for p in phi.values()]
            if second_order:
                teacher_grads = torch.autograd.grad(quiz_loss, flat_phis, retain_graph=True)
            else:
                # zeros for what the quiz's logits do not read (a distill.hidden projection)
                v = torch.autograd.grad(quiz_loss, list(stepped.values()), materialize_grads=True)
                average(v)  # the whole quiz batch's gradient
                del stepped
                with self.timer("teacher_update/student_jvp"), compute:
                    w = self.student_jvp(theta, v, batch.student, detached(student_outputs), dropout_state)
                del v
                # (the phase keeps its name from when the loss read logits only: benchmark reports compare by it)
                with self.timer("teacher_update/logit_cross_term"):
                    u = cross_term(self.loss, detached(student_outputs), detached(mean_teacher), batch.labels, w)
                share = [-lr * part / len(phis) for part in u]  # d(mean)/d(each teacher's output) = 1/n
                teacher_grads = torch.autograd.grad([o for out in teacher_outputs for o in out], flat_phis,
                                                    grad_outputs=share * len(phis))
            del teacher_outputs, mean_teacher, flat_phis
            start = 0
            for engine, phi in zip(self.teachers, phis):
                with self.timer("teacher_update/apply_gradients"):
                    apply_gradients(engine, teacher_grads[start: start + len(phi)])
                with self.timer("teacher_update/teacher_step"):
                    engine.step()
                start += len(phi)
            del teacher_grads
        with self.timer("student_update"):
            if pilot_grads is not None and pilot_teacher is not None:
                # lagged: the pilot's step on the pre-update teachers is the real one
                named = self.named_losses(pilot_loss, student_outputs, pilot_teacher)
                return self._step_student(pilot_grads, named, pilot_loss, quiz_loss)
            # The pilot forward is reused: same θ, same batch, same dropout mask; only the targets changed.
            with self.timer("student_update/teacher_logits"):
                updated_teacher = self.teacher_outputs(batch)
            outputs = tuple(o.detach().requires_grad_() for o in student_outputs)
            real_loss = self.loss(outputs, updated_teacher, batch.labels)
            upstream = torch.autograd.grad(real_loss, outputs)
            student_grads = torch.autograd.grad(student_outputs, list(theta.values()), grad_outputs=upstream)
            del student_outputs
            return self._step_student(student_grads, self.named_losses(real_loss, outputs, updated_teacher),
                                      pilot_loss, quiz_loss)

    def _step_student(self, grads: Sequence[torch.Tensor], named: dict[str, float], pilot_loss: torch.Tensor,
                      quiz_loss: torch.Tensor) -> dict[str, float]:
        with self.timer("student_update/apply_gradients"):
            apply_gradients(self.student, grads)
        with self.timer("student_update/student_step"):
            self.student.step()
        return {**named, "pilot_kd": pilot_loss.item(), "quiz_ce": quiz_loss.item()}

    def student_forward(self, params: Params, inputs: dict[str, torch.Tensor]) -> Outputs:
        """The student's outputs that the loss reads, with ``params`` (θ, its projection's included) in place."""
        student = self.student.module
        if self.hidden is None:
            return forward(student, params, inputs)
        return forward(student, params, inputs, partial(self.hidden.student_states, student, params=params))

    def teacher_forward(self, index: int, params: Params, inputs: dict[str, torch.Tensor]) -> Outputs:
        states = None if self.hidden is None else partial(self.hidden.teacher_states, index)
        return forward(self.teachers[index].module, params, inputs, states)

    def student_kernel(self) -> AbstractContextManager:
        """The attention kernel of the student's pilot forward: the JVP's (math) while attention draws dropout masks."""
        active = self.meta.meta_gradient != "double_backward" and attention_dropout_active(self.student.module)
        return sdpa_kernel(SDPBackend.MATH) if active else nullcontext()

    def student_jvp(self, theta: Params, tangent: Sequence[torch.Tensor], inputs: dict[str, torch.Tensor],
                    pilot_outputs: Outputs, dropout_state: tuple) -> Outputs:
        """w = J_θ(o_S)·v at the pilot's θ (whose outputs are ``pilot_outputs``), replaying its dropout masks."""
        primal = {n: p.detach() for n, p in theta.items()}
        tangents = dict(zip(theta, tangent))
        outputs_at = partial(self.student_forward, inputs=inputs)
        if self.meta.meta_gradient == "forward_ad":
            # Fused attention kernels have no forward-mode derivative; the math kernel is plain differentiable ops.
            with replay_rng(dropout_state), sdpa_kernel(SDPBackend.MATH):
                return jvp(outputs_at, (primal,), (tangents,))[1]
        with self.student_kernel():
            return finite_difference_jvp(outputs_at, primal, tangents, pilot_outputs, dropout_state)


def build(trial: Trial, quiz: Iterator[Batch] | None) -> MetaDistil:
    """The registry's builder (trainer/registry.py): the teachers are the trial's teacher engines."""
    assert quiz is not None, "the registry passes quiz batches to an algorithm declared with quiz=True"
    teachers = [trial.engines[f"teacher_{i}"] for i in range(len(trial.teachers))]
    return MetaDistil(trial.engines["student"], teachers, trial.cfg.distill, trial.cfg.metadistil, quiz, trial.timer,
                      trial.hidden)


def detached(outputs: Outputs) -> Outputs:
    return tuple(o.detach() for o in outputs)


def cross_term(loss: Callable, student: Outputs, teacher: Outputs, labels: torch.Tensor, w: Outputs) -> Outputs:
    """u = ∂/∂o_T ⟨∂ℓ/∂o_S, w⟩: the mixed second derivative of the loss in the outputs, applied to w."""
    o_s = tuple(o.detach().requires_grad_() for o in student)
    o_t = tuple(o.detach().requires_grad_() for o in teacher)
    d_student = torch.autograd.grad(loss(o_s, o_t, labels), o_s, create_graph=True)
    inner = torch.stack([(d * part).sum() for d, part in zip(d_student, w, strict=True)]).sum()
    return torch.autograd.grad(inner, o_t)


def finite_difference_jvp(fn: Callable[[Params], Outputs], primal: Params, tangents: Params, at_primal: Outputs,
                          dropout_state: tuple) -> Outputs:
    """(f(θ + h v̂) − f(θ)) / h · |v|: one forward, f(θ) = ``at_primal`` (the pilot's outputs) reused.

    The step h = sqrt(eps) of the dtype along the unit tangent balances truncation against rounding: at MiniLM size
    in fp32 it measured 1.1e-4 relative error against forward-mode AD (h = 1e-4: 2.1e-4, 1e-3: 2.7e-4, 1e-2: 2.6e-3).
    """
    tangent_norm = float(torch.nn.utils.get_total_norm(list(tangents.values())))
    if tangent_norm == 0:
        return tuple(torch.zeros_like(o) for o in at_primal)
    scale = float(torch.finfo(at_primal[0].dtype).eps) ** 0.5 / tangent_norm
    with torch.no_grad(), replay_rng(dropout_state):
        stepped = fn({n: torch.add(p, tangents[n], alpha=scale) for n, p in primal.items()})
    return tuple((s - o) / scale for s, o in zip(stepped, at_primal, strict=True))


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


def forward(module: nn.Module, params: Params, inputs: dict[str, torch.Tensor],
            states: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None) -> Outputs:
    """The module's logits, and with ``states`` what it makes of the module's hidden states, with ``params`` in place
    of the module's own, at least in fp32 (autocast computes them in bf16)."""
    if states is None:
        outputs: Outputs = (functional_call(module, params, args=(), kwargs=inputs).logits,)
    else:
        out = functional_call(module, params, args=(), kwargs={**inputs, "output_hidden_states": True})
        outputs = (out.logits, states(out.hidden_states))
    return tuple(o.to(torch.promote_types(o.dtype, torch.float32)) for o in outputs)


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
