"""Building a trial: data, collator, models, engines, phase timer and algorithm, exactly as a trial runs them.

``run_trial`` trains what ``build_trial`` builds, and the benchmarks in bench/ build through it too, so that they
measure what trials run.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainer import registry
from trainer.allocator import keep_large_blocks_on_heap
from trainer.config import TrialConfig
from trainer.data import Batch, Collator, Splits, TextSet, load_splits
from trainer.distributed import check_workers, shard, world
from trainer.engine import Engine, Schedule, wrap
from trainer.hidden import HiddenMap, prepare
from trainer.metrics import PhaseTimer
from trainer.models import Loaded, count_parameters, load_model, pick_device, student_from_teacher, times_smaller
from trainer.tokenized import takes_segments


@dataclass
class Trial:
    """A built trial: what ``run_trial`` trains and the benchmarks measure."""

    cfg: TrialConfig
    device: torch.device
    splits: Splits
    collate: Collator
    student: Loaded
    teachers: list[Loaded]
    engines: dict[str, Engine]  # "student", and "teacher_<i>" for trainable teachers
    timer: PhaseTimer
    sizes: dict[str, float]  # parameter counts, taken before wrapping (ZeRO-3 empties the wrapped parameters)
    warmup_steps: int  # student fine-tuning steps before distillation
    train_steps: int
    hidden: HiddenMap | None = None  # distill.hidden resolved for these models (trainer.hidden)

    def algorithm(self, start: int = 0, quiz_batches: Iterator[Batch] | None = None) -> registry.Algorithm:
        """The trial's algorithm, continuing after ``start`` training steps: a resumed trial's quiz draws go on where
        they stopped. ``quiz_batches`` replaces the quiz stream (benchmarks feed batches of a fixed shape)."""
        cfg, spec = self.cfg, registry.get(self.cfg.algorithm)
        if not spec.quiz:
            return spec.make(self, None)
        if quiz_batches is None:
            k = cfg.metadistil.meta_interval
            quiz_batches = quiz_stream(self.splits.quiz, self.collate, cfg.metadistil.quiz_batch_size, cfg.seed,
                                       self.device, start=(start + k - 1) // k)  # meta steps already taken
        return spec.make(self, quiz_batches)


def build_trial(cfg: TrialConfig, device: torch.device | None = None) -> Trial:
    """Seed every RNG with ``cfg.seed``, then load and wrap; ``device`` None picks ``cfg.device``."""
    check_workers(cfg, world()[1])
    keep_large_blocks_on_heap()  # before the first large tensor: CPU steps reuse freed memory (trainer/allocator.py)
    seed_everything(cfg.seed)
    device = device or pick_device(cfg.device)
    splits = load_splits(cfg.data, cfg.seed)
    algorithm = registry.get(cfg.algorithm)
    attn = algorithm.attention(cfg) if algorithm.attention else None
    teachers = [load_model(spec, splits.num_labels, f"teachers.{i}", attn) for i, spec in enumerate(cfg.teachers)]
    student = _load_student(cfg, splits.num_labels, attn)
    collate = Collator.for_training(student.tokenizer, [t.tokenizer for t in teachers], cfg.data.max_length,
                                    cfg.noise, cfg.seed, splits.train, cfg.data.token_cache,
                                    [takes_segments(m.tokenizer, m.model.config) for m in (student, *teachers)])
    sizes = _model_sizes(student, teachers)  # a hidden_projection is a training aid, not part of the student's size
    # before wrapping: the student's engine must hold the projection that prepare() may add
    hidden = prepare(cfg.distill.hidden, student, teachers) if algorithm.teachers != "none" else None
    opt, meta = cfg.optim, cfg.metadistil
    warmup_steps, train_steps = step_counts(cfg, len(splits.train))
    engines = {"student": wrap(student.model.to(device).train(), opt.lr, opt.weight_decay, cfg.deepspeed,
                               _worker_batch(opt.batch_size), opt.grad_clip,
                               Schedule(opt.schedule, warmup_steps + train_steps, opt.warmup_ratio))}
    if algorithm.teachers == "trainable":
        # Teachers run without dropout: their logits are the student's targets. They still learn, once a meta step.
        meta_steps = math.ceil(train_steps / meta.meta_interval)
        engines.update({f"teacher_{i}": wrap(t.model.to(device).eval(), meta.teacher_lr, opt.weight_decay,
                                             cfg.deepspeed, _worker_batch(opt.batch_size), opt.grad_clip,
                                             Schedule(meta.teacher_schedule, meta_steps, meta.teacher_warmup_ratio))
                        for i, t in enumerate(teachers)})
    return Trial(cfg, device, splits, collate, student, teachers, engines, PhaseTimer(device), sizes, warmup_steps,
                 train_steps, hidden)


def step_counts(cfg: TrialConfig, train_examples: int) -> tuple[int, int]:
    """(warm-up fine-tuning steps, training steps) of a trial: epochs of the training split, capped by max_steps."""
    steps_per_epoch = math.ceil(train_examples / cfg.optim.batch_size)
    total = math.ceil(cfg.optim.epochs * steps_per_epoch)
    return math.ceil(cfg.warmup.epochs * steps_per_epoch), min(total, cfg.optim.max_steps or total)


def quiz_stream(quiz: TextSet, collate: Collator, batch_size: int, seed: int, device: torch.device,
                start: int = 0) -> Iterator[Batch]:
    """Quiz batches; draw i depends only on (seed, i), so a resumed trial continues the same sequence."""
    for draw in itertools.count(start):
        indices = np.random.default_rng([seed, 7, draw]).choice(len(quiz), size=batch_size, replace=False)
        yield collate(quiz, shard(indices), epoch=None, with_teachers=False).to(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_batch(batch_size: int) -> int:
    """Each worker's share of a global batch; the global batch is the trial's, whatever the number of workers."""
    return batch_size // world()[1]


def _load_student(cfg: TrialConfig, num_labels: int, attn: str | None) -> Loaded:
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
