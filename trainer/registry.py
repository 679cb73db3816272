"""The training algorithms by name: what each needs of a trial, where its trials go in the report, how it is built.

Config validation, the sweep spec, the workers check, the trial builder and the training loop ask the registry
instead of naming algorithms. Adding an algorithm is one file (its class and a ``build(trial, quiz)`` function that
returns it) and one ``register(AlgorithmSpec(...))`` line.

No torch here: config validation and the launcher read the registry before anything heavy loads (``metadistil
validate`` answers in about a second, importing torch and DeepSpeed takes several). That is why the builtins at the
end are declared in this file, not in their own: their builders are named ``"module:attribute"`` and imported on
their first build, and their config rules, which need no torch, stand beside them.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from trainer.errors import ConfigKeyError

if TYPE_CHECKING:
    from trainer.build import Trial
    from trainer.config import TrialConfig
    from trainer.data import Batch
    from trainer.engine import Engine

Teachers = Literal["none", "frozen", "trainable"]
# the name is a trial id's first part (a folder name) and an MLflow tag value
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Algorithm(Protocol):
    """What the training loop drives: ``train_step`` takes one optimizer step of the student and returns named
    losses (logged as ``train/<name>``)."""

    student: Engine

    def train_step(self, batch: Batch, step: int) -> dict[str, float]: ...


# build(trial, quiz): quiz is the trial's quiz stream for an algorithm with quiz=True, else None
Build = Callable[["Trial", "Iterator[Batch] | None"], Algorithm]


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm as everything outside its own file sees it.

    ``teachers``: "none"; "frozen" (their logits are targets); "trainable" (the algorithm updates them: the trial
    wraps each in an engine stepping at metadistil.teacher_lr on metadistil.teacher_schedule, one step per meta step
    of metadistil.meta_interval training steps). ``quiz``: it draws batches of metadistil.quiz_batch_size from the
    data.quiz split, one per meta step. ``block``: the report block of its trials (warm-up and noise variants of
    distillation go to blocks of their own); ``several_teachers_block``: the block of its trials with more than one
    teacher, when that differs. ``check(cfg)``: its own config rules, raising ConfigKeyError with the key from the
    config's top; ``check_workers(cfg, workers)``: what it cannot do on that many data-parallel workers, one line
    each; ``attention(cfg)``: the attention implementation its models must load with (None: the model's default).
    """

    name: str
    label: str
    block: str
    teachers: Teachers
    build: Build | str  # "module:attribute": imported on the first build
    quiz: bool = False
    several_teachers_block: str | None = None
    check: Callable[[TrialConfig], None] | None = None
    check_workers: Callable[[TrialConfig, int], list[str]] | None = None
    attention: Callable[[TrialConfig], str | None] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"algorithm name {self.name!r}: use lower-case letters, digits and _, starting with a "
                             "letter (it becomes part of trial folder names)")
        if self.teachers not in get_args(Teachers):
            raise ValueError(f"algorithm {self.name!r}: teachers {self.teachers!r} is not one of "
                             f"{', '.join(get_args(Teachers))}")
        if isinstance(self.build, str) and not _DOTTED.match(self.build):
            raise ValueError(f"algorithm {self.name!r}: build {self.build!r} is not 'module:attribute'")

    def validate(self, cfg: TrialConfig) -> None:
        """The rules its needs imply, then its own ``check``; TrialConfig runs them once its keys are valid."""
        if self.teachers == "none" and cfg.teachers:
            raise ConfigKeyError("teachers", f"{self.name} trains without teachers; remove teachers or choose "
                                 f"{'/'.join(distilling())}")
        if self.teachers != "none" and not cfg.teachers:
            raise ConfigKeyError("teachers", f"algorithm '{self.name}' needs at least one teacher")
        if self.quiz and cfg.metadistil.quiz_batch_size > cfg.data.quiz_size:
            raise ConfigKeyError("metadistil.quiz_batch_size", f"{cfg.metadistil.quiz_batch_size} exceeds "
                                 f"data.quiz_size={cfg.data.quiz_size}")
        if self.check:
            self.check(cfg)

    def worker_problems(self, cfg: TrialConfig, workers: int) -> list[str]:
        """What keeps a trial of this algorithm from running on ``workers`` > 1 data-parallel workers."""
        problems = []
        if self.quiz and cfg.metadistil.quiz_batch_size % workers:
            # each worker takes an equal slice of every quiz batch, as of every training batch
            problems.append(f"metadistil.quiz_batch_size={cfg.metadistil.quiz_batch_size} must split evenly over "
                            f"{workers} workers")
        return problems + (self.check_workers(cfg, workers) if self.check_workers else [])

    def report_block(self, teachers: int) -> str:
        """The report block of a trial with this many teachers (warm-up 0, no noise)."""
        return self.several_teachers_block if teachers > 1 and self.several_teachers_block else self.block

    def make(self, trial: Trial, quiz: Iterator[Batch] | None) -> Algorithm:
        """The algorithm of a built trial (``Trial.algorithm`` passes the quiz stream when ``quiz``)."""
        build = self.build
        if isinstance(build, str):
            module, _, attribute = build.partition(":")
            build = getattr(importlib.import_module(module), attribute)
        return build(trial, quiz)


_SPECS: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add an algorithm under its name; a second, different spec of the same name is refused."""
    known = _SPECS.setdefault(spec.name, spec)
    if known != spec:
        raise ValueError(f"algorithm {spec.name!r} is registered already")
    return spec


def get(name: str) -> AlgorithmSpec:
    if name not in _SPECS:
        raise ConfigKeyError("algorithm", f"{name!r} is not a registered algorithm (registered: {allowed()})")
    return _SPECS[name]


def names() -> tuple[str, ...]:
    """Every registered algorithm, in registration order (the builtins first)."""
    return tuple(_SPECS)


def distilling() -> tuple[str, ...]:
    """The algorithms that learn from teachers."""
    return tuple(name for name, spec in _SPECS.items() if spec.teachers != "none")


def allowed() -> str:
    """The registered names as pydantic lists allowed values: 'finetune', 'kd' or 'metadistil'."""
    quoted = [repr(name) for name in _SPECS]
    return " or ".join(filter(None, [", ".join(quoted[:-1]), quoted[-1]]))


def known(value: object) -> str:
    """The validator of an ``algorithm`` field: a registered name, else pydantic's error for a value not allowed."""
    if not isinstance(value, str) or value not in _SPECS:
        raise ValueError(f"Input should be {allowed()}")
    return value


# ------------------------------------------------------------------------------------------------------- builtins

def _metadistil_check(cfg: TrialConfig) -> None:
    ds = cfg.deepspeed
    if ds.enabled and ds.zero_stage == 3:
        raise ConfigKeyError("deepspeed.zero_stage", "ZeRO-3 partitions parameters, which the meta step needs whole; "
                             "use 0, 1 or 2 with metadistil")
    if ds.enabled and ds.precision == "fp16":
        raise ConfigKeyError("deepspeed.precision", "fp16 cannot run algorithm 'metadistil': the meta step's "
                             "gradients (about 1e-6) underflow in fp16 without loss scaling across the whole step; "
                             "use bf16 (GPUs since Ampere) or fp32")
    if cfg.metadistil.meta_gradient == "finite_difference" and ds.enabled and ds.precision != "fp32":
        raise ConfigKeyError("metadistil.meta_gradient", f"finite_difference needs fp32 compute (its difference "
                             f"quotient drowns in {ds.precision} rounding); use forward_ad with "
                             f"deepspeed.precision={ds.precision}, or fp32")


def _metadistil_workers(cfg: TrialConfig, workers: int) -> list[str]:
    if cfg.metadistil.meta_gradient == "double_backward":
        return ["metadistil.meta_gradient=double_backward runs on one worker only"]
    return []


def _metadistil_attention(cfg: TrialConfig) -> str | None:
    # fused attention kernels have no double backward
    return "eager" if cfg.metadistil.meta_gradient == "double_backward" else None


register(AlgorithmSpec("finetune", "Fine-tune", "Fine-Tuned Models", "none", "trainer.algorithms.finetune:build"))
register(AlgorithmSpec("kd", "KD", "Student Model with KD", "frozen", "trainer.algorithms.kd:build"))
register(AlgorithmSpec("metadistil", "MetaDistil", "Student Model with MetaDistil", "trainable",
                       "trainer.algorithms.metadistil:build", quiz=True,
                       several_teachers_block="Student Model with MetaDistil + Additional Teacher",
                       check=_metadistil_check, check_workers=_metadistil_workers, attention=_metadistil_attention))
