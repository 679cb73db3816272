"""Does a MetaDistil teacher step lower the quiz loss of a pilot student? Sign and size of the meta-gradient.

    python bench/meta_probe.py configs/trial/metadistil.yaml teachers.0.name=FOLDER student.name=FOLDER --steps 20

The trial is built by ``trainer.build.build_trial``, as ``metadistil train`` builds it, on CPU with DeepSpeed off
(the probe reads the teachers' gradients, and the DeepSpeed path equals plain torch, see
tests/integration/test_deepspeed.py).
Then for each of ``--steps`` training batches, with the quiz batches the trial would draw:

  plain     L_q(θ)            the quiz loss of the student itself
  before    L_q(θ'(φ))        the pilot's quiz loss, θ' = θ − λ ∇θ ℓ(θ, φ), with the teachers as they are
  after     L_q(θ'(φ + Δ))    Δ: the teacher step the project's MetaDistil step takes (its optimizer, its lr)
  reversed  L_q(θ'(φ − Δ))    the opposite step: a sign check, it should rise where ``after`` falls
  random    L_q(θ'(φ + r))    r: a random direction of Δ's norm: how much any step of that size moves the quiz loss
  predicted ⟨g, Δ⟩            the first-order change from the meta-gradient g the step computed

Pilot steps are taken without dropout, on the student before its real step. The quiz is evaluated as the trial
evaluates it: with dropout only when ``metadistil.quiz_dropout`` is true, and then with the same dropout masks in every
column of a step, so the columns differ only in the teachers. The step itself (student and teachers) then proceeds as
in a trial, so the probe follows a trial's trajectory. The teachers' validation accuracy is measured before the first
and after the last step (do meta-updates hurt them?).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import cast

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.algorithms.metadistil import MetaDistil, forward, replay_rng, rng_state  # noqa: E402
from trainer.build import build_trial  # noqa: E402
from trainer.config import ConfigError, TrialConfig, load_config  # noqa: E402
from trainer.engine import TorchEngine  # noqa: E402
from trainer.evaluation import accuracy  # noqa: E402
from trainer.loop import batch_stream  # noqa: E402
from trainer.losses import task_loss  # noqa: E402

COLUMNS = ("plain", "before", "after", "reversed", "random", "predicted")


class RecordingEngine(TorchEngine):
    """A teacher's plain-torch engine that keeps the gradients its last step applied: the meta-gradient g."""

    def __init__(self, engine: TorchEngine):
        super().__init__(engine.module, engine.optimizer, engine.grad_clip)
        self.lr_scheduler = engine.lr_scheduler  # the trial's schedule, not a new one on the same optimizer
        self.grads: list[torch.Tensor] = []

    def step(self) -> None:
        self.grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for p in trainable(self.module)]
        super().step()


def pilot_quiz_loss(algo: MetaDistil, theta: dict[str, torch.Tensor], batch, quiz, lr: float,
                    quiz_rng: tuple | None) -> float:
    """L_q(θ − lr ∇θ ℓ(θ, φ)) with the teachers' current φ; lr = 0 gives the student's own quiz loss. The quiz runs
    with dropout when ``quiz_rng`` is given, its masks drawn from that RNG state."""
    student = algo.student.module
    was_training = student.training
    params = {n: p.detach().requires_grad_() for n, p in theta.items()}
    try:
        student.eval()  # pilot steps without dropout, so that the columns of a step differ only in the teachers
        if lr:
            loss = algo.loss(algo.student_forward(params, batch.student), algo.teacher_outputs(batch), batch.labels)
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        student.train(quiz_rng is not None)
        with torch.no_grad(), replay_rng(quiz_rng) if quiz_rng else nullcontext():
            return task_loss(forward(student, params, quiz.student)[0], quiz.labels).item()
    finally:
        student.train(was_training)


def set_teachers(algo: MetaDistil, values: list[list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for engine, tensors in zip(algo.teachers, values):
            for p, v in zip(trainable(engine.module), tensors):
                p.copy_(v)


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def probe_step(algo: MetaDistil, batch, quiz, generator: torch.Generator) -> dict[str, float]:
    student = algo.student.module
    theta = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    phi0 = [[p.detach().clone() for p in trainable(t.module)] for t in algo.teachers]
    lr = algo.meta.pilot_lr
    # One RNG state for every column's quiz masks; replaying it leaves the trial's own RNG where it was.
    quiz_rng = rng_state(quiz.labels.device) if algo.meta.quiz_dropout else None
    row = {"plain": pilot_quiz_loss(algo, theta, batch, quiz, 0.0, quiz_rng),
           "before": pilot_quiz_loss(algo, theta, batch, quiz, lr, quiz_rng)}
    algo.meta_step(batch, quiz)
    seen = [cast(RecordingEngine, t).grads for t in algo.teachers]  # run() wrapped them
    phi1 = [[p.detach().clone() for p in trainable(t.module)] for t in algo.teachers]
    deltas = [[b - a for a, b in zip(before, after)] for before, after in zip(phi0, phi1)]
    flat = [d for ds in deltas for d in ds]
    norm = float(torch.nn.utils.get_total_norm(flat))
    noise = [torch.randn(d.shape, generator=generator, dtype=d.dtype) for d in flat]
    scale = norm / float(torch.nn.utils.get_total_norm(noise))
    randoms, start = [], 0
    for ds in deltas:
        randoms.append([scale * r for r in noise[start:start + len(ds)]])
        start += len(ds)
    for name, values in (("reversed", [[a - d for a, d in zip(p, ds)] for p, ds in zip(phi0, deltas)]),
                         ("random", [[a + r for a, r in zip(p, rs)] for p, rs in zip(phi0, randoms)]),
                         ("after", phi1)):  # last, so the teachers are left as the step made them
        set_teachers(algo, values)
        row[name] = pilot_quiz_loss(algo, theta, batch, quiz, lr, quiz_rng)
    row["predicted"] = sum(float((g * d).sum()) for gs, ds in zip(seen, deltas) for g, d in zip(gs, ds))
    row["step_norm"] = norm
    row["grad_norm"] = float(torch.nn.utils.get_total_norm([g for gs in seen for g in gs]))
    return row


def run(cfg: TrialConfig, steps: int, seed: int = 0, evaluate_teachers: bool = True, out=print) -> dict:
    cfg = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"enabled": False})})
    trial = build_trial(cfg, torch.device("cpu"))
    trial.engines.update({name: RecordingEngine(engine) for name, engine in trial.engines.items()
                          if name.startswith("teacher_") and isinstance(engine, TorchEngine)})  # DeepSpeed is off
    algo = trial.algorithm()
    if not isinstance(algo, MetaDistil):
        raise ConfigError(f"algorithm: the probe needs a metadistil trial, the config says {cfg.algorithm!r}")
    splits = trial.splits
    generator = torch.Generator().manual_seed(seed)

    def teacher_accuracy() -> list[float]:
        return [accuracy(t.module, splits.validation, trial.collate, cfg.eval.batch_size, trial.device)
                for t in algo.teachers]

    start_accuracy = teacher_accuracy() if evaluate_teachers else []
    out(f"{'step':>4} " + " ".join(f"{c:>10}" for c in COLUMNS) + f" {'|Δ|':>9} {'|g|':>9}")
    rows = []
    for step, (epoch, indices) in enumerate(batch_stream(len(splits.train), cfg.optim.batch_size, cfg.seed, steps)):
        batch = trial.collate(splits.train, indices, epoch, with_teachers=True)
        row = probe_step(algo, batch, next(algo.quiz_batches), generator)
        rows.append(row)
        out(f"{step:>4} " + " ".join(f"{row[c]:>10.6f}" for c in COLUMNS[:5]) + f" {row['predicted']:>10.2e}"
            f" {row['step_norm']:>9.3e} {row['grad_norm']:>9.3e}")
    changes = {name: [r[name] - r["before"] for r in rows] for name in ("after", "reversed", "random")}
    summary = {
        "steps": len(rows),
        "pilot_gain": statistics.fmean(r["plain"] - r["before"] for r in rows),
        **{f"mean_{name}_minus_before": statistics.fmean(v) for name, v in changes.items()},
        "mean_predicted": statistics.fmean(r["predicted"] for r in rows),
        "share_after_below_before": sum(v < 0 for v in changes["after"]) / len(rows),
        "share_reversed_above_before": sum(v > 0 for v in changes["reversed"]) / len(rows),
        "teacher_val_accuracy_start": start_accuracy,
        "teacher_val_accuracy_end": teacher_accuracy() if evaluate_teachers else [],
    }
    for key, value in summary.items():
        out(f"probe {key} {value}")
    return {"rows": rows, "summary": summary}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a metadistil trial config (YAML)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `metadistil train`")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-teacher-accuracy", action="store_true", help="skip the teachers' validation accuracy")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    if cfg.algorithm != "metadistil":
        p.error(f"algorithm: the probe needs a metadistil trial, the config says {cfg.algorithm!r}")
    run(cfg, args.steps, evaluate_teachers=not args.no_teacher_accuracy)


if __name__ == "__main__":
    main()
