"""One trial, top to bottom: data, models, warm-up, training, evaluation, outputs.

``run_trial`` runs the same from a test, from the CLI and inside a Ray worker; trackers come in as loggers.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from trainer import checkpoint
from trainer.algorithms import KD, FineTune, MetaDistil
from trainer.config import TrialConfig, flatten
from trainer.data import Batch, Collator, Splits, TextSet, index_batches, load_splits
from trainer.distributed import check_workers, is_main, shard, world
from trainer.engine import wrap
from trainer.evaluation import accuracy
from trainer.logging import Logger, Loggers, StdoutLogger
from trainer.metrics import PhaseTimer
from trainer.models import Loaded, count_parameters, load_model, pick_device, student_from_teacher, times_smaller


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message says at which step and which loss."""


@dataclass
class TrialResult:
    metrics: dict[str, float]
    output_dir: Path


def run_trial(cfg: TrialConfig, loggers: list[Logger] | None = None, progress: bool = True,
              on_eval=None, checkpoint_dir: Path | None = None) -> TrialResult:
    """Train and evaluate one trial.

    ``on_eval(step, metrics)`` is called after each evaluation (e.g. a Tune reporter). With ``checkpoint_dir``, the
    trial checkpoints there at each evaluation and, when a checkpoint is already there, continues from it.
    """
    log = Loggers([StdoutLogger(), *(loggers or [])])
    log.log_params(flatten(cfg))
    log.set_tags({"algorithm": cfg.algorithm})
    try:
        result = _run(cfg, log, progress, on_eval, checkpoint_dir)
    except BaseException as err:
        log.finish("FAILED", f"{type(err).__name__}: {err}")
        raise
    log.finish("FINISHED")
    return result


def _run(cfg: TrialConfig, log: Loggers, progress: bool, on_eval, checkpoint_dir: Path | None) -> TrialResult:
    check_workers(cfg, world()[1])
    _seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    splits = load_splits(cfg.data, cfg.seed)
    attn = "eager" if cfg.algorithm == "metadistil" and cfg.metadistil.meta_gradient == "double_backward" else None
    teachers = [load_model(spec, splits.num_labels, f"teachers.{i}", attn) for i, spec in enumerate(cfg.teachers)]
    student = load_student(cfg, splits.num_labels, attn)
    collate = Collator.for_training(student.tokenizer, [t.tokenizer for t in teachers], cfg.data.max_length,
                                    cfg.noise, cfg.seed, splits.train, cfg.data.token_cache)
    sizes = _model_sizes(student, teachers)
    log.log_metrics({**{f"data_{k}": v for k, v in splits.sizes().items()}, **sizes}, step=0)

    opt = cfg.optim
    student_engine = wrap(student.model.to(device).train(), opt.lr, opt.weight_decay, cfg.deepspeed,
                          _worker_batch(opt.batch_size), opt.grad_clip)
    timer = PhaseTimer(device)
    steps_per_epoch = math.ceil(len(splits.train) / opt.batch_size)
    warmup_steps = math.ceil(cfg.warmup.epochs * steps_per_epoch)
    total = math.ceil(opt.epochs * steps_per_epoch)
    total = min(total, opt.max_steps) if opt.max_steps else total

    engines = {"student": student_engine}
    if cfg.algorithm == "metadistil":
        engines.update({f"teacher_{i}": wrap_teacher(cfg, t, device) for i, t in enumerate(teachers)})
    config_key = checkpoint.fingerprint(cfg)
    resumed = checkpoint.load(checkpoint_dir, engines, config_key) if checkpoint_dir else None
    start, best = resumed or (0, None)
    if resumed:
        log.set_tags({"resumed_from_step": str(start)})
    elif warmup_steps:
        _train(FineTune(student_engine), splits.train, collate, warmup_steps, cfg, device, log, progress, timer,
               phase="warmup", stream_seed=cfg.seed + 1, with_teachers=False)

    algorithm = _build_algorithm(cfg, engines, teachers, splits, collate, device, timer, start)
    save = (lambda step, best_so_far: checkpoint.save(checkpoint_dir, step, best_so_far, engines, config_key)) \
        if checkpoint_dir else None
    evaluate = lambda: accuracy(student_engine.module, splits.validation, collate, cfg.eval.batch_size, device)  # noqa: E731
    best = _train(algorithm, splits.train, collate, total, cfg, device, log, progress, timer, phase="train",
                  stream_seed=cfg.seed, with_teachers=cfg.algorithm != "finetune", evaluate=evaluate,
                  on_eval=on_eval, start=start, best=best, save=save)

    student_engine.module.load_state_dict(best["state"])
    test_acc = accuracy(student_engine.module, splits.test, collate, cfg.eval.batch_size, device)
    metrics = {"best_val_accuracy": best["accuracy"], "best_step": best["step"], "test_accuracy": test_acc,
               "warmup_steps": warmup_steps, "train_steps": total, **sizes, **timer.summary()}
    log.log_metrics(metrics, step=warmup_steps + total)
    out = Path(cfg.output.dir)
    if is_main():
        _save(cfg, student_engine.module, student.tokenizer, algorithm, teachers, metrics, log)
        if checkpoint_dir:
            checkpoint.remove(checkpoint_dir)  # the trial is complete; its outputs replace the checkpoint
    return TrialResult(metrics, out)


def _train(algorithm, train: TextSet, collate: Collator, steps: int, cfg: TrialConfig, device: torch.device,
           log: Loggers, progress: bool, timer: PhaseTimer, phase: str, stream_seed: int, with_teachers: bool,
           evaluate=None, on_eval=None, start: int = 0, best: dict | None = None, save=None) -> dict:
    """Run training steps ``start``..``steps``-1; with ``evaluate``, keep the best-validation weights (returned)
    and, with ``save``, checkpoint after each evaluation."""
    best = best or {"accuracy": -1.0, "step": 0, "state": None}
    noisy = phase == "train"  # warm-up fine-tunes on clean text
    bar = tqdm(total=steps, initial=start, desc=phase, disable=not progress, dynamic_ncols=True)
    stream = itertools.islice(batch_stream(len(train), cfg.optim.batch_size, stream_seed, steps), start, None)
    for step, (epoch, indices) in enumerate(stream, start=start):
        batch = collate(train, shard(indices), epoch if noisy else None, with_teachers).to(device)
        with timer(f"{phase}_step"):
            losses = algorithm.train_step(batch, step)
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(f"{phase} step {step}: loss {', '.join(f'{k}={v}' for k, v in bad.items())} "
                                     f"is not finite")
        log.log_metrics({f"{phase}/{k}": v for k, v in losses.items()}, step=step)
        bar.update()
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
        if evaluate and ((step + 1) % cfg.eval.every_steps == 0 or step + 1 == steps):
            val = evaluate()
            if val > best["accuracy"]:
                best = {"accuracy": val, "step": step + 1, "state": _cpu_copy(algorithm.student.module)}
            metrics = {"val_accuracy": val, "best_val_accuracy": best["accuracy"], "epoch": epoch}
            log.log_metrics(metrics, step=step + 1)
            if save:
                save(step + 1, best)
            if on_eval:
                on_eval(step + 1, metrics)
    bar.close()
    return best


def batch_stream(n: int, batch_size: int, seed: int, steps: int) -> Iterator[tuple[int, np.ndarray]]:
    """``steps`` batches of indices, reshuffled every epoch."""
    step, epoch = 0, 0
    while True:
        for indices in index_batches(n, batch_size, seed, epoch):
            if step == steps:
                return
            yield epoch, indices
            step += 1
        epoch += 1


def quiz_stream(quiz: TextSet, collate: Collator, batch_size: int, seed: int, device: torch.device,
                 start: int = 0) -> Iterator[Batch]:
    """Quiz batches; draw i depends only on (seed, i), so a resumed trial continues the same sequence."""
    for draw in itertools.count(start):
        indices = np.random.default_rng([seed, 7, draw]).choice(len(quiz), size=batch_size, replace=False)
        yield collate(quiz, shard(indices), epoch=None, with_teachers=False).to(device)


def wrap_teacher(cfg: TrialConfig, teacher: Loaded, device: torch.device):
    # Teachers run without dropout: their logits are the student's targets. They still learn (meta-updates).
    return wrap(teacher.model.to(device).eval(), cfg.metadistil.teacher_lr, cfg.optim.weight_decay, cfg.deepspeed,
                _worker_batch(cfg.optim.batch_size), cfg.optim.grad_clip)


def _worker_batch(batch_size: int) -> int:
    """Each worker's share of a global batch; the global batch is the trial's, whatever the number of workers."""
    return batch_size // world()[1]


def _build_algorithm(cfg: TrialConfig, engines: dict, teachers: list[Loaded], splits: Splits, collate: Collator,
                     device: torch.device, timer: PhaseTimer, start: int):
    student_engine = engines["student"]
    if cfg.algorithm == "finetune":
        return FineTune(student_engine)
    if cfg.algorithm == "kd":
        frozen = [t.model.to(device).eval().requires_grad_(False) for t in teachers]
        return KD(student_engine, frozen, cfg.distill)
    k = cfg.metadistil.meta_interval
    quiz = quiz_stream(splits.quiz, collate, cfg.metadistil.quiz_batch_size, cfg.seed, device,
                        start=(start + k - 1) // k)  # meta steps already taken
    teacher_engines = [engines[f"teacher_{i}"] for i in range(len(teachers))]
    return MetaDistil(student_engine, teacher_engines, cfg.distill, cfg.metadistil, quiz, timer)


def load_student(cfg: TrialConfig, num_labels: int, attn: str | None) -> Loaded:
    student = load_model(cfg.student, num_labels, "student", attn)
    if cfg.student.init_layers:
        student.model = student_from_teacher(student.model, cfg.student.init_layers)
    return student


def _model_sizes(student: Loaded, teachers: list[Loaded]) -> dict[str, float]:
    sizes: dict[str, float] = {"student_params": count_parameters(student.model)}
    if teachers:
        teacher_params = [count_parameters(t.model) for t in teachers]
        sizes["teacher_params_mean"] = sum(teacher_params) / len(teacher_params)
        sizes["times_smaller"] = times_smaller(int(sizes["student_params"]), teacher_params)
    return sizes


def _save(cfg: TrialConfig, model, tokenizer, algorithm, teachers: list[Loaded], metrics: dict,
          log: Loggers) -> None:
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    if cfg.output.save_teachers and isinstance(algorithm, MetaDistil):
        for i, (engine, loaded) in enumerate(zip(algorithm.teachers, teachers)):
            engine.module.save_pretrained(out / f"teacher_{i}")
            loaded.tokenizer.save_pretrained(out / f"teacher_{i}")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.log_artifacts(out, "trial")


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

